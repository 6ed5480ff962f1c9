"""Gradients through time, as the recurrent rules and the rules linking to them read them: the
sampled gradient-through-time profiles of each recurrent module (see
:func:`gradprobe.stats.bptt_summary`), and whether gradients grow backwards through time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.loss import healthy_end

#: Gradients explode backwards through time when the far end of the window gets at least 10x
#: the gradient of the near end (``far_over_near``) and each step back multiplies it by more
#: than 1: an order of magnitude is beyond what a window's ordinary unevenness makes.
EXPLODING_FAR_OVER_NEAR = 10.0


@quantity
def bptt_profiles(ctx: RunContext) -> dict[str, pd.DataFrame]:
    """Module -> its sampled gradient-through-time summaries, one row per sampled step (columns
    ``horizon``, ``reaches_end``, ``growth_per_step``, ``far_over_near``, ``lookback``,
    ``hidden_size``...), in step order, restricted to the healthy part of the run
    (:func:`~gradprobe.analysis.loss.healthy_end`) when any sample precedes its end: profiles
    taken after the run diverged are NaN or describe the breakdown."""
    smp = ctx.samples("bptt")
    out: dict[str, pd.DataFrame] = {}
    if smp.empty:
        return out
    end = healthy_end(ctx)
    for module, df in smp.groupby(smp["target"].astype(str)):
        piv = df[df["stat"] != "profile"].pivot_table(index="step", columns="stat", values="value", aggfunc="last")
        if piv.empty or "horizon" not in piv:
            continue
        piv = piv.sort_index()
        if end is not None and (piv.index < end).any():
            piv = piv[piv.index < end]
        out[str(module)] = piv
    return out


def _exploding_rows(piv: pd.DataFrame) -> np.ndarray:
    fon = piv["far_over_near"].to_numpy(dtype=np.float64) if "far_over_near" in piv else np.full(len(piv), np.nan)
    g = piv["growth_per_step"].to_numpy(dtype=np.float64) if "growth_per_step" in piv else np.full(len(piv), np.nan)
    return (np.nan_to_num(fon, nan=0.0) >= EXPLODING_FAR_OVER_NEAR) & (np.nan_to_num(g, nan=0.0) > 1.0)


@quantity
def exploding_through_time(ctx: RunContext) -> int | None:
    """The first sampled step at which some recurrent module's gradient grew backwards through
    time (``far_over_near`` >= 10 with ``growth_per_step`` > 1), None if never."""
    firsts = []
    for piv in bptt_profiles(ctx).values():
        rows = np.flatnonzero(_exploding_rows(piv))
        if rows.size:
            firsts.append(int(piv.index[rows[0]]))
    return min(firsts) if firsts else None


@quantity
def explodes_from_the_first_profile(ctx: RunContext, module: str) -> bool:
    """The module's first sampled profile already grows backwards through time: the
    initialisation or the architecture made it, before the optimizer could."""
    piv = bptt_profiles(ctx).get(module)
    return piv is not None and len(piv) > 0 and bool(_exploding_rows(piv.iloc[:1])[0])
