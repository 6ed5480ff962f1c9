"""``gradprobe run``: a training script run exactly as ``python SCRIPT ARGS`` would, watched.

This module holds the mechanics; :mod:`gradprobe.cli.run` is the thin typer command on top.
The script sees what ``python`` gives it (pyinstrument's ``__main__`` is the model):

* ``sys.argv`` is ``[SCRIPT, *ARGS]`` (``-m``: the module's file, then the arguments);
* ``__name__ == "__main__"`` in a fresh ``__main__`` module (so pickling classes defined in
  the script works), with ``__file__`` and ``__loader__`` as Python sets them;
* ``sys.path[0]`` is the script's directory (symlinks resolved), or the working directory
  for ``-m``; nothing is inserted, the rest of ``sys.path`` is untouched;
* cwd, stdin, stdout and stderr are inherited unchanged;
* the exit status is Python's: 0, ``sys.exit(n)``'s ``n``, 1 after an uncaught exception
  (printed by ``sys.excepthook`` with gradprobe's frames removed), and death by the signal
  after an uncaught ``KeyboardInterrupt`` (the shell shows 130) or SIGTERM (143).

Around the script, a :class:`~gradprobe.probe.core.Probe` in ``auto`` mode watches every
model, optimizer and GradScaler the process creates, and a :class:`~gradprobe.tree.
ProcessTree` watches every Python process the script starts (a start-up hook on
``PYTHONPATH``: :mod:`gradprobe.subprocess_hook`); each process names its run directory inside
the log directory at its first recorded step. However the script ends (returns,
``sys.exit``, an exception, Ctrl-C, SIGTERM, ``--memory-limit``), the runner records how in
the run log (an ``exception`` event for exceptions the probe's backward wrapper did not
already record, and one ``script_end`` event), waits for non-daemon threads as Python does,
closes the probe (everything is flushed), puts the environment back and hands back an
:class:`Outcome`; the caller prints the report of the whole tree (:meth:`ScriptRunner.report`)
and then calls :func:`exit_like` to leave with the script's status.

Signals (:mod:`gradprobe.interrupts`) and memory. SIGINT keeps Python's own handler
(``KeyboardInterrupt`` unwinds the script like any exception). For SIGTERM, whose default
action kills the process before anything can be written, the runner installs a handler that
raises :class:`ScriptTerminated` in the main thread; the report is printed, then the process
dies by SIGTERM as it would have. Handlers the script installs itself keep working. Forked
children (DataLoader workers) get the script's dispositions back and no gradprobe handler.
With a memory limit each process's probe raises ``MemoryError`` in the script at a step
boundary once the process uses more (:mod:`gradprobe.probe.memory`), so the run ends by an
exception that is logged and diagnosed instead of by the OOM killer's SIGKILL.
"""

from __future__ import annotations

import atexit
import builtins
import datetime as _dt
import importlib.machinery
import io
import os
import re
import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any, NoReturn

from gradprobe.interrupts import HANDLED_SIGNALS, ScriptTerminated, SignalChain, signal_name
from gradprobe.live import EXIT_STOPPED, RunStopped, check_stop_on
from gradprobe.probe.ranks import rank_and_world
from gradprobe.target import RunnerError, Target, python_script_on_path, resolve_target  # noqa: F401 (re-exported)

_REAL_SIGNAL = signal.signal  # the module function, whatever a script later does to it

#: How a script ended, as recorded in the ``script_end`` event and :attr:`Outcome.how`.
#: ``stopped``: ``--stop-on`` stopped it (this process, or a watched child whose failure
#: ended the script), exit status 3 (:data:`gradprobe.live.EXIT_STOPPED`).
HOW = ("returned", "exit", "exception", "keyboard_interrupt", "signal", "stopped")


@dataclass
class Outcome:
    """How the script ended.

    Attributes:
        status: the exit status Python would have returned (when ``signum`` is None).
        how: one of :data:`HOW`.
        signum: the process must die by this signal (after ``KeyboardInterrupt``: SIGINT;
            after SIGTERM: SIGTERM), as Python would have.
        exception: the exception that ended the script (its frames cleared), if any.
        steps: training steps recorded.
        logdir: the run directory, None when no probe was started.
        started: False when the script never started (syntax error, no such module).
        location: ``file:line`` in the script's own code where the exception was raised.
        stopped: the stop's record (``gradprobe.json`` ``stopped``, with ``run``: whose) when
            ``how`` is ``stopped``.
    """

    status: int
    how: str
    signum: int | None = None
    exception: BaseException | None = None
    steps: int = 0
    logdir: str | None = None
    started: bool = True
    location: str | None = None
    stopped: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.signum is not None or self.status != 0

    def describe(self) -> str:
        """One phrase for the line printed before the report."""
        if self.how == "returned":
            return "the script finished"
        if self.how == "exit":
            return f"the script exited with status {self.status}"
        if self.how == "keyboard_interrupt":
            return "the script was interrupted (KeyboardInterrupt)"
        if self.how == "signal":
            return f"the script was terminated by {signal_name(self.signum or 0)}"
        if self.how == "stopped":
            return _stopped_phrase(self.stopped or {})
        exc = self.exception
        name = type(exc).__name__ if exc is not None else "an exception"
        return f"the script raised {name} (exit status {self.status})"


def _stopped_phrase(stop: dict[str, Any]) -> str:
    """``the run was stopped after step 70 by --stop-on (GP401 nonfinite-loss, final; 19930 of
    20000 steps left), exit status 3``; the run is named when it is not the script's own."""
    run = stop.get("run")
    whose = f" ({run})" if run and run != "script" else ""
    left = ""
    if stop.get("steps_left") is not None and stop.get("total_steps") is not None:
        left = f"; {stop['steps_left']} of {stop['total_steps']} steps left"
    return (f"the run{whose} was stopped after step {stop.get('step')} by --stop-on ({stop.get('code')} "
            f"{stop.get('rule')}, final{left}), exit status {EXIT_STOPPED}")


# ------------------------------------------------------------------------------ sizes -----
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``"2G"``, ``"500M"``, ``"1.5GiB"``, ``"4096"`` (binary units: 1K = 1024).

    Raises:
        ValueError: not a positive size.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 2G, 500M, 1.5GiB, 4096)")
    number, unit = float(m.group(1)), m.group(2).lower()
    value = int(number * 1024 ** "_kmgtp".index(unit or "_"))
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return value


# --------------------------------------------------------------------------- logdir -----
def run_logdir(logdir: str | None) -> str:
    """The absolute log directory of the run's process tree (fixed before the script can
    ``chdir``).

    Each watched process of the tree writes into it (see :mod:`gradprobe.tree`). Without
    ``--logdir``: a new folder under ``./gradprobe_runs/``; under torchrun (``gradprobe
    run`` started by it: ``WORLD_SIZE`` > 1) it is named after the launcher (the ranks'
    common parent process and its start time) so that all local ranks share it.
    """
    _, world = rank_and_world()
    if logdir:
        return os.path.abspath(logdir)
    if world <= 1:
        return default_logdir()
    ppid = os.getppid()
    started = time.time()
    try:
        import psutil

        started = psutil.Process(ppid).create_time()
    except Exception:  # noqa: BLE001 - the stamp is only a name
        pass
    stamp = _dt.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.getcwd(), "gradprobe_runs", f"{stamp}-torchrun-{ppid}")


def default_logdir() -> str:
    """``./gradprobe_runs/<date>-<time>-<pid>`` (a suffix if it exists): not created here."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(os.getcwd(), "gradprobe_runs")
    path = os.path.join(base, f"{stamp}-{os.getpid()}")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(base, f"{stamp}-{os.getpid()}-{k}")
    return path


def _runpy_filenames() -> set[str]:
    import runpy

    names = {os.path.abspath(__file__)}
    code = getattr(getattr(runpy, "_run_code", None), "__code__", None)
    if code is not None:
        names.add(code.co_filename)
    if getattr(runpy, "__file__", None):
        names.add(runpy.__file__)
    return names


def _gradprobe_dir() -> str:
    import gradprobe

    return os.path.dirname(os.path.abspath(gradprobe.__file__)) + os.sep


def trim_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback as Python would print it for the script alone.

    Drops the leading frames of the runner and ``runpy`` (the traceback starts at the
    script) and the frames of gradprobe's pass-through wrappers in between (the patched
    ``torch.autograd.backward``, hooks), unless the exception was raised by gradprobe
    itself (its innermost frame is gradprobe's, e.g. ``--memory-limit``'s MemoryError):
    then every frame stays, so a fault of gradprobe's is never hidden.
    """
    ours = _runpy_filenames()
    while tb is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    entries: list[types.TracebackType] = []
    t = tb
    while t is not None:
        entries.append(t)
        t = t.tb_next
    if not entries:
        return None
    gp = _gradprobe_dir()
    if entries[-1].tb_frame.f_code.co_filename.startswith(gp):
        return tb
    kept = [e for e in entries if not e.tb_frame.f_code.co_filename.startswith(gp)]
    if len(kept) == len(entries):
        return tb
    try:
        for a, b in zip(kept, kept[1:]):
            a.tb_next = b
        kept[-1].tb_next = None
    except (AttributeError, TypeError):  # read-only tb_next (very old Pythons): keep all
        return tb
    return kept[0]


def _clean_exception(exc: BaseException) -> None:
    """:func:`trim_traceback` on ``exc`` and the exceptions it chains to."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = trim_traceback(e.__traceback__)
        todo.extend([e.__cause__, e.__context__])


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame in the user's own code (not the standard
    library, not an installed package, not gradprobe), else the innermost frame."""
    import sysconfig

    skip = [_gradprobe_dir()]
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            skip.append(os.path.join(p, ""))
    tb = exc.__traceback__
    last = best = None
    while tb is not None:
        fn = tb.tb_frame.f_code.co_filename
        last = tb
        if not fn.startswith("<") and not fn.startswith(tuple(skip)) and "site-packages" not in fn and "dist-packages" not in fn:
            best = tb
        tb = tb.tb_next
    pick = best or last
    if pick is None:
        return None
    return f"{pick.tb_frame.f_code.co_filename}:{pick.tb_lineno}"


def _raised_through_backward(exc: BaseException) -> bool:
    """True if ``exc`` came out of gradprobe's ``torch.autograd.backward`` wrapper, which
    already recorded it as an ``exception`` event."""
    try:
        from gradprobe.probe import patches
    except Exception:  # noqa: BLE001
        return False
    pfile = patches.__file__
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "backward" and code.co_filename == pfile:
            return True
        tb = tb.tb_next
    return False


def _probe_source_dirs() -> tuple[str, ...]:
    import gradprobe

    root = os.path.dirname(os.path.abspath(gradprobe.__file__))
    return (os.path.join(root, "probe") + os.sep, os.path.join(root, "runlog") + os.sep, os.path.join(root, "_guard.py"))


def _inside_probe(frame: types.FrameType | None) -> bool:
    """True if the interrupted code is gradprobe's recorder (its state may be half-updated)."""
    dirs = _probe_source_dirs()
    while frame is not None:
        if frame.f_code.co_filename.startswith(dirs):
            return True
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------- runner -----
_ACTIVE: list["ScriptRunner"] = []


def _after_fork_in_child() -> None:
    for r in list(_ACTIVE):
        r._forked_child()
    _ACTIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ScriptRunner:
    """Runs one script (or module) under an auto probe.

    Args:
        target: from :func:`resolve_target`.
        logdir: run directory (absolute; see :func:`run_logdir`); None for the default.
        config: the probe's :class:`~gradprobe.config.ProbeConfig`.
        memory_limit: bytes; None for no limit.
        stop_on: ``"error"`` or ``"warning"``: stop the run (every watched process of the
            tree) at the step boundary after a final finding of that severity, exit status 3
            (:mod:`gradprobe.live`); ``"never"`` or None: never.
        restore: put ``sys.argv``, ``sys.path[0]`` and ``sys.modules["__main__"]`` back
            when the script ends (in-process use). The CLI leaves the script's in place
            until the process exits, as Python does.
        run_info: extra metadata for the run log.
        children: watch every Python process the script starts (:mod:`gradprobe.tree`);
            False watches this process only.

    Use :meth:`run` once; :meth:`report` is the report of the whole process tree afterwards
    (:attr:`probe` is this process's own probe).
    """

    def __init__(
        self,
        target: Target,
        *,
        logdir: str | None = None,
        config: Any = None,
        memory_limit: int | None = None,
        stop_on: str | None = None,
        restore: bool = True,
        run_info: dict[str, Any] | None = None,
        children: bool = True,
    ) -> None:
        self.target = target
        self.logdir = logdir if logdir is not None else default_logdir()
        self.children = children
        self.tree: Any = None
        self.runs: list[Any] = []
        self.config = config
        self.memory_limit = memory_limit
        self.stop_on = check_stop_on(stop_on)
        self.restore = restore
        self.run_info = dict(run_info or {})
        self.probe: Any = None
        self.pid = os.getpid()
        self.main_module: types.ModuleType | None = None
        self.signals: SignalChain | None = None
        self._saved: tuple[list[str], list[str], Any] | None = None
        self._code: Any = None
        self._last_outcome: Outcome | None = None
        self._spec: Any = None

    # ---- public --------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Runs the script to its end; never lets the script's exception escape.

        Raises:
            RunnerError: the probe could not be started (nothing of the script ran).
        """
        self._saved = (list(sys.argv), list(sys.path), sys.modules.get("__main__"))
        try:
            early = self._prepare()
            if early is not None:
                return early
            self._start_tree()
            self._start_probe()
            _ACTIVE.append(self)
            self.signals = SignalChain(self)
            self.signals.install()
            try:
                try:
                    self._execute()
                finally:
                    self._stop_interception()
            except BaseException as exc:  # noqa: BLE001 - the script's, reported and kept
                outcome = self._outcome_of(exc)
            else:
                outcome = Outcome(0, "returned")
            return self._finish(outcome)
        finally:
            self._stop_interception()
            if self.tree is not None:
                self.tree.stop()  # idempotent: the environment is put back however run() ends
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if self.restore:
                self._restore_sys()

    # ---- before ---------------------------------------------------------------------------
    def _prepare(self) -> Outcome | None:
        """argv, sys.path[0], a fresh ``__main__``; compiles the script. Returns an Outcome
        if the script cannot start (syntax error, no such module), as Python reports it."""
        t = self.target
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        main.__dict__["__annotations__"] = {}
        if t.kind == "file":
            path0 = os.path.dirname(os.path.realpath(t.name))
            filename = t.name if os.path.isabs(t.name) else os.path.join(os.getcwd(), t.name)
            sys.argv[:] = [t.name, *t.args]
            self._set_path0(path0)
            main.__file__ = filename
            main.__cached__ = None  # type: ignore[attr-defined]
            main.__loader__ = importlib.machinery.SourceFileLoader("__main__", filename)
            main.__spec__ = None
            main.__package__ = None
            self.main_module = main
            sys.modules["__main__"] = main
            try:
                if filename.endswith((".pyc", ".pyo")):
                    self._code = None  # runpy.run_path handles compiled scripts
                else:
                    with io.open_code(filename) as f:
                        source = f.read()
                    # dont_inherit: the script must not get this module's __future__ flags
                    self._code = compile(source, filename, "exec", dont_inherit=True)
            except BaseException as exc:  # noqa: BLE001 - SyntaxError & co, as Python shows them
                return self._not_started(exc)
            return None
        if t.kind == "main_dir":
            sys.argv[:] = [t.name, *t.args]
            self._set_path0(os.path.abspath(t.name))
            self.main_module = main
            sys.modules["__main__"] = main
            return None
        # -m: Python imports the module's parents and finds its code before running it
        import runpy

        sys.argv[:] = ["-m", *t.args]
        self._set_path0(os.getcwd())
        get_details = getattr(runpy, "_get_module_details", None)
        err_cls = getattr(runpy, "_Error", ImportError)
        if get_details is not None:
            try:
                _, self._spec, self._code = get_details(t.name, err_cls)
            except err_cls as exc:
                sys.stderr.write(f"{sys.executable}: {exc}\n")
                sys.stderr.flush()
                return Outcome(1, "exit", exception=exc, started=False)
            except BaseException as exc:  # noqa: BLE001 - an error while importing its package
                return self._not_started(exc)
            sys.argv[0] = self._spec.origin or t.name
        self.main_module = main
        sys.modules["__main__"] = main
        return None

    def _not_started(self, exc: BaseException) -> Outcome:
        if isinstance(exc, SystemExit):
            return Outcome(self._exit_status(exc), "exit", exception=exc, started=False)
        if isinstance(exc, KeyboardInterrupt):
            self._print_exception(exc)
            return Outcome(1, "keyboard_interrupt", signum=signal.SIGINT, exception=exc, started=False)
        self._print_exception(exc)
        return Outcome(1, "exception", exception=exc, started=False)

    def _set_path0(self, path0: str) -> None:
        if sys.flags.safe_path if hasattr(sys.flags, "safe_path") else False:
            return  # python -P / PYTHONSAFEPATH: Python prepends nothing either
        if not sys.path:
            sys.path.append(path0)
            return
        old = sys.path[0]
        sys.path[0] = path0
        if old != path0 and not self._gradprobe_importable():
            # gradprobe runs from a source tree found through the old sys.path[0]: keep it
            # reachable for the report's lazy imports, at the end where it shadows nothing
            sys.path.append(old)

    @staticmethod
    def _gradprobe_importable() -> bool:
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                continue
            find = getattr(finder, "find_spec", None)
            try:
                if find is not None and find("gradprobe", None) is not None:
                    return True
            except Exception:  # noqa: BLE001
                continue
        try:
            return importlib.machinery.PathFinder.find_spec("gradprobe", sys.path) is not None
        except Exception:  # noqa: BLE001
            return True

    def _start_tree(self) -> None:
        """The log directory and the start-up hook that watches the script's children."""
        from gradprobe import subprocess_hook
        from gradprobe.tree import ProcessTree

        subprocess_hook.disable()  # a gradprobe run started inside another's tree runs its own
        config = self.config
        if self.memory_limit is not None:  # each child is held to it too, by its own probe
            import dataclasses

            from gradprobe.config import ProbeConfig

            config = dataclasses.replace(config or ProbeConfig(), memory_limit=self.memory_limit)
            self.config = config  # this process's probe too
        if self.stop_on != "never":  # every child decides from its own log, as this process does
            import dataclasses

            from gradprobe.config import ProbeConfig

            config = dataclasses.replace(config or ProbeConfig(), stop_on=self.stop_on)
            self.config = config
        tree = ProcessTree(self.logdir, config)
        try:
            tree.start()
        except OSError as exc:
            tree.stop()
            raise RunnerError(f"cannot write the run log in {exc.filename or self.logdir}: {exc.strerror or exc}") from None
        if not self.children:
            tree.stop()
            tree = ProcessTree(self.logdir, config)  # this process only: no hook
        self.tree = tree

    def _start_probe(self) -> None:
        from gradprobe.probe.core import Probe

        t = self.target
        info: dict[str, Any] = {
            "argv": list(sys.argv),
            "run": {
                "target": t.name,
                "kind": t.kind,
                "args": list(t.args),
                "cwd": os.getcwd(),
                "python": sys.executable,
                "memory_limit": self.memory_limit,
                "stop_on": self.stop_on,
            },
        }
        info.update(self.run_info)
        info.update(self.tree.run_info)
        self.probe = Probe([], auto=True, logdir=self.logdir, config=self.config, run_info=info, layout=self.tree.layout())
        if self.probe.stopper is not None:
            self.probe.stopper.announce = False  # the summary line says it, before the report

    # ---- during ---------------------------------------------------------------------------
    def _execute(self) -> None:
        import runpy

        t = self.target
        main = self.main_module
        assert main is not None
        if t.kind == "file":
            if self._code is None:
                runpy.run_path(t.name, run_name="__main__")
                return
            exec(self._code, main.__dict__)  # noqa: S102 - running the user's script is the job
        elif t.kind == "main_dir":
            runpy._run_module_as_main("__main__", alter_argv=False)  # type: ignore[attr-defined]
        elif self._code is not None:
            runpy._run_code(self._code, main.__dict__, None, "__main__", self._spec)  # type: ignore[attr-defined]
        else:  # a Python without runpy's internals
            runpy.run_module(t.name, run_name="__main__", alter_sys=True)

    def _on_signal(self, signum: int, frame: Any, *, flush: bool = True) -> None:
        """A handled signal arrived in the main thread: log it and, unless the recorder was
        interrupted mid-update, hand the recorded steps to disk (the script's handler may
        end the process with ``os._exit``)."""
        probe = self.probe
        if probe is None:
            return
        try:
            probe.writer.put_event({"kind": "signal", "signal": signal_name(signum), "step": int(probe.step), "wall_time": time.time()})
            if flush and not _inside_probe(frame):
                probe.flush(timeout=5.0)
        except Exception:  # noqa: BLE001 - never in the way of the script's handler
            pass

    def _stop_interception(self) -> None:
        if self.signals is not None:
            self.signals.uninstall()

    def _forked_child(self) -> None:
        if self.signals is not None:
            self.signals.uninstall(child=True)

    # ---- after ----------------------------------------------------------------------------
    @staticmethod
    def _exit_status(exc: SystemExit) -> int:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        try:
            sys.stderr.write(f"{code}\n")  # Python prints a non-integer exit code
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        return 1

    def _print_exception(self, exc: BaseException) -> None:
        """Prints ``exc`` the way Python prints an uncaught exception (``sys.excepthook``),
        starting at the script's own frames."""
        _clean_exception(exc)
        tb = exc.__traceback__
        _flush_std()
        hook = sys.excepthook
        try:
            hook(type(exc), exc, tb)
        except BaseException as hook_exc:  # noqa: BLE001 - as Python does when the hook fails
            try:
                sys.stderr.write("Error in sys.excepthook:\n")
                sys.__excepthook__(type(hook_exc), hook_exc, hook_exc.__traceback__)
                sys.stderr.write("\nOriginal exception was:\n")
                sys.__excepthook__(type(exc), exc, tb)
            except Exception:  # noqa: BLE001
                pass
        _flush_std()

    def _outcome_of(self, exc: BaseException) -> Outcome:
        if isinstance(exc, RunStopped):  # a SystemExit: its record says more than a traceback
            _flush_std()
            return Outcome(EXIT_STOPPED, "stopped", exception=exc, stopped={**exc.decision.to_json(), "run": "script"})
        if isinstance(exc, SystemExit):
            return Outcome(self._exit_status(exc), "exit", exception=exc)
        if isinstance(exc, ScriptTerminated):
            _flush_std()
            return Outcome(128 + exc.signum, "signal", signum=exc.signum, exception=exc)
        self._record_exception(exc)
        loc = user_location(exc)
        self._print_exception(exc)
        if isinstance(exc, KeyboardInterrupt):
            out = Outcome(128 + signal.SIGINT, "keyboard_interrupt", signum=signal.SIGINT, exception=exc)
        else:
            out = Outcome(1, "exception", exception=exc)
        out.location = loc
        # release the frames' locals (tensors, graphs) before the report is built
        try:
            traceback.clear_frames(exc.__traceback__)
        except Exception:  # noqa: BLE001
            pass
        return out

    def _record_exception(self, exc: BaseException) -> None:
        probe = self.probe
        if probe is None or isinstance(exc, KeyboardInterrupt) or _raised_through_backward(exc):
            return
        probe.record_exception(exc, "script")

    def _finish(self, outcome: Outcome) -> Outcome:
        if outcome.how != "signal":
            _join_threads()  # Python waits for non-daemon threads before it exits
        probe = self.probe
        outcome.logdir = self.logdir
        self._last_outcome = outcome
        if probe is None:
            return outcome
        exc = outcome.exception
        event: dict[str, Any] = {
            "kind": "script_end",
            "how": outcome.how,
            "status": outcome.status if outcome.signum is None else 128 + outcome.signum,
            "step": int(probe.step),
            "wall_time": time.time(),
        }
        if outcome.signum is not None:
            event["signal"] = signal_name(outcome.signum)
        if exc is not None and outcome.how in ("exception", "keyboard_interrupt"):
            event["exception"] = type(exc).__name__
            event["message"] = str(exc)[:500]
            if outcome.location:
                event["location"] = outcome.location
        if probe.memory.hit:
            event["memory_limit"] = probe.memory.limit
        try:
            probe.writer.put_event(event)
        except Exception:  # noqa: BLE001
            pass
        try:
            probe.close()
        except Exception as close_exc:  # noqa: BLE001 - the script's status matters more
            sys.stderr.write(f"gradprobe: closing the run log failed ({type(close_exc).__name__}: {close_exc})\n")
        self.tree.stop()
        from gradprobe.tree_report import find_runs, wait_for_children

        wait_for_children(self.tree.tree_dir, self.tree.token)  # children the script did not join
        self.runs = find_runs(self.tree.tree_dir, self.tree.token)
        outcome.steps = sum(r.steps for r in self.runs)
        self._child_stop(outcome)
        return outcome

    def _child_stop(self, outcome: Outcome) -> None:
        """A watched child (a torchrun rank, an ``mp.spawn`` worker) that ``--stop-on``
        stopped exits 3, and the launcher in the script fails with it: the script's failure
        is then that stop, and the run ends with status 3 too. A script that handled the
        child's exit and ended well keeps its status."""
        if outcome.how not in ("exception", "exit") or not outcome.failed:
            return
        stops = [(r, r.meta["stopped"]) for r in self.runs
                 if isinstance(r.meta.get("stopped"), dict) and r.meta.get("pid") != os.getpid()]
        if not stops:
            return
        run, stop = min(stops, key=lambda rs: float(rs[1].get("wall_time") or 0.0))
        outcome.how = "stopped"
        outcome.status = EXIT_STOPPED
        outcome.stopped = {**stop, "run": run.label}

    def report(self) -> Any:
        """One report for every run of the process tree (an empty tree: what was seen
        instead of a training step); None when the script never started."""
        from gradprobe import tree_report

        if self.tree is None:
            return None
        if not self.runs:
            meta = getattr(self.probe, "meta", {}) if self.probe is not None else {}
            seen = tree_report.observations(self._last_outcome, meta, self.tree)
            return tree_report.empty_report(self.tree.tree_dir, seen)
        report = tree_report.analyze_tree(self.tree.tree_dir, self.runs)
        # the findings as TensorBoard text: in this process's own run, else the first run
        own = next((r.path for r in self.runs if r.meta.get("pid") == os.getpid()), self.runs[0].path)
        from gradprobe.runlog.tensorboard import write_findings

        write_findings(own, report)
        return report

    def _restore_sys(self) -> None:
        if self._saved is None:
            return
        argv, path, main = self._saved
        sys.argv[:] = argv
        sys.path[:] = path
        if main is not None:
            sys.modules["__main__"] = main
        self._saved = None


def _flush_std() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            if s is not None:
                s.flush()
        except Exception:  # noqa: BLE001 - a closed stream is the script's business
            pass


def _join_threads() -> None:
    me = threading.current_thread()
    try:
        for t in threading.enumerate():
            if t is me or t.daemon or not t.is_alive() or isinstance(t, threading._DummyThread):  # type: ignore[attr-defined]
                continue
            t.join()
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, report
        pass


def build_report(runner: "ScriptRunner") -> Any:
    """The report of a finished run's whole process tree (analyzed from disk)."""
    return runner.report()


def exit_like(outcome: Outcome) -> NoReturn:
    """Leaves the process the way Python would have after the script.

    A status is passed to ``sys.exit``. After ``KeyboardInterrupt`` Python runs its exit
    handlers and then kills itself with SIGINT (so the parent shell stops too); after
    SIGTERM the process dies by SIGTERM without them, as with the default disposition.
    """
    if outcome.signum is None:
        _flush_std()
        sys.exit(outcome.status)
    signum = outcome.signum
    if signum == signal.SIGINT:
        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
    _flush_std()
    try:
        _REAL_SIGNAL(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1.0)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(128 + signum)


def run_script(
    name: str,
    args: list[str] | None = None,
    *,
    module: bool = False,
    logdir: str | None = None,
    config: Any = None,
    memory_limit: int | None = None,
    stop_on: str | None = None,
    restore: bool = True,
) -> tuple[Outcome, Any]:
    """Runs a script in this process under an auto probe; returns (outcome, report or None).

    The in-process counterpart of ``gradprobe run`` (no exit, no printing of the report).
    """
    target = resolve_target(name, list(args or []), module=module)
    runner = ScriptRunner(target, logdir=run_logdir(logdir), config=config, memory_limit=memory_limit, stop_on=stop_on,
                          restore=restore)
    outcome = runner.run()
    report = build_report(runner) if outcome.started else None
    return outcome, report


__all__ = [
    "HANDLED_SIGNALS",
    "Outcome",
    "RunnerError",
    "ScriptRunner",
    "ScriptTerminated",
    "SignalChain",
    "Target",
    "build_report",
    "exit_like",
    "parse_size",
    "resolve_target",
    "run_logdir",
    "run_script",
]
