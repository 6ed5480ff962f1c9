"""gradprobe: a diagnostic gradient-health profiler for PyTorch training.

>>> import gradprobe
>>> with gradprobe.watch(model, optimizer, scaler=scaler, logdir="runs/exp1") as probe:
...     ...  # the unchanged training loop
>>> report = probe.report()
>>> report = gradprobe.analyze("runs/exp1")

The recorder (``watch``, ``Probe``) imports torch; analysis (``analyze``, ``RunLog``,
``Report``) does not, so ``gradprobe analyze`` starts fast and runs where torch is absent.
Every name is loaded on first use, so ``import gradprobe`` costs a few milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradprobe._guard import GradprobeWarning
from gradprobe._version import __version__

if TYPE_CHECKING:
    from gradprobe.config import ProbeConfig
    from gradprobe.live import RunStopped
    from gradprobe.probe.core import Probe, watch
    from gradprobe.report import Finding, Recommendation, Report
    from gradprobe.runlog import LogError, RunLog
    from gradprobe.schedule import Schedule

__all__ = [
    "__version__",
    "watch",
    "analyze",
    "Probe",
    "ProbeConfig",
    "Schedule",
    "RunLog",
    "LogError",
    "GradprobeWarning",
    "RunStopped",
    "Report",
    "Finding",
    "Recommendation",
]

_LAZY = {
    "watch": ("gradprobe.probe.core", "watch"),
    "Probe": ("gradprobe.probe.core", "Probe"),
    "ProbeConfig": ("gradprobe.config", "ProbeConfig"),
    "Schedule": ("gradprobe.schedule", "Schedule"),
    "Report": ("gradprobe.report", "Report"),
    "Finding": ("gradprobe.report", "Finding"),
    "Recommendation": ("gradprobe.report", "Recommendation"),
    # raised at a step boundary when stop_on stops a doomed run (gradprobe.live)
    "RunStopped": ("gradprobe.live", "RunStopped"),
    # the run log reads with pandas (~0.4 s to import): loaded on first use, so neither
    # `gradprobe run` nor a script's `import gradprobe` pays for it before a step is recorded
    "RunLog": ("gradprobe.runlog.runlog", "RunLog"),
    "LogError": ("gradprobe.runlog.runlog", "LogError"),
}


def analyze(path: Any) -> "Report":
    """Analyzes a saved run (a gradprobe run directory, a TensorBoard log, a Hugging Face
    ``trainer_state.json`` or a Lightning ``metrics.csv``) or a :class:`RunLog`.

    Returns:
        A :class:`gradprobe.Report`.

    Raises:
        LogError: the path is not a readable log.
    """
    from gradprobe.engine import analyze as _analyze

    return _analyze(path)


_SUBMODULES = frozenset({"readers", "rules", "engine", "render", "analysis", "report", "integrations", "runlog", "stats", "signals", "verify"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"gradprobe.{name}")
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
