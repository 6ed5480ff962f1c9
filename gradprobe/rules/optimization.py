"""GP5xx: optimization (lr-too-high, lr-too-low, missing-weight-decay, loss-spike, loss-plateau, overfitting).

The mechanics these rules reason from. One optimizer step changes a weight matrix W by dW;
the update-to-weight ratio ||dW|| / ||W|| says how far a step moves the weights relative to
their own size. Around 1e-3 a run moves steadily: a few thousand steps can move the weights by
their own scale, and no single step overshoots. For Adam-like optimizers the per-element step
is about lr (the gradient is normalised by its running RMS), so the ratio is about lr / rms(W)
and scales linearly with lr. For SGD-like optimizers the step is lr x gradient (x 1/(1-momentum)
in steady state); at a given point of training the gradient does not depend on lr, so the
ratio again scales linearly with lr. Either way ``lr * 1e-3 / ratio`` is the learning rate at
which the measured steps would have had the target size.

A large ratio alone is not a fault (small networks train well at 1e-2); it is one when the
loss shows the harm: it rises, spikes, diverges, or goes non-finite. A small ratio alone is
not a fault either: a converged run, or one whose scheduler decayed the lr, takes small steps
by design; it is one when the loss barely moves while far from converged.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    SUGGEST_RATIO_WHEN_TOO_HIGH,
    TARGET_UPDATE_RATIO,
    LossCurve,
    RunContext,
    RISE_FACTOR,
    eval_curve,
    grad_spikes,
    level_significance,
    loss_curve,
    loss_spikes,
    nice,
    nonfinite_timeline,
    optimizer_family,
    risen_before,
    trivial_loss,
    update_ratio_by_step,
)
from gradprobe.report import Finding, Recommendation
from gradprobe.rules.base import Explanation, Rule, register
from gradprobe.rules.data import tiny_targets

#: GP501 acts from a median update-to-weight ratio of 1e-2: a decade above the target ratio.
RATIO_HIGH = 1e-2
#: ... and without any other harm, when the loss makes no progress at 1e-1 (every step moves
#: the weights by a tenth of their size: the run cannot settle into anything).
RATIO_RUNAWAY = 1e-1
#: GP502 acts from a median ratio of 1e-4 down: a decade below the target ratio.
RATIO_LOW = 1e-4
#: The loss "barely moves" when it lost less than this fraction of its starting level.
BARELY_MOVES = 0.10
#: A level within this fraction of the trivial predictor's loss has learned (almost) nothing.
TRIVIAL_LEVEL = 0.8
#: GP503: a weight norm grown by this factor no longer reflects the initialisation ...
WEIGHT_GROWTH = 3.0
#: ... and is still growing when the last quarter of the run added at least this fraction.
LATE_GROWTH = 0.10
#: GP503 recommends weight decay only for growth up to 1% per step; faster growth is the
#: learning rate's doing (GP501), and a decay that strong would erase the weights' learning.
MAX_DECAY_PER_STEP = 0.01
#: GP505: the plateau must cover at least this fraction of the run (and 2 smoothing windows).
PLATEAU_FRACTION = 0.30
#: GP505: a run shorter than this is too young to call stuck: a freshly initialised network
#: sits at the trivial loss for its first tens of steps (an Adam step of lr 1e-3 moves a weight
#: of scale 0.1 by 1%; an SGD step, lr x a gradient that starts small), so a short run that has
#: not left it yet has not stopped improving, it has not started.
MIN_PLATEAU_RECORDS = 50
#: GP505: an improvement counts when the smoothed loss beats its best by 1% (and by the noise).
PLATEAU_IMPROVEMENT = 0.01
#: GP506: the validation loss must end at least 10% above its minimum ...
OVERFIT_RISE = 0.10
#: ... while the training loss fell by at least 5% over the same steps.
OVERFIT_TRAIN_FALL = 0.05


def _median_lr(ctx: RunContext, steps: Any) -> float | None:
    lr = ctx.lr
    if not ctx.n:
        return None
    idx = np.searchsorted(ctx.step, np.asarray(list(steps), dtype=np.int64))
    idx = idx[(idx >= 0) & (idx < ctx.n)]
    vals = lr[idx] if idx.size else lr
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if not vals.size:
        return ctx.lr0
    return float(np.median(vals))


def loss_harm(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Evidence in the training loss that the run is being hurt (shared by GP501 and GP503).

    Keys present when found, each with ``step`` (onset) and ``strength`` in [0, 1]:
    ``nonfinite`` (the parameters went NaN/Inf, or the loss did and never came back, after a
    finite start and not after non-finite data: GP404's),
    ``diverged`` (the final level is above the initial one by more than noise and 10%),
    ``regressed`` (after making progress the loss gave back at least half of it),
    ``spikes`` (:func:`gradprobe.analysis.loss_spikes` events; ``count``, ``unrecovered``).
    """
    store = ctx.__dict__.setdefault("_gp5_cache", {})
    if "harm" in store:
        return store["harm"]
    out: dict[str, dict[str, Any]] = {}
    curve = loss_curve(ctx)
    first_finite = int(curve.steps[0]) if curve.n else None
    bad_steps = []
    nf = curve.nonfinite_step
    # a NaN loss counts when it lasts (no finite loss after it): one bad batch that the loop
    # skipped, after which training went on, is not the optimizer's doing
    if nf is not None and first_finite is not None and nf > first_finite and not (curve.steps > nf).any():
        bad_steps.append(nf)
    if ctx.n:
        pnf = ctx.col("param_nonfinite_layers") > 0
        st = ctx.first_step_where(pnf)
        if st is not None and (first_finite is None or st >= first_finite):
            bad_steps.append(st)
    data_nan = nonfinite_timeline(ctx).input_step
    bad_steps = [b for b in bad_steps if data_nan is None or b < data_nan]  # NaN data is GP404's
    if bad_steps:
        out["nonfinite"] = {"step": int(min(bad_steps)), "strength": 1.0}
    if curve.n >= 10:
        sig = level_significance(curve)
        if curve.rose:
            above = np.flatnonzero(curve.smooth > curve.start + sig)
            onset = int(curve.steps[above[0]]) if above.size else int(curve.steps[-1])
            out["diverged"] = {"step": onset, "strength": 1.0, "start": curve.start, "final": curve.final}
        gain = curve.start - curve.best
        if (gain >= sig and gain > 0 and curve.final - curve.best >= max(0.5 * gain, sig)
                and curve.best_index < curve.n - curve.window):
            out["regressed"] = {"step": int(curve.steps[curve.best_index]), "strength": 0.8, "best": curve.best,
                                "final": curve.final, "given_back": (curve.final - curve.best) / gain}
    spikes = loss_spikes(curve)
    if spikes:
        unrec = [e for e in spikes if not e.recovered]
        out["spikes"] = {"step": spikes[0].step, "strength": 0.9 if unrec else 0.7, "count": len(spikes),
                         "unrecovered": len(unrec), "max_factor": max(e.factor for e in spikes),
                         "events": [e.to_json() for e in spikes[:5]], "last_end_step": spikes[-1].end_step,
                         "all_recovered": not unrec}
    store["harm"] = out
    return out


def _onset(harm: dict[str, dict[str, Any]]) -> int | None:
    steps = [h["step"] for h in harm.values() if h.get("step") is not None]
    return int(min(steps)) if steps else None


def _diverged_into_nonfinite(ctx: RunContext, step: int) -> bool:
    """The optimizer drove the run to NaN/Inf at ``step``: the loss or the gradient norm had
    risen to 3x its running median right before (:func:`gradprobe.analysis.risen_before`: a
    divergence running away), or the parameters went non-finite first, from a finite loss
    and finite gradients (the update itself overflowed), with an optimizer whose eps is not 0
    (Adam's eps=0 makes 0/0 = NaN at any learning rate: GP403). A NaN that appears first in
    the loss or the gradients of a steady run is a loss or backward bug (GP401/GP402)."""
    if not ctx.n:
        return False
    i0 = int(np.searchsorted(ctx.step, step))
    if risen_before(ctx.loss, i0) or risen_before(ctx.grad_norm, i0):
        return True
    tl = nonfinite_timeline(ctx)
    if tl.param_step != step:
        return False
    if (tl.loss_step is not None and tl.loss_step <= step) or (tl.grad_step is not None and tl.grad_step <= step):
        return False
    eps = ctx.hparams.get("eps")
    return not (ctx.adaptive and isinstance(eps, (int, float)) and eps == 0)


def _stable_before(ctx: RunContext, curve: LossCurve, step: int) -> bool:
    """The run trained stably at the same learning rate for a long stretch before ``step``:
    ``step`` lies at least 25% of the records and 2 smoothing windows into the run, the loss
    level in the window before it had improved on the start by more than
    :func:`gradprobe.analysis.level_significance`, and the lr at ``step`` is no more than 1.5x
    the median lr over the records before it (it did not climb)."""
    k = curve.index_at(step)
    if k >= curve.n or k < max(2 * curve.window, int(0.25 * curve.n)):
        return False
    if not curve.level_before(k) < curve.start - level_significance(curve):
        return False
    lr = ctx.lr
    idx = np.clip(np.searchsorted(ctx.step, curve.steps[:k]), 0, max(ctx.n - 1, 0))
    before = lr[idx]
    before = before[np.isfinite(before) & (before > 0)]
    i = min(int(np.searchsorted(ctx.step, step)), ctx.n - 1)
    if not before.size or not np.isfinite(lr[i]):
        return True
    return bool(lr[i] <= 1.5 * float(np.median(before)))


def _clean_gradient_spike(ctx: RunContext) -> int | None:
    """The step of the first gradient spike (GP202's: >= 10x its running level and above
    anything the run sustained) that clipping did not bound (no clip, or a clipped norm above
    3x the larger of the running and sustained levels) and whose batch had an ordinary loss
    (at most 3x the median of the 10 losses before it): the gradient exploded on its own (a
    recurrent Jacobian, a singular op, a scaling bug), not because a too-large step had
    already moved the weights somewhere bad, which shows in the loss first. Only the run's
    first spike is considered, and not when it falls in the warm-up (the first max(1,
    min(50, n // 10)) steps, as the stable window's): there the weights are still leaving
    their initialisation and a too-large first update shows as a gradient jump before the
    loss catches up, and every later spike happens in a run already knocked about. None if
    none."""
    sp = grad_spikes(ctx)
    if not sp.rows.size:
        return None
    loss = ctx.loss
    clip = ctx.clip_mask
    s = ctx.step_grad_norm
    warm = max(1, min(50, ctx.n // 10))
    for r in sp.rows[:1]:  # the first spike: after it the run is no longer the ordinary one
        if r < warm:
            return None  # the first steps: a too-large first update shows as a gradient jump first
        scale = max(float(np.nan_to_num(sp.level[r], nan=0.0)), float(sp.sustained[r]))
        if clip[r] and np.isfinite(s[r]) and s[r] <= 3.0 * scale:
            continue  # contained by clipping: no harm can come from it
        before = loss[max(0, r - 10):r]
        before = before[np.isfinite(before)]
        if not before.size or not np.isfinite(loss[r]):
            continue
        if loss[r] <= RISE_FACTOR * float(np.median(before)):
            return ctx.step_at(int(r))
    return None


def _lr_following(ctx: RunContext, onset: int | None) -> dict[str, Any] | None:
    """The harm began as the learning rate climbed: the lr at the onset is at least 1.5x the
    lr the run started with (a warmup or an increase ran before it), and the loss had been
    improving at the lower lr (its level in the window before the onset is below its start).
    Returns ``lr_at_onset``, ``lr_stable`` (the lr one smoothing window before the onset, at
    which the loss was still improving) and ``lr_start``; None otherwise."""
    if onset is None or not ctx.n:
        return None
    lr = ctx.lr
    fin = np.isfinite(lr) & (lr > 0)
    if fin.sum() < 3:
        return None
    i = int(np.searchsorted(ctx.step, onset))
    i = min(max(i, 0), ctx.n - 1)
    first = float(lr[fin][0])
    if not np.isfinite(lr[i]) or lr[i] < 1.5 * first:
        return None
    curve = loss_curve(ctx)
    k = curve.index_at(onset)
    if k < curve.window or not curve.level_before(k) < curve.start:
        return None
    j = max(0, i - curve.window)
    while j > 0 and not np.isfinite(lr[j]):
        j -= 1
    return {"lr_at_onset": float(lr[i]), "lr_stable": float(lr[j]) if np.isfinite(lr[j]) else first,
            "lr_start": first}


def _lr_reason(family: str | None, ratio: float, target: float) -> str:
    if family == "sgd":
        return (f"the measured update-to-weight ratio was {ratio:.2g}; an SGD step is lr x gradient, and at a given "
                f"point of training the gradient does not depend on lr, so the ratio scales with lr: "
                f"lr x {target:.2g} / ratio gives steps of {target:.2g} of the weights' size")
    return (f"the measured update-to-weight ratio was {ratio:.2g}; an Adam-like step is about lr per element "
            f"(the gradient is normalised by its RMS), so the ratio scales with lr: lr x {target:.2g} / ratio "
            f"gives steps of {target:.2g} of the weights' size")


# ------------------------------------------------------------------------------------------
@register
class LrTooHigh(Rule):
    """Fires when the median update-to-weight ratio of the weight matrices
    (:func:`gradprobe.analysis.update_ratios`: ||dW|| over the larger of ||W|| and half a
    unit-gain Xavier norm, so that weights initialised far below any design scale do not read
    as huge steps; sampled steps before the harm began, step 0 left out when others exist:
    Adam's first step is a full lr-sized step in every coordinate) is at least 1e-2, a decade
    above the ~1e-3 at which training moves steadily, AND the training loss shows harm
    (:func:`loss_harm`): it went non-finite, ended above where it started (by 10% and more
    than 3 standard errors of the window medians), gave back at least half of the progress it
    had made, spiked (GP504's events), or ended with under 10% progress at the trivial
    predictor's level (at least 0.8x the loss of a model that ignores its input over the
    second half of the run: the run collapsed, whatever progress it shows from a start the
    first oversized steps may have blown up); or, with none of these, it made no progress
    beyond noise (``LossCurve.fell`` false) while the ratio is at least 1e-1 (an lr so large
    the run cannot settle). A large ratio on a run that learns
    well is not a finding.

    The harm must be the learning rate's, not another fault's that any lr would suffer:

    * non-finite values count only when the optimizer drove the run there
      (:func:`_diverged_into_nonfinite`: the loss or gradient norm had risen 3x right before,
      or the parameters overflowed from finite gradients with eps > 0). A NaN that appears
      first in a steady loss or in the gradients of a finite loss is a loss or backward bug
      (GP401/GP402), and Adam with eps=0 makes NaN at any lr (GP403).
    * spikes, a regression, a divergence or non-finite values do not count when they began
      after the run had trained stably at the same lr for a long stretch (:func:`_stable_before`: at least 25%
      of the records, the loss improved by more than noise and 10%, the lr not climbing):
      the lr was not what changed at the onset (a bad batch, a gradient spike, a carried state
      did), and those have their own rules.
    * the loss stalled at the trivial predictor's level (or without progress at all) counts
      only from a ratio of 1e-1, taken as the larger of the median above and the median over
      the sampled steps of the first two smoothing windows (step 0 left out): a net whose
      every step rewrites a tenth of its weights can collapse to predicting the mean, and it
      does so early, while the steps are largest relative to the weights (under a too-high lr
      the weights then grow until the relative step shrinks); at smaller steps a run stuck
      there from the start cannot learn from its data or model (GP505 and its causes),
      whatever the lr.
    * a regression counts only from a best point below the trivial predictor's level (0.8x of
      it around the best, where known): a loss that never left that level has no progress to
      give back, and the minimum of a noisy flat curve always lies somewhat below its ends.
    * harm that began after a gradient exploded on a batch whose loss was ordinary (at most
      3x the 10 losses before it) and that clipping did not bound
      (:func:`_clean_gradient_spike`; a regression from a best point up to one smoothing
      window before it, the smoothing's lag) is that explosion's aftermath (GP202, and GP204 when
      nothing clips), and so is a stall whose measurement window (the second half) follows
      it: a too-large step shows in the loss first (the weights move somewhere bad, then the
      gradient there is large), a gradient that explodes on an ordinary batch was made by
      the recurrence or the op, at whatever lr.

    Small networks (fan-in of a few dozen) have weight RMS ~0.2, so Adam at its usual lr
    already steps at a ratio ~1e-2: the ratio threshold alone cannot tell them from a run at
    a too-high lr; the harm tests above do. Unnormalised inputs scale the first layer's
    gradient, and so its SGD step: the finding links input-scale (GP601) as its cause when
    present.

    Not judged when the regression targets are tiny (RMS <= 1e-3, GP602): one step of any
    optimizer then moves a prediction by the whole target range, so the loss's spikes and
    stalls say nothing about the lr.

    Without sampled ratios (foreign logs, the light profile) it fires only when the harm began
    as the learning rate climbed (the lr at the onset >= 1.5x the starting lr, the loss
    improving before it): instability that follows the lr.

    Severity: error when the loss went non-finite, diverged, collapsed to the trivial level,
    or a spike never recovered; warning otherwise. Recommends ``lr`` = lr x 10**-2.5 / ratio (the
    lr at which the measured steps had a size half a decade above the target, inside the
    healthy band with a sqrt(10) margin under this rule's 1e-2: the first steps a too-high lr
    is measured on overstate the steady ratio, see ``SUGGEST_RATIO_WHEN_TOO_HIGH``; the module
    docstring says why the ratio scales with lr for Adam- and SGD-like optimizers; LBFGS and other line-search or sign-based
    optimizers get no number), or, without ratios, the lr one smoothing window before the
    onset. When the instability was early (onset in the first 25% of the run) and the run
    recovered from every spike, the lr suits the steady state and only the start is too
    aggressive: it recommends ``warmup_steps`` = the step at which the instability ended (a
    linear warmup then reaches the full lr only where the recorded run had already settled
    at it) instead of a lower lr.

    Confidence: 0.5 x c_ratio + 0.5 x c_harm (+0.1 when the harm followed the lr), where
    c_ratio = 0.5 at 1e-2 rising to 1.0 at 1e-1 on a log scale (0.3 without ratios) and
    c_harm is the strongest harm (non-finite/diverged 1.0, unrecovered spikes 0.9, regression
    or collapse to the trivial level 0.8, spikes 0.7, no progress 0.6).
    """

    code = "GP501"
    slug = "lr-too-high"
    severity = "warning"
    title = "Learning rate too high: updates are large relative to the weights and the loss suffers"
    requires = ("loss",)
    causes = ("input-scale",)
    computes = {
        "lr": "lr x 1e-3 / median update-to-weight ratio of the weight matrices before the harm began "
        "(without ratios: the lr one smoothing window before the instability began)",
        "warmup_steps": "the step at which an early, recovered instability ended",
    }
    explanation = Explanation(
        what="Optimizer steps that change the weights by a large fraction of their size (update-to-weight ratio "
        "far above ~1e-3) together with harm in the loss: it rises, spikes, diverges, goes NaN, or cannot settle.",
        why="A step much larger than the scale over which the loss is smooth overshoots the minimum: the loss "
        "bounces, grows, or blows up to inf/NaN, and ReLUs die or tanh units saturate on the way.",
        causes="A learning rate copied from a different model size or optimizer (SGD's 0.1 used with Adam); no warmup "
        "for Adam or a Transformer; a batch-size change without rescaling lr; a loss summed instead of averaged "
        "under SGD (the step grows with the batch).",
        fix="Lower the learning rate to the suggested value (it gives updates of ~3e-3 of the weights per step); "
        "when only the first steps are unstable, add a linear warmup instead.",
        example="Adam(lr=1.0) on an MLP: updates of 0.3x the weights per step, the loss climbs from 2.3 to 40: "
        "lr=0.0033 restores a decreasing loss.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        curve = loss_curve(ctx)
        if curve.n < 6 and "nonfinite" not in loss_harm(ctx):
            return []
        if tiny_targets(ctx):
            return []  # a loss on targets of 1e-3 or less moves by a whole target range per step at any lr (GP602)
        harm = dict(loss_harm(ctx))
        if "nonfinite" in harm and not _diverged_into_nonfinite(ctx, harm["nonfinite"]["step"]):
            del harm["nonfinite"]  # a loss or backward bug, or eps=0: not the step size
        for k in ("nonfinite", "spikes", "regressed", "diverged"):
            if k in harm and _stable_before(ctx, curve, harm[k]["step"]):
                del harm[k]  # trained stably at this lr before: something else changed at the onset
        if "regressed" in harm:
            tl0 = trivial_loss(ctx)
            b = harm["regressed"]["step"]
            if tl0.consistent and tl0.ratio_between(b - curve.window, b + curve.window) >= TRIVIAL_LEVEL:
                del harm["regressed"]  # its best was still at the trivial level: no progress to give back
        exploded = _clean_gradient_spike(ctx)
        if exploded is not None:
            # the aftermath of a gradient that exploded on an ordinary batch (GP202); a regression's
            # step is the smoothed best, which the smoothing puts up to a window before the jump
            for k in [k for k, h in harm.items() if h["step"] >= exploded - (curve.window if k == "regressed" else 0)]:
                del harm[k]
        onset = _onset(harm)
        ratios = update_ratio_by_step(ctx)
        family = optimizer_family(ctx)
        follow = _lr_following(ctx, onset)
        ratio = None
        used: list[int] = []
        if len(ratios):
            pre = ratios[ratios.index <= onset] if onset is not None else ratios
            if len(pre) == 0:
                pre = ratios.iloc[:1]
            if (pre.index >= 1).sum() >= 2:
                pre = pre[pre.index >= 1]
            ratio = float(pre.median())
            used = [int(s) for s in pre.index]
            if ratio < RATIO_HIGH:
                return []
            if curve.n >= 10:
                tl = trivial_loss(ctx)
                mid = int(curve.steps[curve.n // 2])
                # at (or above) the trivial level in the second half: collapsed, whatever the loss
                # "fell" from a start the first oversized steps blew up
                at_trivial = tl.consistent and tl.ratio_between(mid, int(curve.steps[-1])) >= TRIVIAL_LEVEL
                # a collapse happens while the steps are largest relative to the weights: under a
                # too-high lr the weights then grow until the relative step shrinks
                early_end = int(curve.steps[min(curve.n - 1, 2 * curve.window)])
                early = ratios[(ratios.index >= 1) & (ratios.index <= early_end)]
                stall_ratio = max(ratio, float(early.median()) if len(early) >= 2 else ratio)
                wrecked = exploded is not None and exploded <= mid  # a stall after an explosion is its aftermath
                if at_trivial and stall_ratio >= RATIO_RUNAWAY and not wrecked:
                    harm["stalled"] = {"step": int(curve.steps[0]), "strength": 0.8, "progress": curve.settled_progress,
                                       "at_trivial_loss": True, "early_update_ratio": stall_ratio}
                elif stall_ratio >= RATIO_RUNAWAY and not harm and not wrecked and not curve.fell:
                    harm["stalled"] = {"step": int(curve.steps[0]), "strength": 0.6, "progress": curve.settled_progress,
                                       "early_update_ratio": stall_ratio}
            if not harm:
                return []
            onset = _onset(harm)
        elif not harm or follow is None:
            return []

        strongest = max(h["strength"] for h in harm.values())
        if ratio is not None:
            c_ratio = min(1.0, max(0.5, 0.5 + 0.5 * math.log10(ratio / RATIO_HIGH)))
        else:
            c_ratio = 0.3
        conf = min(1.0, 0.5 * c_ratio + 0.5 * strongest + (0.1 if follow else 0.0))
        spikes = harm.get("spikes")
        broken = ("nonfinite" in harm or "diverged" in harm or (spikes is not None and spikes["unrecovered"] > 0)
                  or bool(harm.get("stalled", {}).get("at_trivial_loss")))
        severity = "error" if broken else "warning"

        lr_now = _median_lr(ctx, used) if used else (follow["lr_at_onset"] if follow else ctx.lr0)
        recs: list[Recommendation] = []
        early_recovered = (
            onset is not None and curve.n and onset <= curve.steps[0] + 0.25 * (curve.steps[-1] - curve.steps[0])
            and spikes is not None and spikes["all_recovered"]
            and not ({"nonfinite", "diverged", "regressed", "stalled"} & set(harm))
        )
        ev: dict[str, Any] = {
            "update_ratio": ratio,
            "target_update_ratio": TARGET_UPDATE_RATIO,
            "ratio_steps": used[:20],
            "lr": lr_now,
            "optimizer": ctx.optimizer_class,
            "optimizer_family": family,
            "loss_start": curve.start if curve.n else None,
            "loss_best": curve.best if curve.n else None,
            "loss_final": curve.final if curve.n else None,
            "harm": {k: {kk: vv for kk, vv in v.items() if kk != "events"} for k, v in harm.items()},
        }
        if spikes:
            ev["spike_events"] = spikes["events"]
        if follow:
            ev["lr_following"] = follow

        if early_recovered:
            warm = int(max(1, spikes["last_end_step"] + 1))
            recs.append(Recommendation.hyperparameter(
                "warmup_steps", None, warm,
                f"the loss spiked from step {onset} and had settled by step {warm}; the run then trained at the full "
                f"lr, so a linear warmup over those {warm} steps keeps the start below it"))
        elif ratio is not None and lr_now and family in ("adaptive", "sgd"):
            suggested = nice(lr_now * SUGGEST_RATIO_WHEN_TOO_HIGH / ratio)
            recs.append(Recommendation.hyperparameter("lr", lr_now, suggested,
                                                      _lr_reason(family, ratio, SUGGEST_RATIO_WHEN_TOO_HIGH)))
        elif follow is not None:
            suggested = nice(follow["lr_stable"])
            recs.append(Recommendation.hyperparameter(
                "lr", follow["lr_at_onset"], suggested,
                f"the loss was still improving at lr={follow['lr_stable']:.3g}, one smoothing window before the "
                f"instability began at lr={follow['lr_at_onset']:.3g}"))
        if early_recovered:
            recs.append(Recommendation.code(
                "Warm the learning rate up linearly",
                f"scheduler = torch.optim.lr_scheduler.LambdaLR(\n"
                f"    optimizer, lambda step: min(1.0, (step + 1) / {int(max(1, spikes['last_end_step'] + 1))}))\n"
                f"# call scheduler.step() after every optimizer.step()"))

        what = []
        for k in ("nonfinite", "diverged", "regressed", "spikes", "stalled"):
            h = harm.get(k)
            if h is None or (k == "regressed" and "diverged" in harm):
                continue
            if k == "nonfinite":
                what.append(f"went non-finite at step {h['step']}")
            elif k == "diverged":
                what.append(f"ended above where it started ({curve.start:.4g} -> {curve.final:.4g})")
            elif k == "regressed":
                what.append(f"gave back {h['given_back']:.0%} of its progress after step {h['step']}")
            elif k == "spikes":
                what.append(f"spiked {h['count']} time(s) (up to {h['max_factor']:.1f}x its running level, first at "
                            f"step {h['step']})")
            elif h.get("at_trivial_loss"):
                what.append(f"ended at the level of a model that ignores its input ({curve.start:.4g} -> "
                            f"{curve.final:.4g})")
            else:
                what.append(f"barely moved ({curve.settled_progress:.1%} progress)")
        if ratio is not None:
            msg = (f"Optimizer steps change the weight matrices by {ratio:.2g} of their norm (median over sampled "
                   f"steps), {ratio / TARGET_UPDATE_RATIO:.0f}x the ~1e-3 at which training moves steadily, and the "
                   f"loss " + "; ".join(what) + ".")
        else:
            msg = ("The loss " + "; ".join(what) + f" as the learning rate climbed to {follow['lr_at_onset']:.3g} "
                   f"(it was improving at {follow['lr_stable']:.3g}).")
        if early_recovered:
            msg += " The run recovered and trained at this lr afterwards: the start needs a warmup."
        first = onset
        if ratio is not None:
            upto = ratios[ratios.index <= onset] if onset is not None else ratios
            high = upto[upto >= RATIO_HIGH]
            first = int(high.index[0]) if len(high) else (used[0] if used else onset)
        return [self.finding(confidence=conf, message=msg, first_step=first, evidence=ev, recommendations=recs,
                             severity=severity)]


# ------------------------------------------------------------------------------------------
@register
class LrTooLow(Rule):
    """Fires when the median update-to-weight ratio of the weight matrices, over the sampled
    steps taken at the configured learning rate (lr at least half its maximum, so a scheduler's
    decay towards its floor does not count), is at most 1e-4 (a decade below ~1e-3), AND the
    training loss barely moved (it did not fall by 10% of its starting level and by 3
    standard errors of a window median: ``LossCurve.fell``, the start being the first
    window's median, or the first record when that lies beyond 5 noise units of it; small
    regression batches scatter their losses by tens of percent, and a 10% "progress" within
    that scatter is none), AND it is far from converged: its level is at
    least half of the trivial predictor's loss (the target variance under MSE, ln n_classes
    under cross-entropy; used only when the first sampled loss matches the baseline's scale),
    or, without that baseline, neither the lr nor the gradient norm decayed (a converged run's
    gradient norm falls with its loss) and the first sampled loss is not already 3x below the
    loss of predictions unrelated to the targets (a model trained before it was watched, being
    fine-tuned with a small lr). A run whose scheduler decayed the lr after learning, with the
    loss flat at a low level, is therefore not a finding; nor is an SGD-like run whose
    gradients are clipped to less than half their norm on most steps (the steps are small
    because of the clipping, GP201, and a larger lr would be clipped the same way), nor a run
    on tiny regression targets (GP602: the gradient, and an SGD step, shrink with the targets;
    standardising them is the fix).

    Recommends ``lr`` = lr x 1e-3 / ratio (the lr at which these steps would have had the
    target size; linear in lr for Adam-like and SGD-like optimizers alike, see the module
    docstring).

    A symptom when the gradient itself is what is small: under SGD the step is lr x gradient,
    and a gradient starved by an initialisation far below design scale (GP603), saturated
    units (GP604), dead units (GP605), vanishing through depth (GP203) or over-clipping
    (GP201) makes the same tiny steps at a sane lr. The engine then links that cause, and the lr computed here is not merged into
    the report's suggestions (raising the lr 1000x would not fix a starved gradient).

    Confidence: 0.5 x c_ratio + 0.5 x c_still, with c_ratio = 0.5 at 1e-4 rising to 1.0 two
    decades lower (log scale) and c_still = 1 - progress / 0.1.
    """

    code = "GP502"
    slug = "lr-too-low"
    severity = "warning"
    title = "Learning rate too low: updates are tiny and the loss barely moves"
    requires = ("loss", "update_ratio")
    causes = ("overclipping", "poor-initialization", "saturated-activations", "dead-units", "vanishing-gradients")
    computes = {"lr": "lr x 1e-3 / median update-to-weight ratio of the weight matrices at the configured lr"}
    explanation = Explanation(
        what="Optimizer steps that change the weights by a tiny fraction of their size (update-to-weight ratio far "
        "below ~1e-3) while the loss barely moves and is far from converged.",
        why="At a ratio of 1e-6 the weights need a million steps to move by their own size: the run spends its "
        "budget standing still.",
        causes="A learning rate meant for a different optimizer (Adam's 1e-4 used with SGD); an lr divided twice "
        "(by the batch size and by accumulation steps); a loss of very small scale under SGD (the gradient, and so "
        "the step, shrinks with it).",
        fix="Raise the learning rate to the suggested value (steps of ~1e-3 of the weights).",
        example="SGD(lr=1e-6): update-to-weight ratio 3e-8, the loss moves 0.01% in 200 steps: lr=0.033.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        ratios = update_ratio_by_step(ctx)
        curve = loss_curve(ctx)
        if len(ratios) < 2 or curve.n < 10 or tiny_targets(ctx):
            return []
        lr = ctx.lr
        fin_lr = lr[np.isfinite(lr) & (lr > 0)]
        lr_max = float(fin_lr.max()) if fin_lr.size else None
        steps = list(ratios.index)
        if lr_max is not None:
            idx = np.clip(np.searchsorted(ctx.step, np.asarray(steps, dtype=np.int64)), 0, ctx.n - 1)
            at_cfg = np.isfinite(lr[idx]) & (lr[idx] >= 0.5 * lr_max)
            cfg = ratios[at_cfg]
            if len(cfg) == 0:
                cfg = ratios
        else:
            cfg = ratios
        ratio = float(cfg.median())
        if ratio > RATIO_LOW:
            return []
        family = optimizer_family(ctx)
        if family == "sgd" and ctx.clip_mask.mean() >= 0.5:
            gn, sg = ctx.grad_norm, ctx.step_grad_norm
            ok = ctx.clip_mask & np.isfinite(gn) & np.isfinite(sg) & (gn > 0)
            if ok.any() and float(np.median(sg[ok] / gn[ok])) < 0.5:
                return []  # the gradient is clipped to a fraction of itself: the steps are small by GP201, not by lr
        progress = curve.settled_progress
        if curve.fell:
            return []
        tl = trivial_loss(ctx)
        lo, hi = int(curve.steps[0]), int(curve.steps[-1])
        base_ratio = math.nan
        if tl.consistent:
            base_ratio = tl.ratio_between((lo + hi) // 2, hi)
            if not math.isfinite(base_ratio):
                base_ratio = tl.ratio_between(lo, hi)
        ev: dict[str, Any] = {
            "update_ratio": ratio, "target_update_ratio": TARGET_UPDATE_RATIO, "ratio_steps": [int(s) for s in cfg.index][:20],
            "lr": lr_max, "optimizer": ctx.optimizer_class, "loss_initial": curve.initial, "loss_final": curve.final,
            "progress": progress,
        }
        if math.isfinite(base_ratio):
            if base_ratio < 0.5:
                return []
            ev["loss_over_trivial"] = base_ratio
            ev["trivial_loss_kinds"] = tl.kinds
        elif tl.first_over_expected < 1 / 3:
            return []  # already 3x below unrelated predictions: trained before it was watched
        else:
            if fin_lr.size and fin_lr[-1] < 0.5 * lr_max:
                return []
            g = ctx.grad_norm[np.isfinite(ctx.grad_norm)]
            if g.size >= 2 * curve.window:
                g0, g1 = float(np.median(g[: curve.window])), float(np.median(g[-curve.window:]))
                ev["grad_norm_initial"], ev["grad_norm_final"] = g0, g1
                if g1 < 0.5 * g0:
                    return []
        c_ratio = min(1.0, 0.5 + 0.25 * math.log10(RATIO_LOW / max(ratio, 1e-300)))
        c_still = 1.0 - max(0.0, progress) / BARELY_MOVES
        conf = 0.5 * c_ratio + 0.5 * c_still
        recs = []
        lr_cfg = _median_lr(ctx, cfg.index)
        if lr_cfg:
            suggested = nice(lr_cfg * TARGET_UPDATE_RATIO / ratio)
            recs.append(Recommendation.hyperparameter("lr", lr_cfg, suggested, _lr_reason(family, ratio, TARGET_UPDATE_RATIO)))
        msg = (f"Optimizer steps change the weight matrices by {ratio:.2g} of their norm (median over sampled steps), "
               f"{TARGET_UPDATE_RATIO / ratio:.0f}x below the ~1e-3 at which training moves steadily, and the loss "
               f"moved {progress:.1%} ({curve.initial:.4g} -> {curve.final:.4g})")
        if "loss_over_trivial" in ev:
            msg += f", still at {ev['loss_over_trivial']:.2f}x the loss of a model that ignores its input"
        msg += "."
        return [self.finding(confidence=conf, message=msg, first_step=int(cfg.index[0]), evidence=ev, recommendations=recs)]


# ------------------------------------------------------------------------------------------
def _weight_groups_without_decay(ctx: RunContext) -> bool | None:
    """True if every parameter group of every optimizer has weight_decay == 0; None if no
    optimizer records a weight_decay (LBFGS, foreign logs: unknown)."""
    seen = False
    for opt in ctx.meta.get("optimizers") or []:
        for g in opt.get("param_groups") or []:
            if "weight_decay" not in g:
                continue
            seen = True
            try:
                if float(g["weight_decay"] or 0.0) != 0.0:
                    return False
            except (TypeError, ValueError):
                return None
    return True if seen else None


def _growth(values: np.ndarray, reference: float = 0.0) -> dict[str, float] | None:
    """Growth of a (positive) norm series of at least 20 records: ``start`` (median of the first
    window), ``initial`` (the larger of ``start`` and ``reference``), ``final`` (median of the
    last window), ``total`` = final / initial, ``late`` (growth over the last quarter, as a
    fraction) and ``rate`` (d ln(norm) per record over the second half)."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size < 20:
        return None
    w = max(3, v.size // 20)
    start = float(np.median(v[:w]))
    first = max(start, reference)
    last = float(np.median(v[-w:]))
    q = int(0.75 * v.size)
    at_q = float(np.median(v[max(0, q - w // 2): q + w // 2 + 1]))
    h = v.size // 2
    at_h = float(np.median(v[max(0, h - w // 2): h + w // 2 + 1]))
    rate = math.log(last / at_h) / max(1, (v.size - 1 - h)) if at_h > 0 and last > 0 else 0.0
    return {"start": start, "initial": first, "final": last, "total": last / first if first > 0 else math.inf,
            "late": last / at_q - 1.0 if at_q > 0 else 0.0, "rate": rate}


@register
class MissingWeightDecay(Rule):
    """Fires when no parameter group of any optimizer has weight decay (``weight_decay`` == 0
    in the recorded hyperparameters; optimizers without the setting, e.g. LBFGS, are not
    judged) and a weight matrix grows without bound:

    * its norm ended at least 3x the larger of its initial norm and the norm a Kaiming (He)
      initialisation gives its shape (sqrt(2 x fan_out)): the weights are no longer the size
      any standard initialisation sets. Measuring against He's norm keeps a matrix initialised
      tiny (gain 0.001) that grows back to a normal size out of it: that is the initialisation's
      fault (GP603), not weight decay's. Without per-layer norms, the total weight norm against
      its own start.
    * the last quarter of the run still added at least 10%: not levelling off (a
      logistic-regression-like logarithmic growth adds ~3% per quarter late in a run).
    * the growth is harmful or useless: instability followed its onset (a loss spike,
      divergence, regression or non-finite values after the norm passed 1.5x its start), or
      the second half of the run bought less than 5% of the run's loss progress while the norm
      grew at least 20%. Growth that buys loss (a head growing to the targets' scale) is not a
      finding.

    Recommends ``weight_decay`` = r / lr, with r the growth rate of ln(norm) per step over
    the second half of the run and lr the learning rate there: decoupled weight decay (AdamW,
    and SGD's L2 term alike) multiplies the weights by (1 - lr x weight_decay) per step, which
    cancels a growth factor (1 + r) per step when lr x weight_decay = r. Growth faster than 1%
    per step is not this rule's: the weights are blowing up (divergence, GP501/GP202), and a
    decay that strong would erase what the weights learn.

    ``first_step`` is the step after the growth onset (norms are measured after the optimizer
    step: the next forward is the first to run with the grown weights).

    A symptom when an exploding gradient (GP202) came first: one step on a gradient 1000x its
    level inflates the weights by orders of magnitude at once, and the growth that follows is
    that step's aftermath, not a missing decay (the engine links it when present and earlier).

    Confidence: 0.5 + 0.25 x min(1, log10(growth)) (the full 0.25 at 10x) + 0.25 if instability
    followed the growth.
    """

    code = "GP503"
    slug = "missing-weight-decay"
    severity = "warning"
    title = "Weights grow without bound and there is no weight decay"
    requires = ("weights", "optimizer")
    causes = ("exploding-gradients",)
    computes = {"weight_decay": "r / lr: r = growth rate of ln(weight norm) per step over the second half of the run, "
                "lr = the learning rate there (decoupled decay shrinks the weights by lr x weight_decay per step)"}
    explanation = Explanation(
        what="Weight norms that keep growing (several times the size of a standard initialisation, still growing at "
        "the end) while the optimizer applies no weight decay, ahead of or alongside instability.",
        why="Ever larger weights make ever larger pre-activations and logits: units saturate, the loss surface "
        "sharpens, the same learning rate becomes too large, and the run eventually spikes or overflows.",
        causes="weight_decay=0 (Adam's default) on a long run; separable data that rewards ever more confident "
        "logits; weights before a normalisation layer, whose scale the loss does not constrain.",
        fix="Use decoupled weight decay (torch.optim.AdamW, or SGD's weight_decay) with the suggested value.",
        example="Adam(weight_decay=0): the classifier's weight norm grows 40x in 300 steps while the loss stays at "
        "1e-6: AdamW(weight_decay=0.2).",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        if _weight_groups_without_decay(ctx) is not True or ctx.n < 20:
            return []
        candidates: list[tuple[str | None, np.ndarray, np.ndarray, float]] = []
        lw = ctx.log.layer_weight
        if not lw.empty:
            for name in lw.columns:
                shape = ctx.layer_info.get(str(name), {}).get("shape") or []
                if len(shape) < 2:
                    continue
                col = lw[name].to_numpy(dtype=np.float64)
                ok = col >= 0
                candidates.append((str(name), lw.index.to_numpy(dtype=np.int64)[ok], col[ok],
                                   math.sqrt(2.0 * float(shape[0]))))
        if not candidates:
            candidates.append((None, ctx.step, ctx.col("weight_norm"), 0.0))
        best = None
        for name, steps, values, reference in candidates:
            fin = np.isfinite(values) & (values > 0)
            g = _growth(values[fin], reference)
            if g is None or g["total"] < WEIGHT_GROWTH or g["late"] < LATE_GROWTH:
                continue
            if best is None or g["total"] > best[1]["total"]:
                best = (name, g, steps[fin], values[fin])
        if best is None:
            return []
        name, g, steps, values = best
        onset = int(steps[int(np.argmax(values > 1.5 * g["start"]))])
        harm = {k: v for k, v in loss_harm(ctx).items() if v["step"] >= onset}
        curve = loss_curve(ctx)
        useless = False
        if curve.n >= 20:
            mid = curve.values[curve.n // 2 - curve.window // 2: curve.n // 2 + curve.window // 2 + 1]
            gain_total = curve.start - curve.best
            gain_late = float(np.median(mid)) - curve.final if mid.size else 0.0
            half = values[len(values) // 2:]
            grew_late = half[-1] / half[0] - 1.0 if half.size and half[0] > 0 else 0.0
            useless = gain_total > 0 and gain_late < 0.05 * gain_total and grew_late >= 0.2
        if not harm and not useless:
            return []
        h0 = int(steps[len(steps) // 2])
        lr = _median_lr(ctx, [s for s in ctx.step if s >= h0]) or ctx.lr0
        span = max(1, int(steps[-1]) - h0)
        r = g["rate"] * (len(steps) - len(steps) // 2 - 1) / span  # per record -> per step
        if r > MAX_DECAY_PER_STEP:
            return []  # weights blowing up by > 1% per step: divergence (GP501/GP202), not a missing decay
        recs = []
        if lr and r > 0:
            wd = nice(r / lr)
            recs.append(Recommendation.hyperparameter(
                "weight_decay", 0.0, wd,
                f"the norm grew by {r:.2g} per step (ln scale) over the second half at lr={lr:.3g}; decoupled weight "
                f"decay shrinks the weights by lr x weight_decay per step, so {wd:g} holds the norm where it is"))
            cls = ctx.optimizer_class or "Adam"
            snippet = (f"optimizer = torch.optim.AdamW(model.parameters(), lr={lr:.3g}, weight_decay={wd:g})"
                       if ctx.adaptive else
                       f"optimizer = torch.optim.{cls}(model.parameters(), lr={lr:.3g}, weight_decay={wd:g})")
            recs.append(Recommendation.code("Apply decoupled weight decay", snippet))
        conf = min(1.0, 0.5 + 0.25 * min(1.0, math.log10(g["total"])) + (0.25 if harm else 0.0))
        where = f"the weight matrix {name}" if name else "the total weight norm"
        msg = (f"With no weight decay, {where} grew from {g['start']:.3g} to {g['final']:.3g} "
               f"({g['total']:.1f}x {'its start' if g['initial'] == g['start'] else 'the norm of a Kaiming init'}) and "
               f"was still growing at the end (+{g['late']:.0%} in the last quarter)")
        if harm:
            msg += "; instability followed (" + ", ".join(f"{k} from step {v['step']}" for k, v in harm.items()) + ")."
        else:
            msg += ", while the second half of the run bought almost no loss improvement."
        ev = {"layer": name, "growth": g["total"], "start_norm": g["start"], "reference_norm": g["initial"],
              "final_norm": g["final"], "late_growth": g["late"], "growth_rate_per_step": r, "growth_onset_step": onset,
              "weight_decay": 0.0, "instability_after": sorted(harm), "unproductive": useless}
        # the norms are measured after the optimizer step: the forward of the next step is the
        # first to run with the grown weights (and a gradient spike of the onset step itself,
        # computed before that update, cannot be this growth's doing)
        return [self.finding(confidence=conf, message=msg, first_step=onset + 1, layer=name, evidence=ev,
                             recommendations=recs)]


# ------------------------------------------------------------------------------------------
@register
class LossSpike(Rule):
    """Fires on a spike of the training or validation loss (:func:`gradprobe.analysis.loss_spikes`):
    a record at least 3x its running level (the median of the previous max(window, 10)
    records) and at least 6 robust standard deviations of the running noise above it, whose
    jump undoes at least 5% of the progress the loss had made. Mini-batch losses scatter by
    tens of percent; a batch mean three times the population mean needs a batch made almost
    entirely of the hardest examples. The spike lasts while later records stay that far above
    the level before it. On a per-step training loss a single record never counts (one hard
    or corrupt batch lifts one record; weights knocked off course lift the losses that
    follow), and a spike of L records counts only if the run's own outliers would not produce
    L in a row (n p**L < 0.05, p the run's rate of records at least as far above their running
    level as the spike's lowest record, the spike's own included; so in a run of 80 records or
    fewer two records are not enough). Validation records (and foreign logs' records averaging many
    steps) average a whole pass and count alone.

    A symptom: ``caused_by`` names the root cause found in the same run (an undetached
    state, exploding gradients, a too-high lr, float16 overflow, ...; for the validation
    loss, overfitting: a validation loss that climbs fast while the training loss falls
    crosses 3x its running level).

    Severity: error when the loss did not come back below half-way between its level and the
    peak (the run is broken); warning otherwise. Confidence: 0.5 + 0.5 x min(1, log10(factor
    / 3)) (1.0 at 30x), +0.1 with several spikes.
    """

    code = "GP504"
    slug = "loss-spike"
    severity = "warning"
    title = "The loss jumps far above its running level"
    requires = ("loss",)
    causes = ("undetached-hidden-state", "graph-retained-across-steps", "exploding-gradients", "missing-gradient-clipping",
              "long-lookback", "lr-too-high", "missing-weight-decay", "fp16-overflow", "scaler-misuse", "nonfinite-inputs",
              "input-scale", "degenerate-targets", "overfitting")
    computes = {}
    explanation = Explanation(
        what="The training loss (two steps or more) or the validation loss jumps to several times its running level.",
        why="A spike means the weights were knocked far from where training had brought them; the progress before it "
        "is partly lost, and a run that spikes tends to spike again or diverge.",
        causes="A hidden state carried across batches without detach; exploding gradients without clipping; a learning "
        "rate too high for the current sharpness; float16 overflow; a corrupt batch.",
        fix="Fix the root cause the report links; without one, clip gradients and lower the learning rate.",
        example="Validation loss 45 mV for 119 epochs, then 1000 mV at epoch 120 (an LSTM whose hidden state was "
        "never detached).",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        series: list[tuple[str, LossCurve, list[Any]]] = []
        tr = loss_curve(ctx)
        series.append(("training", tr, loss_spikes(tr)))
        if "eval_loss" in ctx.signals:
            ec = eval_curve(ctx)
            if ec is not None:
                series.append(("validation", ec, loss_spikes(ec)))
        hits = [(name, c, ev) for name, c, ev in series if ev]
        if not hits:
            return []
        events = [(name, e) for name, _, evs in hits for e in evs]
        first_name, first = min(events, key=lambda t: t[1].step)
        worst_name, worst = max(events, key=lambda t: t[1].factor)
        unrecovered = [(n, e) for n, e in events if not e.recovered]
        conf = min(1.0, 0.5 + 0.5 * min(1.0, max(0.0, math.log10(max(worst.factor, 1e-12) / 3.0)))
                   + (0.1 if len(events) > 1 else 0.0))
        ev: dict[str, Any] = {}
        for name, c, evs in hits:
            ev[name] = {"spikes": len(evs), "max_factor": max(e.factor for e in evs),
                        "events": [e.to_json() for e in evs[:5]], "unrecovered": sum(not e.recovered for e in evs)}
        parts = []
        for name, c, evs in hits:
            e = max(evs, key=lambda x: x.factor)
            parts.append(f"the {name} loss spiked {len(evs)} time(s), worst at step {e.peak_step}: {e.peak_value:.4g} "
                         f"against a running level of {e.level:.4g} ({e.factor:.1f}x)")
        msg = "; ".join(parts) + "."
        msg = msg[0].upper() + msg[1:]
        if unrecovered:
            msg += f" The loss never came back after the spike at step {unrecovered[0][1].step}."
        recs = [Recommendation.code(
            "Find what changed at the spike",
            f"# the {first_name} loss first spiked at step {first.step}: inspect that batch and the gradient norm there\n"
            f"total = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))  # norm before the step\n"
            f"if loss.item() > 3 * running_loss:\n"
            f"    print(step, loss.item(), total.item())  # a spike with a huge norm: clip, fix the cause linked above")]
        return [self.finding(confidence=conf, message=msg, first_step=first.step, evidence=ev, recommendations=recs,
                             severity="error" if unrecovered else "warning")]


def _stuck_since(tl: Any, end: int) -> int | None:
    """The first step from which every sampled loss up to ``end`` sat at the trivial
    predictor's level (ratio >= TRIVIAL_LEVEL), None if the last one did not. The first
    sample is the untrained model, at that level by construction: a loss there from the first
    sample on got stuck at the first update, the step after it."""
    r = tl.table.loc[tl.table.index <= end, "ratio"].dropna()
    if r.empty or r.iloc[-1] < TRIVIAL_LEVEL:
        return None
    below = np.flatnonzero(r.to_numpy() < TRIVIAL_LEVEL)
    if below.size:
        return int(r.index[below[-1] + 1])
    return int(r.index[0]) + 1


def _plateau_start(curve: LossCurve) -> int:
    """Record index where the loss stopped improving (see :class:`LossPlateau`)."""
    w = curve.window
    v = curve.values
    nb = curve.n // w
    if nb < 2:
        return 0
    # block medians: the full blocks as the rows of one array, the last block with the remainder
    blocks = np.empty(nb)
    blocks[:-1] = np.median(v[:(nb - 1) * w].reshape(nb - 1, w), axis=1)
    blocks[-1] = np.median(v[(nb - 1) * w:])
    se = 1.25 * curve.noise / math.sqrt(w)
    # the last improved block k: scan back from the end, the median of the blocks after k kept
    # exactly by two heaps (lower half as a max-heap of negatives, upper half as a min-heap)
    # instead of a median of the whole suffix per block (quadratic on long runs)
    lower: list[float] = []
    upper: list[float] = []
    for k in range(nb - 2, -1, -1):
        x = float(blocks[k + 1])
        if lower and x > -lower[0]:
            heapq.heappush(upper, x)
        else:
            heapq.heappush(lower, -x)
        if len(lower) > len(upper) + 1:
            heapq.heappush(upper, -heapq.heappop(lower))
        elif len(upper) > len(lower):
            heapq.heappush(lower, -heapq.heappop(upper))
        med = -lower[0] if len(lower) > len(upper) else (-lower[0] + upper[0]) / 2
        tol = max(PLATEAU_IMPROVEMENT * abs(blocks[k]), 4.0 * se)
        if blocks[k] - med > tol:
            return int(k + 1) * w
    return 0


# ------------------------------------------------------------------------------------------
@register
class LossPlateau(Rule):
    """Fires when the training loss stopped improving long before the run ended, at a level
    that is not convergence.

    Plateau (:func:`_plateau_start`): the records are cut into consecutive blocks of one
    smoothing window; the plateau starts after the last block whose median lies above the
    median of the blocks after it by more than max(1% of its level, 4 standard errors of a
    block median): after that the loss did not go on improving. 4 standard errors: one odd
    block among ~20 under pure noise stays below it. The run must go on for at least 30% of
    its records and 2 blocks after that.

    Not convergence: the plateau's loss is at least 0.8x the loss of a model that ignores its
    input (under MSE predicting the data's mean: the batch variance plus the batch mean's
    squared distance from the data's mean; under cross-entropy the uniform distribution,
    ln n_classes; under binary cross-entropy the base rate), step by step on the sampled
    target statistics when the plateau holds 2 or more samples, else its level against the
    median baseline, and only when the first sampled loss matches that baseline's scale (not
    reduction="sum", not re-weighted). Within 20% of the trivial loss the model has learned
    (almost) nothing about its input.

    Not judged: runs with fewer than 50 finite loss records (``MIN_PLATEAU_RECORDS``: too
    young to call stuck); runs with several optimizers (GANs, multi-objective loops: their
    summed losses are adversarial and need not decrease); a loss that ended above where it started
    by 10% and by noise (``LossCurve.rose``; divergence: GP501, GP504), and, where the trivial
    loss is known, by 10% relative to it too (the median loss/baseline ratio of the second
    half against the first: batches of different target variance move the raw loss while the
    model stays at the trivial level); a loss that went non-finite and never came back (the
    run broke, GP401-GP403: its finite part ends where it broke, not where the run meant to
    end, and a young model's first steps are no plateau).

    Without target statistics (foreign logs, custom losses) it fires only when the loss never
    moved at all: under 5% below both its first record and its first window and not 5% above
    its first window, with the plateau starting in the first tenth of the run, and (where
    target statistics exist but their scale does not match) not already 3x below the loss of
    predictions unrelated to the targets (a model trained before it was watched). A run that
    learned and then flattened at a low level (e.g. ReduceLROnPlateau at its floor) is not a
    finding.

    A symptom: ``caused_by`` names the root cause found (lr-too-low, dead units, saturation,
    or an overflow or explosion that wrecked the weights before the plateau...). Its
    ``first_step`` is where the loss got stuck: the plateau's start, or, at the trivial level,
    the first sampled step from which every sampled loss sat at that level when that is
    earlier (a loss that never left the trivial level was stuck from the start, whatever
    noise made its last "improvement"), so that a fault that began later (units dying in a
    run that never learned anything) is not linked as its cause.
    Confidence: 0.5 + 0.3 x min(1, (plateau fraction - 0.3) / 0.4) + 0.2 when the predictions
    do not vary with the input (across-batch spread < 5% of the target std, or of 1 nat for
    logits); 0.4 + 0.3 x the same fraction term without a baseline.
    """

    code = "GP505"
    slug = "loss-plateau"
    severity = "warning"
    title = "The loss stopped decreasing at a level that is not convergence"
    requires = ("loss",)
    causes = ("lr-too-low", "dead-units", "saturated-activations", "vanishing-gradients", "poor-initialization",
              "overclipping", "input-scale", "degenerate-targets", "amp-without-scaler", "lr-too-high",
              "fp16-overflow", "exploding-gradients", "undetached-hidden-state")
    computes = {}
    explanation = Explanation(
        what="The training loss stopped improving long before the run ended, stuck at (or above) the loss of a model "
        "that ignores its input: the target variance under MSE, ln(n_classes) under cross-entropy.",
        why="The rest of the run is wasted: the model predicts the mean or the class frequencies and nothing the input "
        "says reaches the output.",
        causes="Dead ReLUs or saturated units; a learning rate too low to move or so high the net collapsed; vanishing "
        "gradients from a bad initialisation; over-aggressive clipping; targets that carry no signal.",
        fix="Fix the root cause the report links. Check that the predictions vary with the input "
        "(model(x).std(0) > 0) and that gradients reach the first layers.",
        example="An MLP regressor whose loss sits at 9.8 from step 20 to step 500 with a target variance of 10: "
        "it predicts the mean.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        curve = loss_curve(ctx)
        n = curve.n
        if n < MIN_PLATEAU_RECORDS or len(ctx.meta.get("optimizers") or []) > 1:
            return []
        if curve.nonfinite_step is not None and not (curve.steps > curve.nonfinite_step).any():
            return []  # the run broke (GP401-GP403): its finite part ends there, not where the run meant to end
        w = curve.window
        last = _plateau_start(curve)
        length = n - 1 - last
        frac = length / n
        if frac < PLATEAU_FRACTION or length < 2 * w:
            return []
        level = float(np.median(curve.values[last:]))
        start = int(curve.steps[last])
        end = int(curve.steps[-1])
        tl = trivial_loss(ctx)
        if tl.consistent:
            # judged against the trivial level: batches of different variance move the raw loss
            lo, mid = int(curve.steps[0]), int(curve.steps[n // 2])
            early, late = tl.ratio_between(lo, mid), tl.ratio_between(mid, end)
            rose = math.isfinite(early) and math.isfinite(late) and late - early >= 0.1 * early and curve.rose
        else:
            rose = curve.rose
        if rose:
            return []  # a rising loss is divergence (GP501/GP504), not a plateau
        base_ratio = math.nan
        if tl.consistent:
            in_plateau = tl.table.loc[(tl.table.index >= start) & (tl.table.index <= end), "ratio"].dropna()
            baseline = float(tl.table["baseline"].median())
            # step by step where the plateau holds 2+ samples; else its level against the
            # median baseline (a target variance is a property of the data, not of one batch)
            base_ratio = float(in_plateau.median()) if len(in_plateau) >= 2 else level / baseline
        ev: dict[str, Any] = {"plateau_start_step": start, "plateau_level": level, "plateau_fraction": frac,
                              "loss_initial": float(curve.values[0]), "records": n}
        first_step = start
        f_term = min(1.0, max(0.0, (frac - PLATEAU_FRACTION) / 0.4))
        constant_pred = False
        if math.isfinite(base_ratio):
            if base_ratio < TRIVIAL_LEVEL:
                return []
            spread = tl.pred_spread[(tl.pred_spread.index >= start) & (tl.pred_spread.index <= end)]
            constant_pred = bool(len(spread)) and float(spread.median()) < 0.05
            ev.update({"trivial_loss": baseline, "loss_over_trivial": base_ratio, "trivial_kinds": tl.kinds,
                       "prediction_spread": float(spread.median()) if len(spread) else None})
            conf = 0.5 + 0.3 * f_term + (0.2 if constant_pred else 0.0)
            kinds = {"mean": "predicting the target mean (MSE = target variance)",
                     "uniform": "predicting the uniform distribution (cross-entropy = ln n_classes)",
                     "base-rate": "predicting the base rate (binary cross-entropy = its entropy)"}
            what = " / ".join(kinds[k] for k in tl.kinds if k in kinds)
            msg = (f"The training loss has not improved since step {start} ({frac:.0%} of the run) and sits at "
                   f"{level:.4g}, {base_ratio:.2f}x the loss of {what} (median {baseline:.4g}): the model has "
                   f"learned (almost) nothing from its input.")
            if constant_pred:
                msg += " Its predictions barely vary across the batch."
            stuck = _stuck_since(tl, end)
            if stuck is not None and stuck < start:
                ev["at_trivial_since_step"] = stuck
                msg += f" It has sat at that level since step {stuck}."
                first_step = stuck
        else:
            first = float(curve.values[0])
            moved = max(curve.progress, (first - curve.final) / abs(first) if first != 0 else 0.0)
            rose = (curve.final - curve.initial) / abs(curve.initial) if curve.initial != 0 else 0.0
            if last > 0.1 * n or moved >= 0.05 or rose >= 0.05:
                return []  # it learned, or it rose (divergence: GP501), not a plateau
            if tl.first_over_expected < 1 / 3:
                return []  # already far below the loss of unrelated predictions: trained before it was watched
            ev["progress"] = moved
            conf = 0.4 + 0.3 * f_term
            msg = (f"The training loss never decreased: it sits at {level:.4g} from step {start} to step {end} "
                   f"({moved:.1%} below where it started).")
        recs = [Recommendation.code(
            "Check that the predictions depend on the input and that gradients reach the first layer",
            "with torch.no_grad():\n"
            "    out = model(x)\n"
            "print(out.std(dim=0))            # ~0: the model ignores its input (dead/saturated units, zero init)\n"
            "loss_fn(model(x), y).backward()\n"
            "for n, p in model.named_parameters():\n"
            "    print(n, p.grad.norm().item() if p.grad is not None else None)  # ~0 early on: vanishing")]
        return [self.finding(confidence=conf, message=msg, first_step=first_step, evidence=ev, recommendations=recs)]


# ------------------------------------------------------------------------------------------
@register
class Overfitting(Rule):
    """Fires when the validation loss (``probe.log(val_loss=...)``, loss functions computed
    without grad, or a foreign log's eval loss; at least 5 records) rose after its minimum
    while the training loss kept falling.

    Minimum: the lowest point of the validation series lightly smoothed (centred median of 3,
    so one lucky evaluation is not the minimum). Rise: the median of the last min(3, half of
    the records after the minimum) records is at least 10% above the minimum and more than
    3 robust standard deviations of the validation noise (the curve's ``noise``: 1.4826 x the
    median absolute residual about its rolling median), with at least 3 records after the
    minimum. Training still falling: the training loss's level at the end is at least 5%
    below its level at the validation minimum (and by more than 2 standard errors): the two
    curves diverge, the signature of memorising the training set. A validation loss that
    rises together with the training loss is divergence (GP501), not overfitting.

    Confidence: 0.5 + 0.25 x min(1, rise / 0.5) + 0.25 x min(1, (records after the minimum -
    2) / 5).
    """

    code = "GP506"
    slug = "overfitting"
    severity = "warning"
    title = "The validation loss rises while the training loss keeps falling"
    requires = ("loss", "eval_loss")
    causes = ("missing-weight-decay",)
    computes = {}
    explanation = Explanation(
        what="After its minimum the validation loss rises while the training loss keeps falling.",
        why="The model is memorising the training set: every step after the validation minimum makes the model you "
        "will deploy worse.",
        causes="Too little data for the model's capacity; no regularisation (weight decay, dropout, augmentation); "
        "training far past the best epoch.",
        fix="Keep the checkpoint from the validation minimum (early stopping); add weight decay, dropout or data "
        "augmentation, or use a smaller model or more data.",
        example="val_loss 0.41 at step 300, 0.95 at step 2000 while the training loss falls from 0.3 to 0.01.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        ec = eval_curve(ctx)
        tr = loss_curve(ctx)
        if ec is None or ec.n < 5 or tr.n < 10:
            return []
        v = ec.values
        sm = np.array([np.median(v[max(0, i - 1): i + 2]) for i in range(ec.n)])
        k = int(np.argmin(sm))
        after = ec.n - 1 - k
        if after < 3:
            return []
        vmin = float(sm[k])
        tail = v[-min(3, max(1, after // 2)):]
        vend = float(np.median(tail))
        rise = (vend - vmin) / abs(vmin) if vmin != 0 else math.inf
        noise = ec.noise
        if rise < OVERFIT_RISE or vend - vmin <= 3.0 * noise:
            return []
        s_min = int(ec.steps[k])
        ti = tr.index_at(s_min)
        lo = max(0, ti - tr.window // 2)
        seg = tr.values[lo: lo + tr.window]
        if not seg.size:
            return []
        t_at = float(np.median(seg))
        t_end = tr.final
        se = 1.25 * tr.noise / math.sqrt(tr.window)
        fall = (t_at - t_end) / abs(t_at) if t_at != 0 else 0.0
        if fall < OVERFIT_TRAIN_FALL or t_at - t_end <= 2.0 * se:
            return []
        conf = 0.5 + 0.25 * min(1.0, rise / 0.5) + 0.25 * min(1.0, (after - 2) / 5.0)
        ev = {"best_val_step": s_min, "best_val_loss": vmin, "final_val_loss": vend, "val_rise": rise,
              "train_loss_at_best_val": t_at, "final_train_loss": t_end, "train_fall": fall,
              "val_records_after_best": after, "val_records": ec.n}
        # evaluations that noise alone can keep above the minimum: 3 noise units against the 10% rise
        patience = max(2, min(after, int(math.ceil(3.0 * noise / max(abs(vmin) * OVERFIT_RISE, 1e-300)))))
        recs = [Recommendation.code(
            "Stop at the validation minimum and keep that checkpoint",
            f"best, bad = float('inf'), 0\n"
            f"for epoch in range(epochs):\n"
            f"    train_one_epoch(); val = evaluate()\n"
            f"    if val < best:\n"
            f"        best, bad = val, 0\n"
            f"        torch.save(model.state_dict(), 'best.pt')   # this run's best was at step {s_min}\n"
            f"    else:\n"
            f"        bad += 1\n"
            f"        if bad >= {patience}:   # evaluations without improvement\n"
            f"            break")]
        msg = (f"The validation loss reached its minimum {vmin:.4g} at step {s_min} and rose {rise:.0%} to {vend:.4g} "
               f"over the next {after} evaluations, while the training loss fell {fall:.0%} ({t_at:.4g} -> {t_end:.4g}).")
        return [self.finding(confidence=conf, message=msg, first_step=s_min, evidence=ev, recommendations=recs)]
