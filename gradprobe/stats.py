"""Statistics shared by the recorder, the rules and the renderers (one definition each)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

HORIZON_FRACTION = 1e-3


def bptt_summary(profile: Sequence[float], fraction: float = HORIZON_FRACTION) -> dict[str, float]:
    """Summarises a gradient-through-time profile.

    Args:
        profile: ``profile[k]`` = norm of d(v·h_T)/d(x_{T-1-k}), the gradient reaching the
            input k steps before the output, averaged over random projections v.
        fraction: the horizon threshold relative to the peak.

    Returns:
        ``horizon``: the first k at or after the peak where the profile falls below
        ``fraction * peak`` (the number of steps gradients actually carry); equals the
        window length ``lookback`` if it never falls that low.
        ``reaches_end``: 1.0 if the gradient never falls below the threshold in the window.
        ``growth_per_step``: exp of the least-squares slope of ln(profile) against k, i.e.
        the factor the gradient is multiplied by per step back in time (> 1: exploding
        through time, < 1: vanishing).
        ``far_over_near``: mean of the farthest 10% of the window over the nearest 10%.
        ``lookback``: the window length T.
    """
    p = np.asarray(profile, dtype=np.float64)
    T = int(p.size)
    out = {"lookback": float(T), "horizon": float("nan"), "reaches_end": float("nan"),
           "growth_per_step": float("nan"), "far_over_near": float("nan")}
    if T == 0:
        return out
    finite = np.isfinite(p)
    if not finite.any():
        return out
    q = np.where(finite, p, np.nan)
    peak_at = int(np.nanargmax(q))
    peak = float(q[peak_at])
    if peak <= 0:
        out.update(horizon=0.0, reaches_end=0.0)
        return out
    below = np.where(np.nan_to_num(q[peak_at:], nan=np.inf) < fraction * peak)[0]
    if below.size:
        out["horizon"] = float(peak_at + below[0])
        out["reaches_end"] = 0.0
    else:
        out["horizon"] = float(T)
        out["reaches_end"] = 1.0
    pos = finite & (p > 0)
    k = np.arange(T, dtype=np.float64)
    if pos.sum() >= 2:
        slope = np.polyfit(k[pos], np.log(p[pos]), 1)[0]
        out["growth_per_step"] = float(math.exp(max(min(slope, 50.0), -50.0)))
    m = max(1, T // 10)
    near = np.nanmean(q[:m])
    far = np.nanmean(q[-m:])
    if near > 0 and np.isfinite(near) and np.isfinite(far):
        out["far_over_near"] = float(far / near)
    return out
