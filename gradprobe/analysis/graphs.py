"""Graphs that outlive their step: how backward time and memory move with the step (THE
definition of a growing graph's footprint the GP1xx rules share)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradprobe.analysis.context import RunContext
from gradprobe.analysis.numeric import trend

#: A footprint "grows" with the step when it is rank-correlated with the step (Spearman >=
#: this) and backward time at least ``GROWS_TIME_FACTOR``x from the first to the last
#: quarter, or memory up by ``GROWS_MEMORY_BYTES``. 0.7 is a trend that steady noise does
#: not make over more than a handful of steps; 1.5x and 1 MiB are the smallest growths the
#: timers and RSS resolve above their jitter on a step of a few milliseconds.
GROWS_SPEARMAN = 0.7
GROWS_TIME_FACTOR = 1.5
GROWS_MEMORY_BYTES = 2**20


def footprint_growth(ctx: RunContext, rows: np.ndarray) -> dict[str, Any]:
    """Backward-time and memory trends over ``rows`` (evidence of a growing graph):
    ``backward_time_spearman``, ``backward_time_late_over_early``, ``memory_spearman``,
    ``memory_growth_bytes``, where measured (at least 4 rows)."""
    out: dict[str, Any] = {}
    if rows.size < 4:
        return out
    if "timing" in ctx.signals:
        bt = trend(ctx.col("backward_time")[rows], ctx.step[rows])
        out["backward_time_spearman"] = bt.spearman
        out["backward_time_late_over_early"] = bt.late_over_early
    if "memory" in ctx.signals:
        mem = ctx.col("memory")[rows]
        mem = np.where(mem > 0, mem, np.nan)
        tr = trend(mem, ctx.step[rows])
        fin = mem[np.isfinite(mem)]
        out["memory_spearman"] = tr.spearman
        out["memory_growth_bytes"] = float(fin[-1] - fin[0]) if fin.size >= 2 else float("nan")
    return out


def footprint_grows(g: dict[str, Any]) -> bool:
    """Backward time or memory rises with the step (see the ``GROWS_*`` constants)."""
    bt = (g.get("backward_time_spearman", float("nan")) >= GROWS_SPEARMAN
          and g.get("backward_time_late_over_early", 0.0) >= GROWS_TIME_FACTOR)
    mem = (g.get("memory_spearman", float("nan")) >= GROWS_SPEARMAN
           and g.get("memory_growth_bytes", 0.0) >= GROWS_MEMORY_BYTES)
    return bool(bt or mem)
