"""Which steps get the sampled (deep) probes.

A schedule is a small named object, as in Cockpit: ``every`` steps in steady state, plus a
log-spaced burst early in the run so that step-0 problems (initialisation, input scale) and
the first hundred steps (scaler calibration, warmup) are always sampled. The average cost of
the deep probes is therefore about ``1/every`` of their per-sample cost, plus a constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schedule:
    """Steps on which the sampled probes run.

    Args:
        every: interval in steady state (0 disables the periodic samples).
        early_until: the log-spaced burst covers steps below this.
        per_decade: log-spaced samples per factor of 10 in the burst.
    """

    every: int = 50
    early_until: int = 200
    per_decade: int = 6
    _early: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        early = {0, 1, 2, 3}
        x = 1.0
        ratio = 10 ** (1.0 / max(self.per_decade, 1))
        while x < self.early_until:
            early.add(int(round(x)))
            x *= ratio
        object.__setattr__(self, "_early", frozenset(s for s in early if s < self.early_until))

    def __contains__(self, step: int) -> bool:
        if step in self._early:
            return True
        return self.every > 0 and step % self.every == 0

    def steps_until(self, n: int) -> list[int]:
        """All scheduled steps below ``n`` (for tests and docs)."""
        return [s for s in range(n) if s in self]
