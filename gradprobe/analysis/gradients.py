"""The gradient norm as the rules read it: spikes above the running level, geometric growth,
the stable window, and the clipping threshold computed from the run."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.loss import healthy_rows
from gradprobe.analysis.numeric import nice, trailing_level
from gradprobe.analysis.recommend import Computed
from gradprobe.analysis.steps import warmup_rows

#: A pre-clip gradient norm this many times its running level is a spike. Mini-batch gradient
#: norms of a healthy run scatter around their level by a factor of about 2 to 3 (the batch-
#: to-batch noise of a sum over many examples); an explosion multiplies the norm by 10x to
#: 1e6x within a step or a few. One order of magnitude separates the two.
SPIKE_FACTOR = 10.0
#: A spike must also exceed the highest running level the run sustained before it by this
#: factor: batch-to-batch scatter of a norm about its level reaches 2-3x, so a norm within 3x
#: of a level the run already trained at is inside its ordinary range (see GradSpikes).
SPIKE_ABOVE_SUSTAINED = 3.0
#: 1.4826 x the median absolute deviation is the standard deviation, for Gaussian scatter.
MAD_TO_SD = 1.4826

class GradSpikes:
    """Spikes of the pre-clip total gradient norm above its running level.

    A spike must also reach :data:`SPIKE_ABOVE_SUSTAINED` times the highest running level the
    run had sustained before it (the running maximum of ``level``): a run's gradient norm
    shrinks as the loss falls (most of all when it memorises its data), and its ordinary
    batch-to-batch scatter then reaches 10x the shrunken level while staying within the
    scale the run already trained at, typically at its start, without harm. Such a norm
    is not an explosion; one far above anything the run sustained is.

    Attributes (arrays are per row of ``ctx.steps``):
        norm: pre-clip gradient norm (NaN: not measured).
        level: running level, :func:`trailing_level` of ``norm``.
        sustained: the highest running level up to each row (running maximum of ``level``).
        ratio: ``norm / level`` where both are finite and the level is > 0, else NaN.
        floor: 1e-3 x the median of the first tenth of the finite norms (at least 3).
        spike: ``ratio >= SPIKE_FACTOR``, ``norm >= floor`` and
            ``norm >= SPIKE_ABOVE_SUSTAINED x sustained``.
        rows: row indices of the spikes.
        first: row of the first spike (None: none).
        max_ratio: largest ratio among the spikes (0.0: no spike).
        scatter: the norm's own record-to-record scatter about its running level, in decades:
            1.4826 x the median absolute deviation of log10(ratio) (a robust standard
            deviation; spikes, fewer than half the records, do not move it). ~0.1 for
            mini-batches of many examples, decades for single-example batches.
    """

    def __init__(self, ctx: RunContext) -> None:
        norm = ctx.grad_norm.copy()
        norm[~np.isfinite(norm)] = np.nan
        self.norm = norm
        self.level = trailing_level(norm)
        with np.errstate(all="ignore"):
            ratio = np.where((self.level > 0) & np.isfinite(norm), norm / self.level, np.nan)
        self.ratio = ratio
        fin = norm[np.isfinite(norm)]
        head = fin[: max(3, fin.size // 10)]
        #: norms below this are ignored as spikes: 1e-3 of the run's starting scale, far below
        #: any step the learning rate can take (a converged run's 1e-20 -> 1e-15 is no spike)
        self.floor = 1e-3 * float(np.median(head)) if head.size else 0.0
        self.sustained = np.fmax.accumulate(np.nan_to_num(self.level, nan=0.0)) if norm.size else norm
        self.spike = ((np.nan_to_num(ratio, nan=0.0) >= SPIKE_FACTOR) & (np.nan_to_num(norm, nan=0.0) >= self.floor)
                      & (np.nan_to_num(norm, nan=0.0) >= SPIKE_ABOVE_SUSTAINED * self.sustained))
        self.rows = np.flatnonzero(self.spike)
        self.first = int(self.rows[0]) if self.rows.size else None
        spiked = ratio[self.spike]
        self.max_ratio = float(spiked.max()) if spiked.size else 0.0
        with np.errstate(all="ignore"):
            logr = np.log10(ratio[np.isfinite(ratio) & (ratio > 0)])
        self.scatter = float(MAD_TO_SD * np.median(np.abs(logr - np.median(logr)))) if logr.size else 0.0


@quantity
def grad_spikes(ctx: RunContext) -> GradSpikes:
    return GradSpikes(ctx)


#: Fewest stable-window steps a clipping threshold is computed from: the 95th percentile of
#: fewer values is one of the largest two, which says nothing about the normal steps.
MIN_STABLE_STEPS = 5
#: Percentile of the stable window's pre-clip norms a recommended ``max_norm`` sits at:
#: clipping there trims the 5% largest normal steps and every spike, and leaves the bulk of
#: the updates at the size the optimizer and learning rate were tuned for.
MAX_NORM_PERCENTILE = 95
#: Rows after a spike left out of the stable window with it (the explosion's aftermath).
SPIKE_AFTERMATH = 2
#: With at least this many stable rows before the first spike, only those are used: after an
#: explosion the weights themselves are damaged and the norms stay inflated.
MIN_ROWS_BEFORE_SPIKE = 10


@quantity
def stable_window(ctx: RunContext) -> np.ndarray:
    """Row mask of the stretch on which gradient-norm statistics are taken: a finite pre-clip
    norm, a step that really happened (not skipped by a GradScaler, not abandoned), in the
    healthy part of the run (:func:`~gradprobe.analysis.loss.healthy_rows`), after the
    warm-up (:func:`~gradprobe.analysis.steps.warmup_rows`), and neither a spike nor one of
    the ``SPIKE_AFTERMATH`` rows after one. When at least ``MIN_ROWS_BEFORE_SPIKE`` such rows
    precede the first spike, only those are kept. When fewer than ``MIN_STABLE_STEPS`` rows
    remain, every finite healthy row is used (never a row of the breakdown)."""
    sp = grad_spikes(ctx)
    fin = np.isfinite(sp.norm) & ~ctx.skipped & ~ctx.col("abandoned", bool) & healthy_rows(ctx)
    near_spike = sp.spike.copy()
    for k in range(1, SPIKE_AFTERMATH + 1):
        near_spike[k:] |= sp.spike[:-k]
    mask = fin & ~near_spike
    mask[:warmup_rows(ctx)] = False
    if sp.first is not None:
        before = mask.copy()
        before[sp.first:] = False
        if before.sum() >= MIN_ROWS_BEFORE_SPIKE:
            mask = before
    if mask.sum() < MIN_STABLE_STEPS:
        mask = fin
    return mask


#: How GP201, GP202 and GP204 compute ``max_norm`` (one definition: :func:`suggested_max_norm`).
MAX_NORM_FORMULA = (
    f"{MAX_NORM_PERCENTILE}th percentile of the pre-clip gradient norm over the stable window: finite steps of "
    "the healthy part of the run (before it diverged or went non-finite), after the warm-up (first "
    "max(1, min(50, n // 10)) steps), spikes and the 2 steps after each excluded, and only the steps before the "
    f"first spike when there are at least {MIN_ROWS_BEFORE_SPIKE} of them; at least {MIN_STABLE_STEPS} steps"
)


@quantity
def suggested_max_norm(ctx: RunContext) -> Computed:
    """The clipping threshold computed from the run (:data:`MAX_NORM_FORMULA`), with
    ``details``: ``p95``, ``median``, ``window`` (first and last step used), ``n``."""
    mask = stable_window(ctx)
    vals = grad_spikes(ctx).norm[mask]
    keep = np.isfinite(vals) & (vals > 0)
    vals = vals[keep]
    if vals.size < MIN_STABLE_STEPS:
        return Computed(reason=f"only {vals.size} healthy steps with a finite gradient norm (needs "
                               f"{MIN_STABLE_STEPS})")
    steps = ctx.step[mask][keep]
    p = float(np.percentile(vals, MAX_NORM_PERCENTILE))
    return Computed(nice(p), details={"p95": p, "median": float(np.median(vals)),
                                      "window": [int(steps.min()), int(steps.max())], "n": int(vals.size)})


@quantity
def geometric_growth(ctx: RunContext) -> tuple[int, int, float] | None:
    """(start row, end row, factor) of the first stretch where the pre-clip norm, smoothed by
    a trailing median of 5 steps (single-batch dips and peaks removed), rose >= 100x over
    >= 4 steps from its minimum of the previous 50 steps, rising on >= 60% of those steps,
    and ended above the scale the run trained at, as spikes must (``GradSpikes``: at least
    ``SPIKE_ABOVE_SUSTAINED`` times the highest running level sustained before the stretch, and
    above the floor): a converged run whose gradient, at 1e-7 of its starting scale, grows
    back to 1e-4 of it has not exploded."""
    sp = grad_spikes(ctx)
    norm = sp.norm
    with np.errstate(all="ignore"):
        raw = np.where(norm > 0, np.log10(norm), np.nan)
    lg = pd.Series(raw).rolling(5, min_periods=1).median().to_numpy()
    low = pd.Series(lg).shift(4).rolling(47, min_periods=1).min().to_numpy()
    with np.errstate(invalid="ignore"):
        cand = np.flatnonzero(np.nan_to_num(lg - low, nan=-np.inf) >= 2.0)
    for j in cand[:200]:
        lo = max(0, j - 50)
        window = lg[lo : j - 3]
        if not np.isfinite(window).any():
            continue
        i = lo + int(np.nanargmin(window))
        seg = lg[i : j + 1]
        d = np.diff(seg[np.isfinite(seg)])
        if d.size >= 4 and (d > 0).mean() >= 0.6:
            top = 10 ** lg[j]
            if top < sp.floor or top < SPIKE_ABOVE_SUSTAINED * float(sp.sustained[max(i - 1, 0)]):
                continue  # it grew back inside the scale the run already trained at
            return i, int(j), float(10 ** (lg[j] - lg[i]))
    return None


