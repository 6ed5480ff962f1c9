"""gradprobe: a diagnostic gradient-health profiler for PyTorch training.

>>> import gradprobe
>>> with gradprobe.watch(model, optimizer, scaler=scaler, logdir="runs/exp1") as probe:
...     ...  # the unchanged training loop
>>> report = probe.report()
>>> report = gradprobe.analyze("runs/exp1")
"""

from __future__ import annotations

from typing import Any

from gradprobe._guard import GradprobeWarning
from gradprobe._version import __version__
from gradprobe.config import ProbeConfig
from gradprobe.probe.core import Probe, watch
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
    "Report",
    "Finding",
]


def analyze(path: Any) -> Any:
    """Analyzes a saved run (a gradprobe run directory, a TensorBoard log, a Hugging Face
    ``trainer_state.json`` or a Lightning ``metrics.csv``) or a :class:`RunLog`.

    Returns:
        A :class:`gradprobe.Report`.

    Raises:
        LogError: the path is not a readable log.
    """
    from gradprobe.engine import analyze as _analyze

    return _analyze(path)


def __getattr__(name: str) -> Any:
    if name in ("Report", "Finding", "Recommendation"):
        from gradprobe import report

        return getattr(report, name)
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
