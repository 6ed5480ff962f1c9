"""The recorder: hooks, patches and the step buffer."""

from gradprobe.probe.core import Probe, watch

__all__ = ["Probe", "watch"]
