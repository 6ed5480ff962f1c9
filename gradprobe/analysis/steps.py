"""Basic quantities of a run's steps, layers and samples that the other quantities build on:
the warm-up, the scaler's rows, the optimizer family, the per-layer tables in forward order,
the sample tables, the run's own exceptions."""

from __future__ import annotations

import datetime
import math
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.runlog import MISSING

#: The warm-up is the first ``max(1, min(WARMUP_MAX, n // WARMUP_DIVISOR))`` steps: while the
#: weights leave their initialisation, gradient norms, backward time and memory still move
#: with it (the first optimizer step fills Adam's moments, allocators warm up, the loss falls
#: fastest). A tenth of the run, but never more than 50 steps (the longest initial transient
#: of the tiny-to-medium runs this is calibrated on) and at least 1 (the untrained step).
WARMUP_MAX = 50
WARMUP_DIVISOR = 10


@quantity
def warmup_rows(ctx: RunContext) -> int:
    """How many rows the warm-up covers (THE definition every rule uses)."""
    return max(1, min(WARMUP_MAX, ctx.n // WARMUP_DIVISOR))


@quantity
def scaler_rows(ctx: RunContext) -> np.ndarray:
    """Row mask: a GradScaler scaled this step (a scale was recorded)."""
    return np.isfinite(ctx.col("scale_before")) | np.isfinite(ctx.col("scale"))


@quantity
def optimizer_family(ctx: RunContext) -> str | None:
    """How the update scales with the gradient: ``"adaptive"`` (Adam-like: normalised per
    parameter, a uniform rescaling barely changes the step), ``"sgd"`` (SGD-like: the step is
    lr times the gradient), ``"other"`` (LBFGS, Rprop...: line search or signs), None unknown."""
    if ctx.optimizer_class is None:
        return None
    if ctx.adaptive:
        return "adaptive"
    c = ctx.optimizer_class.lower()
    if "sgd" in c or c in ("momentum", "nesterov", "heavyball"):
        return "sgd"
    return "other"


@quantity
def optimizer_eps(ctx: RunContext) -> float:
    """The adaptive optimizer's ``eps`` (PyTorch's default 1e-8 when unknown or not positive)."""
    eps = ctx.hparams.get("eps", 1e-8)
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else 1e-8


@quantity
def total_numel(ctx: RunContext) -> int:
    """Number of trained parameter entries."""
    return int(sum(int(layer.get("numel") or 0) for layer in ctx.layer_info.values()))


@quantity
def layer_grads(ctx: RunContext) -> pd.DataFrame:
    """Per-layer pre-clip gradient norms indexed by step, missing values as NaN and non-finite
    ones as +inf (a NaN norm becomes +inf, so "missing" and "non-finite" stay distinct)."""
    lg = ctx.log.layer_grad
    if lg.empty:
        return lg
    arr = lg.to_numpy(dtype=np.float64, copy=True)
    arr[np.isnan(arr)] = np.inf
    arr[arr == MISSING] = np.nan
    return pd.DataFrame(arr, index=lg.index, columns=lg.columns)


@quantity
def layer_grads_by_row(ctx: RunContext) -> pd.DataFrame:
    """:func:`layer_grads` aligned to the step rows (NaN where a step has no record)."""
    lg = layer_grads(ctx)
    if lg.empty:
        return lg
    return lg.reindex(ctx.step)


@quantity
def layer_forward_order(ctx: RunContext) -> dict[str, float]:
    """Parameter name -> position in the forward pass: the call order of its module in the
    sampled activation statistics where known, else its registration order (after them)."""
    names = list(ctx.log.layer_grad.columns) or list(ctx.layer_info)
    act = ctx.samples("activation", "mean")
    call: dict[str, float] = {}
    if not act.empty:
        first = act[act["step"] == act["step"].min()]
        for target, idx in zip(first["target"].astype(str), first["index"].to_numpy()):
            call[target] = min(call.get(target, np.inf), float(idx))
    order: dict[str, float] = {}
    n = len(names)
    last = -1.0
    for i, name in enumerate(names):
        module = module_of(ctx, name)
        # a module without activation samples (a norm layer...) sits right after the
        # registered layer before it; ties keep the registration order
        pos = call[module] if module in call else last + 0.5
        last = max(last, pos) if module in call else last
        order[name] = pos + i / (n + 1) * 1e-3
    return order


def module_of(ctx: RunContext, param: str) -> str:
    """The module that owns parameter ``param``."""
    return str(ctx.layer_info.get(param, {}).get("module") or param.rsplit(".", 1)[0])


def is_matrix(ctx: RunContext, param: str) -> bool:
    """A weight matrix or kernel (two or more dimensions): what learning rates, gains and
    update ratios are about (biases and norm gains have scales of their own)."""
    return len(ctx.layer_info.get(param, {}).get("shape") or []) >= 2


@quantity
def sample_table(ctx: RunContext, probe: str) -> pd.DataFrame:
    """Samples of ``probe`` one row per (step, target, call), the stats as columns. ``call``
    is the ordinal of the target's calls within the step (a module used twice has calls 0
    and 1)."""
    s = ctx.samples(probe)
    if s.empty:
        return pd.DataFrame()
    s = s.assign(target=s["target"].astype(str), stat=s["stat"].astype(str))
    s = s.assign(occ=s.groupby(["step", "target", "index", "stat"]).cumcount())
    w = s.pivot_table(index=["step", "target", "index", "occ"], columns="stat", values="value", aggfunc="first")
    w = w.reset_index()
    w["call"] = w.sort_values(["step", "target", "index", "occ"]).groupby(["step", "target"]).cumcount()
    return w.sort_values(["step", "index", "occ"]).reset_index(drop=True)


@quantity
def feature_table(ctx: RunContext) -> tuple[str, pd.DataFrame]:
    """The float features where they enter the model: ``(probe, table)`` of the first
    parametric layer's input samples (``first_layer``), else the model's own input, without
    integer token ids and without positional extras (``target[...]``); an empty table when
    there are none. Token ids and embedding lookups are not features."""
    for probe in ("first_layer", "input"):
        w = sample_table(ctx, probe)
        if w.empty or "std" not in w:
            continue
        w = w[~w["target"].str.contains(r"\[", regex=True)]
        if "integer" in w:
            w = w[w["integer"].fillna(0) < 0.5]
        if len(w):
            return probe, w
    return "", pd.DataFrame()


def _run_start(ctx: RunContext) -> float | None:
    created = ctx.meta.get("created")
    if not isinstance(created, str):
        return None
    try:
        return datetime.datetime.fromisoformat(created).timestamp()
    except ValueError:
        return None


@quantity
def run_exceptions(ctx: RunContext) -> list[dict[str, Any]]:
    """``exception`` events of this run. A run directory reused by a later run keeps the
    earlier run's events.jsonl (the recorder appends to it): events stamped before this run's
    ``created`` time (1 s of rounding allowed) belong to an earlier run and are dropped."""
    start = _run_start(ctx)
    out = []
    for e in ctx.events("exception"):
        t = e.get("wall_time")
        if start is not None and isinstance(t, (int, float)) and t < start - 1.0:
            continue
        out.append(e)
    return out


@quantity
def gradient_free_rows(ctx: RunContext) -> tuple[int, int] | None:
    """The longest stretch of consecutive step rows (first, last) at which a backward ran and
    an optimizer stepped while no parameter received a gradient: the loss was finite, and no
    watched parameter had a gradient to measure (``grad_norm`` unmeasured, no layer norm
    non-finite), where the log shows it: the step's per-layer record has every watched
    parameter without a gradient, or its layer segment watches none (nothing was trainable).
    The recorder measures every watched parameter's gradient at every step, so this is
    observed, not inferred: backward reached no parameter (a model frozen whole, a loss
    detached from the graph and re-attached with ``requires_grad_(True)``, an optimizer over
    another model's parameters). None where no such row exists, or the log has no backward
    counts (a saved log of another program)."""
    nb = ctx.col("n_backward")
    if not np.isfinite(nb).any() or not ctx.meta.get("layer_segments"):
        return None  # only the recorder counts backward calls and keeps per-layer segments
    gn = ctx.grad_norm
    lg = layer_grads(ctx)
    by_row = lg.reindex(ctx.step) if not lg.empty else lg
    inf_layer = np.isinf(by_row.to_numpy()).any(axis=1) if not lg.empty else np.zeros(ctx.n, dtype=bool)
    # observed, not absent: the step has a per-layer record (every layer missing), or its
    # layer segment watches no parameter at all (nothing was trainable)
    observed = np.isin(ctx.step, lg.index.to_numpy()) if not lg.empty else np.zeros(ctx.n, dtype=bool)
    for seg in ctx.meta.get("layer_segments") or []:
        if not seg.get("layers") and seg.get("first_step") is not None:
            later = [int(t["first_step"]) for t in ctx.meta["layer_segments"]
                     if t.get("first_step") is not None and int(t["first_step"]) > int(seg["first_step"])]
            end = min(later) if later else np.inf
            observed |= (ctx.step >= int(seg["first_step"])) & (ctx.step < end)
    free = (observed & (nb > 0) & (ctx.col("optimizer_steps") > 0) & np.isnan(gn) & ~inf_layer
            & np.isfinite(ctx.loss))
    if not free.any():
        return None
    # runs of True: starts where it turns on, ends where it turns off
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k])


def first_index(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
