"""How a watched script can be stopped early by a signal, and still be reported.

SIGINT keeps Python's own handler; for SIGTERM, whose default action kills the process
before anything can be written, a handler raises :class:`ScriptTerminated` in the main
thread, so the script unwinds and the run is reported before the process dies by that
signal. The script's own handlers keep working (see :class:`SignalChain`).

The other early stop, ``--memory-limit``, is the probe's own (one path for every process of
the tree: :mod:`gradprobe.probe.memory`).

Split from :mod:`gradprobe.runner`, which uses it (and re-exports these names).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradprobe.runner import ScriptRunner

HANDLED_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)


class ScriptTerminated(BaseException):
    """Raised in the script's main thread when SIGTERM (or another fatal signal whose
    disposition is the default) arrives, so that the script unwinds and the run is
    reported before the process dies by that signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal_name(self.signum)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------- signals -----
class SignalChain:
    """Keeps the script's SIGINT/SIGTERM handlers working while gradprobe gets to flush.

    While installed, ``signal.signal`` and ``signal.getsignal`` are wrapped for the handled
    signals: the script's handler (the *virtual* one) is what ``getsignal`` returns and
    what runs; the real disposition is a dispatcher that first hands the recorded steps to
    disk, then calls it. A default disposition becomes :meth:`_terminate` (raise
    :class:`ScriptTerminated`, so the run is reported), ``SIG_IGN`` stays a real ignore,
    Python's ``default_int_handler`` stays itself (``KeyboardInterrupt`` is reported on the
    way out anyway).
    """

    def __init__(self, runner: "ScriptRunner") -> None:
        self.runner = runner
        self.pid = os.getpid()
        self.virtual: dict[int, Any] = {}
        self._orig_signal = signal.signal
        self._orig_getsignal = signal.getsignal
        self._wrappers: tuple[Any, Any] = (None, None)
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in HANDLED_SIGNALS:
            self.virtual[s] = self._orig_getsignal(s)
        for s in HANDLED_SIGNALS:
            h = self.virtual[s]
            if h is None:
                continue  # installed from C: leave it alone
            real = self._real_for(s, h)
            if real is not h:
                self._orig_signal(s, real)
        self._wrappers = (self.signal, self.getsignal)  # bound once: identity checks below
        signal.signal = self._wrappers[0]  # type: ignore[assignment]
        signal.getsignal = self._wrappers[1]  # type: ignore[assignment]
        self.installed = True

    def uninstall(self, *, child: bool = False) -> None:
        """Puts the script's own dispositions in place and unwraps ``signal``."""
        if not self.installed:
            return
        self.installed = False
        if signal.signal is self._wrappers[0]:  # type: ignore[comparison-overlap]
            signal.signal = self._orig_signal
        if signal.getsignal is self._wrappers[1]:  # type: ignore[comparison-overlap]
            signal.getsignal = self._orig_getsignal
        for s, h in self.virtual.items():
            if h is None:
                continue
            try:
                self._orig_signal(s, h)
            except (ValueError, OSError, TypeError):
                pass

    # ---- the wrapped module functions ---------------------------------------------------
    def signal(self, signalnum: int, handler: Any) -> Any:
        if (
            signalnum not in self.virtual
            or os.getpid() != self.pid
            or not (callable(handler) or handler in (signal.SIG_IGN, signal.SIG_DFL))
        ):
            return self._orig_signal(signalnum, handler)
        previous = self.virtual[signalnum]
        self._orig_signal(signalnum, self._real_for(signalnum, handler))  # validates like Python
        self.virtual[signalnum] = handler
        return previous

    def getsignal(self, signalnum: int) -> Any:
        if signalnum in self.virtual and os.getpid() == self.pid:
            return self.virtual[signalnum]
        return self._orig_getsignal(signalnum)

    # ---- real dispositions --------------------------------------------------------------
    def _real_for(self, signum: int, handler: Any) -> Any:
        if handler is signal.default_int_handler:
            return handler
        if handler == signal.SIG_IGN:
            return signal.SIG_IGN
        if handler == signal.SIG_DFL:
            return self._terminate
        return self._dispatch

    def _as_child(self, signum: int, frame: Any) -> None:
        """A forked child inherited our disposition: behave as the script's would."""
        h = self.virtual.get(signum, signal.SIG_DFL)
        if callable(h):
            h(signum, frame)
            return
        if h == signal.SIG_IGN:
            return
        self._orig_signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _dispatch(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            self._as_child(signum, frame)
            return
        self.runner._on_signal(signum, frame)
        h = self.virtual.get(signum)
        if callable(h):
            h(signum, frame)

    def _terminate(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            self._as_child(signum, frame)
            return
        # a second signal of this kind kills at once, as the default would have
        try:
            self._orig_signal(signum, signal.SIG_DFL)
        except (ValueError, OSError):
            pass
        self.runner._on_signal(signum, frame, flush=False)
        raise ScriptTerminated(signum)


__all__ = ["HANDLED_SIGNALS", "ScriptTerminated", "SignalChain", "signal_name"]
