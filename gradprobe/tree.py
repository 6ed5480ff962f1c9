"""The process tree of a ``gradprobe run``: where each watched process writes, and what the
parent knows about its children.

One log directory (the *tree directory*) holds the whole tree:

* a process that records no step writes nothing (the torchrun agent, multiprocessing's
  helpers, DataLoader workers, a script that never trains): its probe's writer
  (:class:`DeferredWriter`) keeps what it is handed until the first recorded step, and only
  then is the run directory named (:meth:`TreeLayout.claim`);
* that name comes from the global rank of ``torch.distributed`` once a process group exists,
  else from the launcher's environment (``RANK``, or ``LOCAL_RANK`` for Lightning's
  children): a rank of a job with more than one process writes ``<tree>/rank<N>/`` (merged
  by ``gradprobe analyze`` as ranks always were), the ``gradprobe run`` process itself
  writes into the tree directory, and any other child process writes ``<tree>/pid<PID>/``;
* every run directory carries the tree's id in its ``gradprobe.json`` (``tree``), so the
  parent's report reads exactly this run's processes, even in a reused ``--logdir``.

:class:`ProcessTree` is the parent's side: it writes the start-up hook
(:mod:`gradprobe.subprocess_hook`) into ``<tree>/.gradprobe-hook-<pid>-<token>/``, puts it on
``PYTHONPATH`` for the children, notes the commands the script starts (a Python audit hook:
``subprocess.Popen``, ``os.posix_spawn``, ``os.spawn*``, ``os.system``), and when the script
ends puts the environment back, reads the markers the children left and removes the hook
folder. A SIGKILLed run leaves that folder inside the log directory and nothing anywhere else
(the next ``gradprobe run`` there removes it).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import secrets
import shutil
import sys
import threading
from typing import Any, Callable

from gradprobe import subprocess_hook as hook

#: ``gradprobe.json`` key naming the tree a run directory belongs to
TREE_KEY = "tree"
#: folder (inside the hook folder) where processes claim run-directory names atomically
CLAIMS = "claims"
#: most child commands remembered for the report (a script starting thousands of
#: processes is summarised by the first ones)
MAX_COMMANDS = 64
#: audit events that start another program
_CHILD_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system"})


# -------------------------------------------------------------------- configuration -----
def config_to_dict(config: Any) -> dict[str, Any]:
    """A :class:`~gradprobe.config.ProbeConfig` as plain literals (the stub embeds them)."""
    if config is None:
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value) if g.init}
        out[f.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Any:
    from gradprobe.config import ProbeConfig
    from gradprobe.schedule import Schedule

    if not data:
        return ProbeConfig()
    fields = dict(data)
    if isinstance(fields.get("schedule"), dict):
        fields["schedule"] = Schedule(**fields["schedule"])
    known = {f.name for f in dataclasses.fields(ProbeConfig)}
    return ProbeConfig(**{k: v for k, v in fields.items() if k in known})


# --------------------------------------------------------------------------- layout -----
class TreeLayout:
    """Names a process's run directory inside the tree at its first recorded step.

    Args:
        tree_dir: the tree directory (absolute).
        hook_dir: the hook folder, where names are claimed (None or gone: names are checked
            against the run directories themselves).
        token: the tree's id (written to ``gradprobe.json``).
        root: the ``gradprobe run`` process itself (writes into the tree directory unless
            it is a rank).
    """

    def __init__(self, tree_dir: str, hook_dir: str | None, token: str, *, root: bool) -> None:
        self.tree_dir = tree_dir
        self.hook_dir = hook_dir
        self.token = token
        self.root = root

    def writer(self, make: Callable[[str, dict[str, Any]], Any]) -> "DeferredWriter":
        """The probe's writer: ``make(logdir, meta)`` builds the real one once named."""
        return DeferredWriter(self, make)

    def claim(self, rank: int, world: int) -> str:
        """The run directory of this process (not created yet), unique within the tree."""
        names = []
        if world > 1:
            names.append(f"rank{rank}")
        elif self.root:
            names.append("")
        pid = os.getpid()
        names.append(f"pid{pid}")
        names.extend(f"pid{pid}-{k}" for k in range(2, 100))
        for name in names:
            if self._take(name):
                return os.path.join(self.tree_dir, name) if name else self.tree_dir
        raise OSError(f"no free run directory name in {self.tree_dir}")

    def _take(self, name: str) -> bool:
        if self.hook_dir is not None:
            try:
                fd = os.open(os.path.join(self.hook_dir, CLAIMS, name or "_tree"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            except OSError:
                pass  # the hook folder is gone (an orphan outliving its parent): check the runs
            else:
                os.close(fd)
                return True
        path = os.path.join(self.tree_dir, name) if name else self.tree_dir
        return tree_id(path) != self.token


def tree_id(run_dir: str) -> str | None:
    """The tree id recorded in a run directory's ``gradprobe.json``, if any."""
    import json

    try:
        with open(os.path.join(run_dir, "gradprobe.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    tree = meta.get(TREE_KEY) if isinstance(meta, dict) else None
    return tree.get("id") if isinstance(tree, dict) else None


class DeferredWriter:
    """A run writer that exists only from the probe's first recorded step.

    Until :meth:`open`, events, scalars and texts handed over are kept (a script's events
    before its first step: a signal, an exception), metadata is not (the probe hands its
    current metadata to :meth:`open`); if the process never records a step, :meth:`close`
    drops them and nothing was written.
    """

    #: events kept at most before the first step (a loop of warnings must not grow memory)
    MAX_PENDING = 1000

    def __init__(self, layout: TreeLayout, make: Callable[[str, dict[str, Any]], Any]) -> None:
        self.layout = layout
        self._make = make
        self._real: Any = None
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.failed: BaseException | None = None

    @property
    def opened(self) -> bool:
        return self._real is not None

    def open(self, rank: int, world: int, meta: dict[str, Any]) -> str:
        """Names the run directory, creates it and writes what was kept. Returns its path."""
        path = self.layout.claim(rank, world)
        real = self._make(path, meta)
        with self._lock:
            for name, args in self._pending:
                getattr(real, name)(*args)
            self._pending = []
            self._real = real
        return path

    def _call(self, name: str, *args: Any) -> Any:
        real = self._real
        if real is None:
            with self._lock:
                real = self._real
                if real is None:
                    if name != "put_meta" and not self._closed and len(self._pending) < self.MAX_PENDING:
                        self._pending.append((name, args))
                    return None
        return getattr(real, name)(*args)

    def put_batch(self, pending: Any) -> None:
        self._call("put_batch", pending)

    def put_event(self, event: dict[str, Any]) -> None:
        self._call("put_event", event)

    def put_meta(self, meta: dict[str, Any]) -> None:
        self._call("put_meta", meta)

    def put_scalars(self, rows: list[tuple[int, str, float]]) -> None:
        self._call("put_scalars", rows)

    def put_text(self, tag: str, markdown: str, step: int) -> None:
        self._call("put_text", tag, markdown, step)

    def sync(self, timeout: float = 30.0) -> bool:
        real = self._real
        return True if real is None else real.sync(timeout)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._pending = []
            real = self._real
        if real is not None:
            real.close(timeout)


# --------------------------------------------------------------- a child attaches -----
def attach_child(opt: Any, state: dict[str, Any]) -> Any:
    """Starts the probe of a child process at its first optimizer (see
    :mod:`gradprobe.subprocess_hook`); None when a probe already watches this process (the
    script called ``gradprobe.watch`` itself, or runs ``gradprobe run`` again)."""
    from gradprobe.probe.core import Probe, live_probes

    pid = os.getpid()
    if any(p._pid == pid and not p._closed and not p._forked for p in live_probes()):
        return None
    layout = TreeLayout(state["tree"], state.get("hook_dir"), state["token"], root=False)
    info = {
        TREE_KEY: {"id": state["token"], "root": False, "root_pid": state.get("root_pid")},
        "run": {"target": sys.argv[0] if sys.argv else "", "cwd": os.getcwd(), "python": sys.executable, "ppid": os.getppid()},
    }
    probe = Probe([], auto=True, logdir=state["tree"], config=config_from_dict(state.get("probe_config") or {}),
                  run_info=info, layout=layout)
    probe._on_optimizer_created(opt)
    _close_with_multiprocessing(probe)
    return probe


def _close_with_multiprocessing(probe: Any) -> None:
    """multiprocessing's fork and forkserver children end with ``os._exit`` (no ``atexit``):
    their exit function runs the finalizers registered with an exit priority. A negative one
    runs after the child's own children were joined."""
    process = sys.modules.get("multiprocessing.process")
    if process is None or process.current_process().name == "MainProcess":
        return
    from multiprocessing import util

    util.Finalize(None, probe.close, exitpriority=-10)


# ---------------------------------------------------------------- the parent's side -----
@dataclasses.dataclass
class ChildCommand:
    """A program the script started (seen by the audit hook)."""

    argv: list[str]
    env_dropped: bool = False

    def shown(self, limit: int = 120) -> str:
        import shlex

        text = shlex.join(self.argv)
        return text if len(text) <= limit else text[: limit - 1] + "…"


_RECORDING: list["ProcessTree"] = []
_AUDIT_INSTALLED: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in _CHILD_EVENTS or not _RECORDING:
        return
    try:
        tree = _RECORDING[-1]
        if tree.pid == os.getpid():
            tree._child_started(event, args)
    except Exception:  # noqa: BLE001 - an audit hook must never raise into the script
        pass


class ProcessTree:
    """The parent's side of a watched process tree (one ``gradprobe run``).

    Args:
        tree_dir: the log directory (absolute).
        config: the :class:`~gradprobe.config.ProbeConfig` every child's probe uses.
    """

    def __init__(self, tree_dir: str, config: Any = None) -> None:
        self.tree_dir = os.path.abspath(tree_dir)
        self.config = config
        self.token = secrets.token_hex(6)
        self.pid = os.getpid()
        self.hook_dir = os.path.join(self.tree_dir, f"{hook.HOOK_PREFIX}{self.pid}-{self.token}")
        self.created: str | None = None
        self.watching_children = False
        self.note: str | None = None
        self.commands: list[ChildCommand] = []
        self.commands_seen = 0
        self.markers: list[dict[str, Any]] = []
        self._env_set: str | None = None
        self._env_before: str | None = None
        self._started = False

    @property
    def run_info(self) -> dict[str, Any]:
        return {TREE_KEY: {"id": self.token, "root": True, "root_pid": self.pid}}

    def layout(self) -> TreeLayout:
        return TreeLayout(self.tree_dir, self.hook_dir if self.watching_children else None, self.token, root=True)

    def start(self) -> None:
        """Creates the tree directory and the hook; children started from now are watched.

        Raises:
            OSError: the tree directory cannot be created or written.
        """
        if not os.path.isdir(self.tree_dir):
            top = self.tree_dir  # the highest folder this run creates (./gradprobe_runs/...)
            while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
                top = os.path.dirname(top)
            try:
                os.makedirs(self.tree_dir)
                self.created = top
            except FileExistsError:  # another rank's gradprobe run made it first (torchrun)
                pass
        self._started = True
        remove_stale_hooks(self.tree_dir)
        os.makedirs(os.path.join(self.hook_dir, hook.MARKERS))
        os.makedirs(os.path.join(self.hook_dir, CLAIMS))
        if os.pathsep in self.hook_dir:
            self.note = f"child processes are not watched: the log directory's path contains {os.pathsep!r}"
            return
        config = {
            "tree": self.tree_dir,
            "token": self.token,
            "root_pid": self.pid,
            "package": os.path.dirname(os.path.abspath(hook.__file__)),
            "probe_config": config_to_dict(self.config),
        }
        stub = os.path.join(self.hook_dir, "sitecustomize.py")
        with open(stub, "w", encoding="utf-8") as f:
            f.write(hook.stub_source(config))
        _precompile(stub, None)
        _precompile(os.path.abspath(hook.__file__), os.path.join(self.hook_dir, hook.CODE_FILE))
        before = os.environ.get("PYTHONPATH")
        # every entry kept as it was (an empty one means the working directory), except the
        # hook of an enclosing gradprobe run: this run's children report here
        kept = [p for p in before.split(os.pathsep) if not (p and os.path.basename(os.path.normpath(p)).startswith(hook.HOOK_PREFIX))] if before else []
        self._env_before = before
        self._env_set = os.pathsep.join([self.hook_dir, *kept])
        os.environ["PYTHONPATH"] = self._env_set
        self.watching_children = True
        hook.enable_in_root(self.hook_dir, config)
        if not _AUDIT_INSTALLED:
            sys.addaudithook(_audit)  # an audit hook cannot be removed: it idles between runs
            _AUDIT_INSTALLED.append(True)
        _RECORDING.append(self)

    def stop(self) -> None:
        """The script ended: the environment as it was, the children's markers read, the hook
        folder removed (and the tree directory, if this run created it and wrote nothing)."""
        if not self._started:
            return
        self._started = False
        if self in _RECORDING:
            _RECORDING.remove(self)
        hook.disable()
        if self._env_set is not None:
            self._restore_env()
        self.markers = read_markers(os.path.join(self.hook_dir, hook.MARKERS))
        shutil.rmtree(self.hook_dir, ignore_errors=True)
        folder = self.tree_dir
        while self.created is not None:  # only empty folders: nothing was recorded
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == self.created:
                break
            folder = os.path.dirname(folder)

    def _restore_env(self) -> None:
        now = os.environ.get("PYTHONPATH")
        if now == self._env_set:
            if self._env_before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = self._env_before
        elif now is not None:  # the script changed it: take out only our entry
            rest = [p for p in now.split(os.pathsep) if p != self.hook_dir]
            if rest:
                os.environ["PYTHONPATH"] = os.pathsep.join(rest)
            else:
                os.environ.pop("PYTHONPATH", None)
        self._env_set = None

    def _child_started(self, event: str, args: tuple[Any, ...]) -> None:
        argv: list[str]
        env: Any = None
        if event == "subprocess.Popen":
            _executable, cmd, _cwd, env = args
            argv = [cmd] if isinstance(cmd, (str, bytes, os.PathLike)) else list(cmd)
        elif event == "os.posix_spawn":
            _path, cmd, env = args
            argv = list(cmd)
            last = self.commands[-1] if self.commands else None
            if last is not None and last.argv == [os.fsdecode(a) for a in argv]:
                return  # subprocess.Popen's own posix_spawn, already noted
        elif event == "os.spawn":
            _mode, _path, cmd, env = args
            argv = list(cmd)
        else:  # os.system
            argv = ["/bin/sh", "-c", os.fsdecode(args[0])]
        self.commands_seen += 1
        if len(self.commands) >= MAX_COMMANDS:
            return
        argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
        dropped = False
        if env is not None:
            try:
                value = env.get("PYTHONPATH") if hasattr(env, "get") else None
                if value is None and hasattr(env, "get"):
                    value = env.get(b"PYTHONPATH")
                value = os.fsdecode(value) if value is not None else ""
                dropped = self.hook_dir not in value.split(os.pathsep)
            except Exception:  # noqa: BLE001
                dropped = False
        self.commands.append(ChildCommand(argv, dropped))

    # ---- what the children did ------------------------------------------------------------
    def watched(self) -> list[dict[str, Any]]:
        """Markers of the Python processes that ran the hook (the parent excluded)."""
        return [m for m in self.markers if m.get("pid") != self.pid]

    def unwatched_commands(self) -> list[ChildCommand]:
        """Commands the script started whose process left no marker: not Python, or Python
        that skipped the hook (``-I``, ``-E``, ``-S``, an environment without it)."""
        direct = [m for m in self.watched() if m.get("ppid") == self.pid]
        out = []
        for cmd in self.commands:
            match = next((m for m in direct if list(m.get("orig_argv") or [])[1:] == cmd.argv[1:]), None)
            if match is not None:
                direct.remove(match)
                continue
            out.append(cmd)
        return out


def _precompile(source: str, cfile: str | None) -> None:
    """Bytecode of the stub (its cache, next to it) and of the hook module (in the hook
    folder): children load them without compiling; Python reads a valid cache even under
    ``PYTHONDONTWRITEBYTECODE``, which only stops writing one."""
    import py_compile

    try:
        py_compile.compile(source, cfile=cfile, doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # each child compiles: slower, not wrong


def read_markers(folder: str) -> list[dict[str, Any]]:
    """One dict per process that ran the hook: its start-up marker updated by its exit one."""
    found: dict[int, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(folder), key=lambda n: (n.endswith(".exit"), n))
    except OSError:
        return []
    for name in names:
        if not name.split(".")[0].isdigit():
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                value = ast.literal_eval(f.read())
        except (OSError, ValueError, SyntaxError, MemoryError, RecursionError):
            continue  # torn by a kill
        if isinstance(value, dict):
            found.setdefault(int(name.split(".")[0]), {}).update(value)
    return list(found.values())


def remove_stale_hooks(tree_dir: str) -> None:
    """Hook folders left by a killed ``gradprobe run`` in this directory (their process is
    gone) are removed."""
    try:
        entries = os.listdir(tree_dir)
    except OSError:
        return
    for name in entries:
        if not name.startswith(hook.HOOK_PREFIX):
            continue
        pid_text = name[len(hook.HOOK_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(os.path.join(tree_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


__all__ = ["ChildCommand", "DeferredWriter", "ProcessTree", "TreeLayout", "attach_child", "config_from_dict", "config_to_dict", "read_markers", "tree_id"]
