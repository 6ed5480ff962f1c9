"""Probe configuration: what is recorded and how often.

Profiles are presets (Cockpit's idea): ``"default"`` records every per-step signal
(docs/run-log.md) and the deep probes on the sampling schedule; ``"light"`` turns the deep probes
off; ``"full"`` samples every step (slow, for short debugging runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gradprobe.schedule import Schedule


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of one probe.

    Args:
        schedule: steps that get the sampled probes.
        deep: run the sampled deep probes (update ratios, activations, data stats,
            gradient-through-time profiles).
        flush_seconds: longest time a closed step waits on the training thread before it is
            handed to the writer (a kill loses at most about this much).
        flush_steps: hand over at least every this many steps.
        tensorboard: also write TensorBoard event files with the gradprobe dashboard.
        tb_layers_every: per-layer gradient norms go to TensorBoard on sampled steps and
            every this many steps (the run log always has every step).
        bptt_projections: random projections averaged in the gradient-through-time profile.
        bptt_batch: sequences of the batch used by the side computation.
        age_walk_nodes: most autograd nodes walked to date a tensor made outside modules.
        memory_limit: bytes of process memory (RSS on CPU, allocated on CUDA) above which
            the probe raises MemoryError into the script at the next step boundary, and at
            every one after while memory stays above it (``gradprobe run --memory-limit``,
            for every process of the tree; :mod:`gradprobe.probe.memory`); None for no limit.
        stop_on: ``"error"`` or ``"warning"``: stop the run at the next step boundary after
            a *final* finding of at least that severity (one further training cannot undo),
            by raising :class:`gradprobe.RunStopped` (``gradprobe run --stop-on``, for every
            process of the tree; :mod:`gradprobe.live`); ``"never"`` (default) never stops.
            Closed steps are then handed to the writer after ``gradprobe.live.STOP_FLUSH_STEPS``
            (16) steps, the bound doubling up to ``STOP_FLUSH_STEPS_MAX`` (256) (the checks see a
            step once it is written).
    """

    schedule: Schedule = field(default_factory=Schedule)
    deep: bool = True
    flush_seconds: float = 0.5
    flush_steps: int = 512
    tensorboard: bool = True
    tb_layers_every: int = 10
    bptt_projections: int = 3
    bptt_batch: int = 8
    age_walk_nodes: int = 12
    memory_limit: int | None = None
    stop_on: str = "never"

    @classmethod
    def profile(cls, name: str, **overrides: object) -> "ProbeConfig":
        if name == "default":
            base = cls()
        elif name == "light":
            base = cls(deep=False)
        elif name == "full":
            base = cls(schedule=Schedule(every=1))
        else:
            raise ValueError(f"unknown profile {name!r} (default, light, full)")
        return replace(base, **overrides)  # type: ignore[arg-type]
