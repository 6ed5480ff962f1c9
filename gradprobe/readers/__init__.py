"""Reading logs into a :class:`~gradprobe.runlog.RunLog`, whatever wrote them.

:func:`load` auto-detects the kind of ``path``:

* a gradprobe run directory (``gradprobe.json`` / ``steps.arrow``) -> ``gradprobe``
"""

from __future__ import annotations

import os

from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import is_run_dir


def load(path: str | os.PathLike[str]) -> RunLog:
    """Loads any supported log. Raises :class:`LogError` (one line) if it is not one."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise LogError(f"{p}: no such file or directory")
    if is_run_dir(p):
        return RunLog.load(p)
    if os.path.isdir(p):
        try:
            entries = os.listdir(p)
        except OSError as exc:
            raise LogError(f"{p}: cannot read directory ({exc.strerror})") from None
        if not entries:
            raise LogError(f"{p}: empty directory, no log to analyze")
        raise LogError(f"{p}: no gradprobe run log found in this directory")
    raise LogError(f"{p}: not a recognised log (expected a gradprobe run directory)")
