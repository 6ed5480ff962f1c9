"""Update-to-weight ratios: how far each optimizer step moves the weight matrices relative to
their own size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity

#: The update-to-weight ratio ||dW|| / ||W|| per optimizer step at which training usually
#: moves steadily: each step changes a weight matrix by about a thousandth of its size, so a
#: few thousand steps can move it by its own scale, and no single step can overshoot. GP501 and
#: GP502 act only a decade or more away from it, and only together with evidence in the loss.
TARGET_UPDATE_RATIO = 1e-3


def init_scale_norm(shape: list[int] | tuple[int, ...]) -> float:
    """A floor for the norm of a weight tensor of this shape: half the norm of a unit-gain
    Xavier initialisation, 0.5 * sqrt(out * in / (out + in)) (the receptive field cancels for
    kernels). Every standard initialisation (PyTorch's default, Xavier, Kaiming, the recurrent
    layers') gives a larger norm; weights below it were initialised (or shrunk) far below any
    design scale."""
    if len(shape) < 2:
        return 0.0
    o, i = float(shape[0]), float(shape[1])
    return 0.5 * math.sqrt(o * i / (o + i)) if o + i > 0 else 0.0


@quantity
def update_ratios(ctx: RunContext) -> pd.DataFrame:
    """Sampled update-to-weight ratios, one row per sampled step, one column per parameter:
    ||dW|| / max(||W||, :func:`init_scale_norm`). Only weight matrices and kernels (two or more
    dimensions) when the run has any: biases and normalisation gains have small norms (a
    zero-initialised bias has an infinite ratio on its first step) and are not what the
    learning rate is tuned for. The floor keeps weights initialised far below any design
    scale (xavier gain 0.001) from reading as huge relative steps: a step of lr on a weight of
    1e-3 is the weights growing back to size, not overshooting. Parameters that never moved
    (ratio 0 on every sample: frozen, or unused) are dropped."""
    s = ctx.samples("update", "ratio")
    if s.empty:
        return pd.DataFrame()
    t = s.assign(target=s["target"].astype(str)).pivot_table(index="step", columns="target", values="value", aggfunc="max")
    t = t.replace([np.inf, -np.inf], np.nan)
    matrix = [col for col in t.columns if len(ctx.layer_info.get(col, {}).get("shape") or []) >= 2]
    if matrix:
        t = t[matrix]
    moving = [col for col in t.columns if (t[col].fillna(0) > 0).any()]
    t = t[moving].sort_index()
    lw = ctx.log.layer_weight
    for col in t.columns:
        floor = init_scale_norm(ctx.layer_info.get(col, {}).get("shape") or [])
        if floor <= 0 or col not in lw.columns:
            continue
        w = lw[col].reindex(t.index).to_numpy(dtype=np.float64)
        ok = np.isfinite(w) & (w > 0) & (w < floor)
        if ok.any():
            vals = t[col].to_numpy(dtype=np.float64).copy()
            vals[ok] = vals[ok] * w[ok] / floor
            t[col] = vals
    return t



@quantity
def update_ratio_by_step(ctx: RunContext) -> pd.Series:
    """Median over parameters of :func:`update_ratios` per sampled step (finite, > 0)."""
    t = update_ratios(ctx)
    if t.empty:
        return pd.Series([], dtype=np.float64)
    med = t.where(t > 0).median(axis=1, skipna=True)
    return med[np.isfinite(med) & (med > 0)]

