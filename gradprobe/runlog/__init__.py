"""The run log: what a probe records, on disk and in memory.

The names are loaded on first use: the recorder needs only :mod:`~gradprobe.runlog.schema`
and the writer, and importing :class:`RunLog` (pandas) at ``gradprobe run``'s start would
cost the script's start-up ~0.4 s before a step is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradprobe.runlog.runlog import LogError, RunLog, is_run_dir
    from gradprobe.runlog.schema import MISSING, RUN_SCHEMA

__all__ = ["LogError", "RunLog", "is_run_dir", "MISSING", "RUN_SCHEMA"]

_LAZY = {
    "LogError": "gradprobe.runlog.runlog",
    "RunLog": "gradprobe.runlog.runlog",
    "is_run_dir": "gradprobe.runlog.runlog",
    "MISSING": "gradprobe.runlog.schema",
    "RUN_SCHEMA": "gradprobe.runlog.schema",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'gradprobe.runlog' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
