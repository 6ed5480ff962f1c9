"""The start-up hook that watches every Python process a ``gradprobe run`` starts.

coverage.py measures subprocesses with an environment variable and a start-up hook; this is
the same idea, shaped by what the hook has to survive:

* ``gradprobe run`` writes a ``sitecustomize.py`` (:func:`stub_source`) into a folder inside
  the log directory and puts that folder first on ``PYTHONPATH``: a PYTHONPATH
  ``sitecustomize`` runs in every Python process of the tree that reads the environment
  (``mp.spawn`` children, torchrun workers, Lightning's ``ddp`` children, a
  ``subprocess.run([sys.executable, ...])``), and nothing is written into site-packages (a
  ``.pth`` there, coverage's way, is left behind when the run is killed). The stub removes
  its folder from ``sys.path`` again, then runs the ``sitecustomize`` it shadows (Debian
  ships one), so the process sees the ``sys.path`` and the start-up it would have had.
* Processes that never train run the hook too (the torchrun agent, multiprocessing's
  resource tracker and forkserver, DataLoader workers): so at start-up the hook imports
  nothing but this stdlib-only module, writes one marker file (so that the parent can tell
  watched children from unwatched ones) and puts a finder in ``sys.meta_path`` that waits
  for ``torch``. Once torch is imported, ``torch.optim.Optimizer.__init__`` is wrapped; only
  when the process builds its first optimizer is gradprobe imported and a probe attached
  (:func:`gradprobe.tree.attach_child`), and the wrapper is taken off again.
* Fork children (multiprocessing's ``fork`` and ``forkserver`` start methods, the default on
  Linux from Python 3.14) do not run start-up code: ``os.register_at_fork`` arms them again
  (the parent's probe goes inert in them; they attach their own at their first optimizer).
* ``python -I``, ``-E`` and ``-S`` children ignore ``PYTHONPATH`` or skip ``site``: they are
  not watched (the parent's report says when nothing was recorded).

Nothing here may raise into the process it runs in: every step is guarded and a failure
leaves the process unwatched, exactly as without gradprobe.
"""

from __future__ import annotations

import os
import sys

#: the hook folder's name inside the log directory: ``.gradprobe-hook-<root pid>-<token>``
HOOK_PREFIX = ".gradprobe-hook-"
#: the module name the stub loads this file under (the same as a normal import, so the
#: process holds one copy of the state below, whichever way it was loaded first)
MODULE_NAME = "gradprobe.subprocess_hook"
#: the folder (inside the hook folder) holding one marker per Python process that booted
MARKERS = "procs"
#: this module's bytecode, compiled once by ``gradprobe run`` into the hook folder: a child
#: loads it without compiling (``PYTHONDONTWRITEBYTECODE`` or a read-only install leave no
#: bytecode cache next to the source)
CODE_FILE = "hook.pyc"

#: this process's part in a tree: empty when the process belongs to none
_state: dict[str, object] = {}


def stub_source(config: dict[str, object]) -> str:
    """The ``sitecustomize.py`` written into the hook folder.

    It imports nothing beyond what Python's start-up already loaded (``os``, ``sys``,
    ``importlib.machinery``): it runs this module from the bytecode ``gradprobe run`` compiled
    into the hook folder (from its source when the child is another Python version), as
    ``gradprobe.subprocess_hook`` without importing the gradprobe package, then chains to the
    ``sitecustomize`` it shadows, whose errors reach ``site`` as they would without
    gradprobe ("Error in sitecustomize; ..."). Written for any Python 3 (no f-strings):
    another interpreter on PATH must not fail on it.
    """
    return f'''\
# Written by `gradprobe run` for the run in {config["tree"]!r}; removed when that run ends.
# It watches this Python process for gradprobe, then runs the sitecustomize it shadows.
import os as _gp_os, sys as _gp_sys
from importlib import machinery as _gp_machinery
_gp_here = _gp_os.path.dirname(_gp_os.path.abspath(__file__))
_gp_sys.path[:] = [_p for _p in _gp_sys.path if _gp_os.path.abspath(_p or ".") != _gp_here]
try:
    _gp_hook = _gp_sys.modules.get({MODULE_NAME!r})
    if _gp_hook is None:
        _gp_hook = type(_gp_sys)({MODULE_NAME!r})
        _gp_hook.__file__ = {os.path.abspath(__file__)!r}
        _gp_sys.modules[{MODULE_NAME!r}] = _gp_hook
        try:
            try:
                _gp_machinery.SourcelessFileLoader({MODULE_NAME!r}, _gp_os.path.join(_gp_here, {CODE_FILE!r})).exec_module(_gp_hook)
            except ImportError:  # bytecode of another Python version: from the source
                _gp_machinery.SourceFileLoader({MODULE_NAME!r}, _gp_hook.__file__).exec_module(_gp_hook)
        except BaseException:
            del _gp_sys.modules[{MODULE_NAME!r}]
            raise
    _gp_hook.boot(_gp_here, {config!r})
except Exception:
    pass  # never in the way of the process: it runs unwatched
_gp_spec = _gp_machinery.PathFinder.find_spec("sitecustomize", _gp_sys.path)
if _gp_spec is not None and _gp_spec.loader is not None:
    from importlib._bootstrap import module_from_spec as _gp_mfs
    _gp_next = _gp_mfs(_gp_spec)
    _gp_sys.modules["sitecustomize"] = _gp_next
    _gp_spec.loader.exec_module(_gp_next)
'''


# ------------------------------------------------------------------ start-up (child) -----
def boot(hook_dir: str, config: dict[str, object]) -> None:
    """Called by the stub at start-up: joins the tree, leaves a marker, waits for torch."""
    if _state:
        return  # booted already (a second gradprobe stub further down PYTHONPATH)
    _state.update(config)
    _state.update(hook_dir=hook_dir, pid=os.getpid(), attached=False, probe=None, torch=False)
    _write_marker()
    _register_fork_handler()
    arm()


def enable_in_root(hook_dir: str, config: dict[str, object]) -> None:
    """The ``gradprobe run`` process: its own probe watches it; its fork children get armed."""
    _state.clear()
    _state.update(config)
    _state.update(hook_dir=hook_dir, pid=os.getpid(), attached=True, probe=None, torch=True, root=True)
    _register_fork_handler()


def disable() -> None:
    """Leaves the tree: nothing more is armed in this process or its later forks."""
    _unwrap_optimizer()
    _remove_finder()
    _state.clear()


def in_tree() -> bool:
    return bool(_state)


def arm() -> None:
    """Attach at the first optimizer: wrap it now if torch is loaded, else when it is."""
    if not _state or _state.get("attached"):
        return
    if "torch" in sys.modules and hasattr(sys.modules["torch"], "optim"):
        _torch_ready()
    elif not any(isinstance(f, _TorchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchFinder())


class _TorchFinder:
    """A ``sys.meta_path`` entry that only notices ``torch`` being imported.

    It finds nothing itself: for ``torch`` it asks the other finders, and makes the loader
    call :func:`_torch_ready` once torch's ``__init__`` has run (so ``torch.optim`` exists).
    Every other import costs one string comparison.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "torch":
            return None
        _remove_finder()
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: object) -> None:
            try:
                original(module)
            finally:
                try:
                    del loader.exec_module  # the loader's own method again
                except AttributeError:
                    pass
            _torch_ready()

        try:
            loader.exec_module = exec_module
        except Exception:  # noqa: BLE001 - a loader that takes no attributes: not watched
            pass
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchFinder)]


def _torch_ready() -> None:
    """torch is imported: wrap ``Optimizer.__init__`` so the first optimizer attaches."""
    try:
        if not _state or _state.get("attached"):
            return
        if not _state.get("torch"):
            _state["torch"] = True
            import atexit

            atexit.register(_at_exit)
        optimizer_cls = sys.modules["torch.optim"].Optimizer
        current = optimizer_cls.__dict__.get("__init__")
        if current is None or getattr(current, "_gradprobe_hook", False):
            return

        def __init__(self: object, *args: object, **kwargs: object) -> None:
            current(self, *args, **kwargs)
            _on_optimizer(self)

        __init__._gradprobe_hook = True  # type: ignore[attr-defined]
        __init__.__wrapped__ = current  # type: ignore[attr-defined]
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(__init__, attr, getattr(current, attr))
            except (AttributeError, TypeError):
                pass
        optimizer_cls.__init__ = __init__
    except Exception:  # noqa: BLE001 - not watched, never broken
        pass


def _unwrap_optimizer() -> None:
    try:
        optimizer_cls = sys.modules["torch.optim"].Optimizer
    except (KeyError, AttributeError):
        return
    current = optimizer_cls.__dict__.get("__init__")
    if getattr(current, "_gradprobe_hook", False):
        optimizer_cls.__init__ = current.__wrapped__


def _on_optimizer(opt: object) -> None:
    """The process built its first optimizer: attach a probe (once)."""
    if not _state or _state.get("attached") or _state.get("pid") != os.getpid():
        return
    _state["attached"] = True
    _unwrap_optimizer()
    try:
        tree = _import_tree()
        _state["probe"] = tree.attach_child(opt, dict(_state))
    except Exception as exc:  # noqa: BLE001 - the run goes on unwatched
        _state["error"] = f"{type(exc).__name__}: {exc}"[:300]


def _import_tree() -> object:
    """``gradprobe.tree``; from the parent's gradprobe when this process cannot import one."""
    try:
        from gradprobe import tree

        return tree
    except ImportError:
        pass
    package = _state.get("package")
    if not package or "gradprobe" in sys.modules:
        raise ImportError("gradprobe is not importable in this process")
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("gradprobe", os.path.join(package, "__init__.py"), submodule_search_locations=[package])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load gradprobe from {package}")
    module = module_from_spec(spec)
    sys.modules["gradprobe"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["gradprobe"]
        raise
    from gradprobe import tree

    return tree


# ------------------------------------------------------------------- fork children -----
_FORK_HANDLER: list[bool] = []


def _register_fork_handler() -> None:
    if not _FORK_HANDLER and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _FORK_HANDLER.append(True)


def _after_fork_in_child() -> None:
    """A fork child trains on its own: it gets its own probe at its first optimizer (the
    parent's, inherited, is inert here). It leaves no marker: it was not started by a
    command, so there is nothing to match it with."""
    if not _state:
        return
    try:
        _state.update(pid=os.getpid(), attached=False, probe=None, root=False, forked=True)
        arm()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- markers -----
def _write_marker(suffix: str = "", **extra: object) -> None:
    """One small file per exec'd Python process of the tree at start-up (``<pid>``), and one
    more at exit (``<pid>.exit``), each a Python literal read back with
    ``ast.literal_eval``: its command line, and at exit whether it imported torch, built an
    optimizer and recorded steps. Always a new file: truncating or renaming over one makes
    ext4 flush it on close (milliseconds of I/O wait at every exit)."""
    try:
        info = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "orig_argv": list(getattr(sys, "orig_argv", []) or []),
            "argv": list(getattr(sys, "argv", []) or []),
        }
        info.update(extra)
        with open(os.path.join(_state["hook_dir"], MARKERS, f"{os.getpid()}{suffix}"), "x", encoding="utf-8") as f:
            f.write(repr(info))
    except Exception:  # noqa: BLE001 - the hook folder is gone (the run ended): nothing to say
        pass


def _at_exit() -> None:
    """The process ends after importing torch: say what it did (runs after the probe's own
    close, which the recorder registered later)."""
    if not _state or _state.get("root") or _state.get("forked") or _state.get("pid") != os.getpid():
        return
    exit_info(write=True)


def exit_info(write: bool = False) -> dict[str, object]:
    probe = _state.get("probe")
    info: dict[str, object] = {"torch": bool(_state.get("torch")), "optimizer": bool(_state.get("attached"))}
    if probe is not None:
        meta = getattr(probe, "meta", {}) or {}
        info["steps"] = int(meta.get("steps", getattr(probe, "step", 0)) or 0)
        info["run"] = getattr(probe, "logdir", None) if info["steps"] else None
    if _state.get("error"):
        info["error"] = _state["error"]
    try:
        info["mp"] = sys.modules["multiprocessing.process"].current_process().name != "MainProcess"
    except (KeyError, AttributeError):
        info["mp"] = False
    if write:
        _write_marker(".exit", **info)
    return info


__all__ = ["CODE_FILE", "HOOK_PREFIX", "MARKERS", "MODULE_NAME", "arm", "boot", "disable", "enable_in_root", "in_tree", "stub_source"]
