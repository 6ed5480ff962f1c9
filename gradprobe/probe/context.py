"""What the units of one probe share (and nothing else).

A probe is built from units, each with one job (:mod:`~gradprobe.probe.discovery`,
:mod:`~gradprobe.probe.gradients`, :mod:`~gradprobe.probe.boundary`,
:mod:`~gradprobe.probe.forward`, :mod:`~gradprobe.probe.state_age`,
:mod:`~gradprobe.probe.memory`); :class:`~gradprobe.probe.core.Probe` composes them. What
they all read or write is here: the configuration, the failure guard, the run's metadata and
writer, the step being recorded, whether the probe is live, and the device its statistics
are kept on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gradprobe._guard import Guard
from gradprobe.config import ProbeConfig
from gradprobe.probe.step import OpenStep


class Context:
    """The state shared by one probe's units.

    Attributes:
        open: the step being recorded (replaced by a fresh one when a step closes).
        closed, forked: the probe was closed; this process is a fork of the one it watches
            (a DataLoader worker): nothing is recorded in either case.
        device: where statistics are kept (the first watched parameter's device).
        deep: the sampled deep probes (:class:`~gradprobe.probe.deep.DeepProbes`) or None.
        flush: hands the closed steps to the writer (``flush(force)``), set by the probe.
    """

    __slots__ = ("config", "guard", "auto", "meta", "writer", "open", "closed", "forked", "meta_dirty", "device",
                 "deep", "flush")

    def __init__(self, config: ProbeConfig, guard: Guard, auto: bool, meta: dict[str, Any]) -> None:
        self.config = config
        self.guard = guard
        self.auto = auto
        self.meta = meta
        self.writer: Any = None
        self.open = OpenStep(index=0, sampled=0 in config.schedule)
        self.closed = False
        self.forked = False
        self.meta_dirty = False
        self.device = torch.device("cpu")
        self.deep: Any = None
        self.flush: Callable[..., None] = lambda force=False: None

    def live(self) -> bool:
        return not self.closed and not self.forked

    def event(self, payload: dict[str, Any]) -> None:
        """A rare event (``events.jsonl``)."""
        self.writer.put_event(payload)
