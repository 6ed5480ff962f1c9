"""GP501-GP502: the learning rate (lr-too-high, lr-too-low).

The mechanics these rules reason from. One optimizer step changes a weight matrix W by dW;
the update-to-weight ratio ||dW|| / ||W|| says how far a step moves the weights relative to
their own size. Around 1e-3 a run moves steadily: a few thousand steps can move the weights by
their own scale, and no single step overshoots. For Adam-like optimizers the per-element step
is about lr (the gradient is normalised by its running RMS), so the ratio is about lr / rms(W)
and scales linearly with lr. For SGD-like optimizers the step is lr x gradient (x 1/(1-momentum)
in steady state); at a given point of training the gradient does not depend on lr, so the
ratio again scales linearly with lr. Either way ``lr x target / ratio`` is the learning rate
at which the measured steps would have had the target size.

A large ratio alone is not a fault (small networks train well at 1e-2); it is one when the
loss shows the harm: it rises, spikes, diverges, or goes non-finite. A small ratio alone is
not a fault either: a converged run, or one whose scheduler decayed the lr, takes small steps
by design; it is one when the loss barely moves while far from converged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    RISE_FACTOR,
    SPIKE_ABOVE_SUSTAINED,
    TARGET_UPDATE_RATIO,
    TRIVIAL_LEVEL,
    RunContext,
    TrivialLoss,
    class_ordered_batches,
    diverged_into_nonfinite,
    exploding_through_time,
    grad_spikes,
    loss_curve,
    loss_harm,
    lr_following,
    median_lr,
    nice,
    optimizer_family,
    tiny_targets,
    trained_stably_before,
    trivial_loss,
    update_ratio_by_step,
    warmup_rows,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Flag, Ramp, Recommendation, Rule, register

#: GP501 acts from a median update-to-weight ratio of 1e-2: a decade above the target ratio.
RATIO_HIGH = 1e-2
#: ... and without any other harm, when the loss makes no progress at 1e-1 (every step moves
#: the weights by a tenth of their size: the run cannot settle into anything).
RATIO_RUNAWAY = 1e-1
#: GP502 acts from a median ratio of 1e-4 down: a decade below the target ratio.
RATIO_LOW = 1e-4
#: Adam-like steps move each weight entry by about lr at most; the weight matrices of standard
#: initialisations have an element RMS of at least 1e-2 (1 / sqrt(fan_in), fan_in up to 10^4).
#: Together they bound the update-to-weight ratio by lr / 1e-2 with no measurement (GP502).
WEIGHT_RMS_MIN = 1e-2
#: GP502 (and GP501's stall form) need a loss curve of at least this many records to see its
#: pace; any judgement of the loss at least ``MIN_LOSS_RECORDS``.
MIN_CURVE_RECORDS = 10
MIN_LOSS_RECORDS = 6
#: The loss "barely moves" when it lost less than this fraction of its starting level.
BARELY_MOVES = 0.10
#: GP501's lr suggestion aims here, half a decade above the centre. A too-high lr is measured
#: on the run's first steps (before the harm), where Adam moves every element by the full lr
#: (m / sqrt(v) is exactly +-1 at the first step, a fraction of it once the moments average
#: the noise) and SGD steps on the largest gradients of the run: extrapolating that ratio
#: linearly to a new lr overstates the new lr's steady ratio by a factor of a few. Aiming at
#: 10**-2.5 keeps a sqrt(10) margin under GP501's threshold (1e-2) if the extrapolation is
#: exact, and does not give away the 3x of progress per step that aiming at the centre would.
SUGGEST_RATIO_WHEN_TOO_HIGH = 10 ** -2.5
#: GP501: the lr "climbed" when it reached this many times its value at the loss's best point.
LR_CLIMB = 1.5
#: GP501: a loss that rose above its start within this many smoothing windows of the first
#: record got worse from the first updates on (the untrained model was better).
EARLY_WINDOWS = 2
#: GP501: the instability was early (a warmup, not a lower lr, is the fix) when it began in
#: this first fraction of the run.
EARLY_FRACTION = 0.25
#: GP501: a gradient spike is clean (the gradient exploded on its own) when its batch's loss is
#: at most ``RISE_FACTOR`` x the median of this many losses before it.
LOSSES_BEFORE_SPIKE = 10
#: GP501: how strongly each harm this module finds says "the steps are too large" (``c_harm``;
#: loss_harm's own: non-finite or diverged 1.0, unrecovered spikes 0.9, regression 0.8, spikes
#: 0.7): a loss that climbed with the lr, or collapsed to the trivial level, as strongly as a
#: regression; no progress at all only weakly (a run can fail to learn for many reasons).
HARM_ROSE_WITH_LR = 0.8
HARM_COLLAPSED = 0.8
HARM_NO_PROGRESS = 0.6
#: GP502: a first loss this far below the loss of predictions unrelated to the targets comes
#: from a model trained before it was watched.
TRAINED_BEFORE = 1 / 3
#: GP502 without ratios: the loss is "still falling" when at least this fraction of what it
#: can still gain lies ahead at the end. A loss approaching its floor as L_inf + A e^(-t/tau)
#: drops by d1 = A(1 - q) over the first half of T steps and d2 = q d1 over the second, with
#: q = e^(-T/(2 tau)); what is left at the end is A q^2 of the whole drop A. So the second
#: half's drop must be at least sqrt(STILL_AHEAD) = 0.32 of the first's: a run that has
#: converged has q near 0 (its second half is flat), one starved of step size keeps q near 1.
STILL_AHEAD = 0.1
#: GP502's decayed form: the lr at or below this fraction of its maximum is decayed to nothing
#: (three decades: steps that were ~1e-3 of the weights become ~1e-6, a million steps to move
#: a weight by its own size), ...
DECAYED = 1e-3
#: ... over at least this fraction of the run's steps (a schedule that anneals to ~0 spends its
#: last few percent there, after the loss converged), ...
DECAYED_FRACTION = 0.5
#: ... with the loss over that stretch still at half the trivial predictor's loss or more.
FAR_FROM_CONVERGED = 0.5
#: The catalog's example for GP501: Adam at lr 1.0 stepping 0.3x the weights' size.
_EXAMPLE_LR, _EXAMPLE_RATIO = 1.0, 0.3


def _rose_with_lr(ctx: RunContext) -> dict[str, Any] | None:
    """The loss rose as the learning rate rose: after its best point the smoothed loss climbed
    by more than the curve's significance (noise, and 10% of its start) while the lr at the top
    of that climb was at least ``LR_CLIMB`` times the lr at the best point (a warmup, a
    one-cycle ramp, a manual increase). A healthy warmup lowers the loss as the lr climbs; a
    loss that climbs with it is taking steps larger than the loss surface allows. Returns the
    best and top steps, their losses and lrs, or None."""
    curve = loss_curve(ctx)
    if curve.n < 2 * curve.window or not ctx.n:
        return None
    b = curve.best_index
    if b >= curve.n - curve.window:
        return None
    top = b + int(np.argmax(curve.smooth[b:]))
    rise = float(curve.smooth[top] - curve.best)
    if rise <= curve.significance:
        return None
    lr_best = ctx.lr[ctx.row_of(int(curve.steps[b]))]
    lr_top = ctx.lr[ctx.row_of(int(curve.steps[top]))]
    if not (np.isfinite(lr_best) and np.isfinite(lr_top) and lr_best > 0 and lr_top >= LR_CLIMB * lr_best):
        return None
    return {"step": int(curve.steps[b]), "strength": HARM_ROSE_WITH_LR, "best": curve.best, "top": float(curve.smooth[top]),
            "top_step": int(curve.steps[top]), "lr_at_best": float(lr_best), "lr_at_top": float(lr_top)}


def _collapse_step(tl: TrivialLoss, last: int) -> int | None:
    """The first sampled step from which the loss sits at its trivial level (ratio to the
    trivial loss at or above ``TRIVIAL_LEVEL`` there and in the median of every later sampled
    step): where a collapse ended. None without target samples."""
    t = tl.table["ratio"].dropna() if not tl.table.empty else None
    if t is None or not len(t):
        return None
    for s, r in t.items():
        if r >= TRIVIAL_LEVEL and tl.ratio_between(int(s), last) >= TRIVIAL_LEVEL:
            return int(s)
    return None


def _onset(harm: dict[str, dict[str, Any]]) -> int | None:
    steps = [h["step"] for h in harm.values() if h.get("step") is not None]
    return int(min(steps)) if steps else None


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
    warm = warmup_rows(ctx)
    for r in sp.rows[:1]:  # the first spike: after it the run is no longer the ordinary one
        if r < warm:
            return None  # the first steps: a too-large first update shows as a gradient jump first
        scale = max(float(np.nan_to_num(sp.level[r], nan=0.0)), float(sp.sustained[r]))
        if clip[r] and np.isfinite(s[r]) and s[r] <= SPIKE_ABOVE_SUSTAINED * scale:
            continue  # contained by clipping: no harm can come from it
        before = loss[max(0, r - LOSSES_BEFORE_SPIKE):r]
        before = before[np.isfinite(before)]
        if not before.size or not np.isfinite(loss[r]):
            continue
        if loss[r] <= RISE_FACTOR * float(np.median(before)):
            return ctx.step_at(int(r))
    return None


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
    * spikes, a regression, a divergence or a stall do not count when the batches each hold one class
      (:func:`~gradprobe.analysis.class_ordered_batches`): every lr forgets the last class on
      the next one, and the loss's level is then the current class's (GP504 says so).
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

    Confidence: the step size and the harm weigh the same. c_ratio: 0.5 at 1e-2, whole a
    decade higher (every step moves the weights by a tenth of their size); without ratios the
    step size is only inferred. c_harm: the strongest harm (non-finite/diverged 1.0,
    unrecovered spikes 0.9, regression, collapse to the trivial level or a loss that climbed
    with the lr 0.8, spikes 0.7, no progress 0.6). A harm that followed the lr up adds to it.
    """

    code = "GP501"
    slug = "lr-too-high"
    severity = "warning"
    title = "Learning rate too high: updates are large relative to the weights and the loss suffers"
    confidence = {
        "confidence": Confidence(0, Ramp(0.5, "c_ratio"), Ramp(0.5, "c_harm"), Flag(0.1, "the harm followed the lr")),
        "c_ratio": Confidence(0.5, Ramp(0.5, "update ratio", start=RATIO_HIGH, log=True)),
        "c_ratio without ratios": Confidence(0.3),
    }
    severities = {
        "warning": "the loss spiked and recovered, regressed, or made no progress at runaway steps",
        "error": "the loss went non-finite, diverged, collapsed to the trivial level, or a spike never recovered",
    }
    requires = ("loss",)
    causes = ("input-scale",)
    #: a recurrent gradient that grows backwards through time from before the harm makes every
    #: step large at any lr: the harm is the recurrence's
    causes_on_evidence = ("long-lookback",)
    computes = {
        "lr": f"lr x {SUGGEST_RATIO_WHEN_TOO_HIGH:.3g} (10**-2.5) / median update-to-weight ratio of the weight "
        "matrices before the harm began (SGD- and Adam-like optimizers; without ratios: the lr one smoothing window "
        "before the instability began, when the harm followed the lr up)",
        "warmup_steps": "the step at which an early, recovered instability ended",
    }
    evidence_fields = {
        "update_ratio": Field("median update-to-weight ratio"),
        "target_update_ratio": Field("steady ratio"),
        "ratio_steps": Field("ratios sampled at", "step"),
        "lr": Field("lr", "lr"),
        "optimizer": Field("optimizer"),
        "optimizer_family": Field("optimizer family"),
        "loss_start": Field("loss at the start", "loss"),
        "loss_best": Field("best loss", "loss"),
        "loss_final": Field("loss at the end", "loss"),
        "harm": Field("harm in the loss"),
        "spike_events": Field("loss spikes"),
        "lr_following": Field("the lr before and at the onset"),
    }
    explanation = Explanation(
        what="Optimizer steps that change the weights by a large fraction of their size (update-to-weight ratio "
        "far above ~1e-3) together with harm in the loss: it rises, spikes, diverges, goes NaN, or cannot settle.",
        why="A step much larger than the scale over which the loss is smooth overshoots the minimum: the loss "
        "bounces, grows, or blows up to inf/NaN, and ReLUs die or tanh units saturate on the way.",
        causes="A learning rate copied from a different model size or optimizer (SGD's 0.1 used with Adam); no warmup "
        "for Adam or a Transformer; a batch-size change without rescaling lr; a loss summed instead of averaged "
        "under SGD (the step grows with the batch).",
        fix=f"Lower the learning rate to the suggested value (it gives updates of ~{SUGGEST_RATIO_WHEN_TOO_HIGH:.1g} of "
        "the weights per step); when only the first steps are unstable, add a linear warmup instead.",
        example=f"Adam(lr={_EXAMPLE_LR:g}) on an MLP: updates of {_EXAMPLE_RATIO:g}x the weights per step, the loss "
        f"climbs from 2.3 to 40: lr={nice(_EXAMPLE_LR * SUGGEST_RATIO_WHEN_TOO_HIGH / _EXAMPLE_RATIO):g} "
        f"({_EXAMPLE_LR:g} x {SUGGEST_RATIO_WHEN_TOO_HIGH:.3g} / {_EXAMPLE_RATIO:g}) restores a decreasing loss.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        curve = loss_curve(ctx)
        if curve.n < MIN_LOSS_RECORDS and "nonfinite" not in loss_harm(ctx):
            return []
        if tiny_targets(ctx):
            return []  # a loss on targets of 1e-3 or less moves by a whole target range per step at any lr (GP602)
        harm = dict(loss_harm(ctx))
        if "nonfinite" in harm and not diverged_into_nonfinite(ctx, harm["nonfinite"]["step"]) \
                and lr_following(ctx, harm["nonfinite"]["step"]) is None:
            del harm["nonfinite"]  # a loss or backward bug, or eps=0, at an lr that did not climb: not the step size
        if "diverged" in harm and curve.index_at(harm["diverged"]["step"]) <= EARLY_WINDOWS * curve.window:
            # worse than the untrained model right after the first updates: the steps overshoot
            harm["diverged"] = {**harm["diverged"], "early": True}
        rose = _rose_with_lr(ctx)
        if rose is not None and not ({"diverged", "regressed"} & set(harm)):
            harm["rose_with_lr"] = rose
        for k in ("nonfinite", "spikes", "regressed", "diverged"):
            if k in harm and trained_stably_before(ctx, harm[k]["step"]):
                del harm[k]  # trained stably at this lr before: something else changed at the onset
        ordered = class_ordered_batches(ctx) is not None
        if ordered:
            for k in ("spikes", "regressed", "diverged"):  # batches of one class each: every lr forgets the
                harm.pop(k, None)  # last class on the next one, the loss's level is the class's (GP504)
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
        follow = lr_following(ctx, onset)
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
            if curve.n >= MIN_CURVE_RECORDS:
                tl = trivial_loss(ctx)
                mid = int(curve.steps[curve.n // 2])
                # at (or above) the trivial level in the second half: collapsed, whatever the loss
                # "fell" from a start the first oversized steps blew up
                at_trivial = tl.consistent and tl.ratio_between(mid, int(curve.steps[-1])) >= TRIVIAL_LEVEL
                # a collapse happens while the steps are largest relative to the weights: under a
                # too-high lr the weights then grow (and Adam's noise-averaged steps shrink) until
                # the relative step is ordinary. The steps that did it are those up to the step the
                # loss reached the trivial level for good; a fixed early window dilutes them when the
                # collapse took one or two steps (Adam at lr 0.1: 0.38 of the weights at step 1, 0.24
                # at step 2, 0.1 by step 5, 0.01 by step 22)
                early_end = int(curve.steps[min(curve.n - 1, 2 * curve.window)])
                if at_trivial:
                    collapse = _collapse_step(tl, int(curve.steps[-1]))
                    sampled = [int(s) for s in ratios.index if s >= 1]
                    if collapse is not None and len(sampled) >= 2:
                        early_end = max(collapse, sampled[1])
                early = ratios[(ratios.index >= 1) & (ratios.index <= early_end)]
                stall_ratio = max(ratio, float(early.median()) if len(early) >= 2 else ratio)
                # a stall after an explosion is its aftermath; batches of one class each stall any lr
                wrecked = (exploded is not None and exploded <= mid) or ordered
                if at_trivial and stall_ratio >= RATIO_RUNAWAY and not wrecked:
                    harm["stalled"] = {"step": int(curve.steps[0]), "strength": HARM_COLLAPSED,
                                       "progress": curve.progress, "at_trivial_loss": True,
                                       "early_update_ratio": stall_ratio}
                elif stall_ratio >= RATIO_RUNAWAY and not harm and not wrecked and not curve.fell:
                    harm["stalled"] = {"step": int(curve.steps[0]), "strength": HARM_NO_PROGRESS,
                                       "progress": curve.progress, "early_update_ratio": stall_ratio}
            if not harm:
                return []
            onset = _onset(harm)
        elif not harm or (follow is None and "rose_with_lr" not in harm
                          and not harm.get("diverged", {}).get("early")):
            return []

        strongest = max(h["strength"] for h in harm.values())
        if ratio is not None:
            c_ratio = self.confidence["c_ratio"](ratio)
        else:
            c_ratio = self.confidence["c_ratio without ratios"]()
        conf = self.confidence["confidence"](c_ratio, strongest, follow)
        spikes = harm.get("spikes")
        broken = ("nonfinite" in harm or "diverged" in harm or (spikes is not None and spikes["unrecovered"] > 0)
                  or bool(harm.get("stalled", {}).get("at_trivial_loss")))
        severity = "error" if broken else "warning"

        lr_now = median_lr(ctx, used) if used else (follow["lr_at_onset"] if follow else ctx.lr0)
        recs: list[Recommendation] = []
        early_recovered = (
            onset is not None and curve.n and onset <= curve.steps[0] + EARLY_FRACTION * (curve.steps[-1] - curve.steps[0])
            and spikes is not None and spikes["all_recovered"] and follow is None
            and not ({"nonfinite", "diverged", "regressed", "stalled", "rose_with_lr"} & set(harm))
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
        elif "rose_with_lr" in harm:
            r = harm["rose_with_lr"]
            recs.append(Recommendation.hyperparameter(
                "lr", r["lr_at_top"], nice(r["lr_at_best"]),
                f"the loss was at its best ({r['best']:.4g}) at lr={r['lr_at_best']:.3g} and climbed to {r['top']:.4g} as "
                f"the lr rose to {r['lr_at_top']:.3g}: keep the lr where the loss was still falling"))
        else:
            recs.append(Recommendation.omitted(
                "lr", ctx.lr0, "this log has no update-to-weight ratios to scale the lr by, and the lr did not change "
                "before the harm: lower it (the loss rose from the first updates)"))
        if early_recovered:
            recs.append(Recommendation.code(
                "Warm the learning rate up linearly",
                f"scheduler = torch.optim.lr_scheduler.LambdaLR(\n"
                f"    optimizer, lambda step: min(1.0, (step + 1) / {int(max(1, spikes['last_end_step'] + 1))}))\n"
                f"# call scheduler.step() after every optimizer.step()"))

        what = []
        for k in ("nonfinite", "diverged", "regressed", "rose_with_lr", "spikes", "stalled"):
            h = harm.get(k)
            if h is None or (k == "regressed" and "diverged" in harm):
                continue
            if k == "nonfinite":
                what.append(f"went non-finite at step {h['step']}")
            elif k == "diverged":
                what.append(f"ended above where it started ({curve.start:.4g} -> {curve.final:.4g})"
                            + (", worse from the first updates on" if h.get("early") else ""))
            elif k == "rose_with_lr":
                what.append(f"climbed from its best {h['best']:.4g} (step {h['step']}, lr {h['lr_at_best']:.3g}) to "
                            f"{h['top']:.4g} (step {h['top_step']}) as the lr rose to {h['lr_at_top']:.3g}")
            elif k == "regressed":
                what.append(f"gave back {h['given_back']:.0%} of its progress after step {h['step']}")
            elif k == "spikes":
                what.append(f"spiked {h['count']} time(s) (up to {h['max_factor']:.1f}x its running level, first at "
                            f"step {h['step']})")
            elif h.get("at_trivial_loss"):
                what.append(f"ended at the level of a model that ignores its input ({curve.start:.4g} -> "
                            f"{curve.final:.4g})")
            else:
                what.append(f"barely moved ({curve.progress:.1%} progress)")
        if ratio is not None:
            msg = (f"Optimizer steps change the weight matrices by {ratio:.2g} of their norm (median over sampled "
                   f"steps), {ratio / TARGET_UPDATE_RATIO:.0f}x the ~1e-3 at which training moves steadily, and the "
                   f"loss " + "; ".join(what) + ".")
        elif follow is not None:
            msg = ("The loss " + "; ".join(what) + f" as the learning rate climbed to {follow['lr_at_onset']:.3g} "
                   f"(it was improving at {follow['lr_stable']:.3g}).")
        elif "rose_with_lr" in harm:
            msg = "The loss " + "; ".join(what) + ": it follows the learning rate up."
        else:
            msg = ("The loss " + "; ".join(what) + ": the first updates made the model worse than it was untrained, "
                   "the signature of steps larger than the loss surface allows.")
        if early_recovered:
            msg += " The run recovered and trained at this lr afterwards: the start needs a warmup."
        first = onset
        if ratio is not None:
            upto = ratios[ratios.index <= onset] if onset is not None else ratios
            high = upto[upto >= RATIO_HIGH]
            first = int(high.index[0]) if len(high) else (used[0] if used else onset)
        through_time = exploding_through_time(ctx)
        follow = ["long-lookback"] if through_time is not None and (first is None or through_time <= first) else []
        return [self.finding(confidence=conf, message=msg, first_step=first, evidence=ev, recommendations=recs,
                             severity=severity, may_follow=follow)]


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

    Decayed to nothing (:meth:`_decayed`): the lr itself at or below 1e-3 of its maximum for
    at least half of the run while the loss stayed at half the trivial predictor's loss or more
    (a scheduler stepped per batch with a schedule written in epochs). Confidence 0.6, whole
    when 90% of the run was decayed.

    Confidence: the step size and the stall weigh the same. c_ratio: 0.5 at 1e-4, whole two
    decades lower; the stall term falls from whole (no progress) to 0 at 10% progress, and a
    loss that did progress more than that (within its noise) takes confidence away. Without
    ratios, from the bound on the ratio in the same way, and more when the loss is still
    falling at the first half's pace (starved of step size) than when it barely moved.
    """

    code = "GP502"
    slug = "lr-too-low"
    severity = "warning"
    title = "Learning rate too low: updates are tiny and the loss barely moves"
    requires = ("loss",)
    confidence = {
        "confidence": Confidence(0, Ramp(0.5, "c_ratio"),
                                 Ramp(0.5, "max(0, progress)", span=BARELY_MOVES, falling=True, clip=False)),
        "c_ratio": Confidence(0.5, Ramp(0.5, "1e-4 / update ratio", start=1.0, span=2.0, log=True)),
        "without ratios, from the lr": Confidence(
            0.5, Ramp(0.25, "1e-4 / update-ratio bound", start=1.0, span=2.0, log=True),
            Flag(0.25, "the loss is still falling", otherwise=0.1)),
        "decayed": Confidence(0.6, Ramp(0.4, "decayed fraction of the run", start=DECAYED_FRACTION, span=0.4)),
    }
    causes = ("overclipping", "poor-initialization", "saturated-activations", "dead-units", "vanishing-gradients")
    computes = {"lr": f"lr x {TARGET_UPDATE_RATIO:g} / median update-to-weight ratio of the weight matrices at the "
                "configured lr"}
    evidence_fields = {
        "update_ratio": Field("median update-to-weight ratio"),
        "lr_final": Field("lr at the end", "lr"),
        "decayed_from_step": Field("decayed to nothing from", "step"),
        "decayed_fraction": Field("of the run decayed", "%"),
        "target_update_ratio": Field("steady ratio"),
        "ratio_steps": Field("ratios sampled at", "step"),
        "lr": Field("lr", "lr"),
        "optimizer": Field("optimizer"),
        "loss_initial": Field("loss at the start", "loss"),
        "loss_final": Field("loss at the end", "loss"),
        "progress": Field("progress", "%"),
        "loss_over_trivial": Field("loss over the trivial loss", "x"),
        "trivial_loss_kinds": Field("trivial loss"),
        "grad_norm_initial": Field("gradient norm at the start", "norm"),
        "grad_norm_final": Field("gradient norm at the end", "norm"),
        "update_ratio_bound": Field("largest possible update-to-weight ratio"),
    }
    explanation = Explanation(
        what="Optimizer steps that change the weights by a tiny fraction of their size (update-to-weight ratio far "
        "below ~1e-3) while the loss barely moves and is far from converged.",
        why="At a ratio of 1e-6 the weights need a million steps to move by their own size: the run spends its "
        "budget standing still.",
        causes="A learning rate meant for a different optimizer (Adam's 1e-4 used with SGD); an lr divided twice "
        "(by the batch size and by accumulation steps); a loss of very small scale under SGD (the gradient, and so "
        "the step, shrinks with it).",
        fix="Raise the learning rate to the suggested value (steps of ~1e-3 of the weights).",
        example=f"SGD(lr=1e-6): update-to-weight ratio 3e-8, the loss moves 0.01% in 200 steps: "
        f"lr={nice(1e-6 * TARGET_UPDATE_RATIO / 3e-8):g}.",
    )

    def _from_the_lr(self, ctx: RunContext, curve: Any) -> list[Finding]:
        """Without sampled update ratios (a foreign log): an Adam-like step moves every weight
        entry by at most about lr (|m / sqrt(v)| <= ~1), and the weight matrices of any standard
        initialisation have an element RMS of at least ``WEIGHT_RMS_MIN`` (1 / sqrt(fan_in) for
        fan_in up to 10^4), so an lr at most ``RATIO_LOW`` x ``WEIGHT_RMS_MIN`` bounds every
        update-to-weight ratio below ``RATIO_LOW`` without measuring it. It fires when that
        bound holds over the whole run and the loss is far from converged: it barely moved, or
        it is still falling at the end with at least a tenth of what it can gain still ahead
        (``STILL_AHEAD``: under an exponential approach to its floor, a second half's drop at
        least 0.32 of the first half's; a converging run flattens out, one starved of step
        size falls at nearly the same slow pace throughout)."""
        if optimizer_family(ctx) != "adaptive" or curve.n < MIN_CURVE_RECORDS:
            return []
        lr = ctx.lr[np.isfinite(ctx.lr) & (ctx.lr > 0)]
        if not lr.size:
            return []
        lr_max = float(lr.max())
        bound = lr_max / WEIGHT_RMS_MIN
        if bound > RATIO_LOW:
            return []
        half = curve.n // 2
        d1 = float(curve.smooth[0] - curve.smooth[half])
        d2 = float(curve.smooth[half] - curve.smooth[-1])
        still_falling = d2 > curve.significance / 2 and d2 >= math.sqrt(STILL_AHEAD) * d1
        if curve.fell and not still_falling:
            return []
        ev: dict[str, Any] = {"update_ratio_bound": bound, "lr": lr_max, "optimizer": ctx.optimizer_class,
                              "loss_initial": curve.start, "loss_final": curve.final, "progress": curve.progress}
        ahead = (f": slowing down as a loss nearing its floor does, {(d2 / d1) ** 2:.0%} of its whole drop would "
                 "still be ahead" if 0 < d2 < d1 else "")
        how = (f"it is still falling at the end ({d1:.4g} over the first half, {d2:.4g} over the second{ahead}): far "
               "from converged" if still_falling else f"it barely moved ({curve.progress:.1%})")
        msg = (f"{ctx.optimizer_class} ran at lr at most {lr_max:.3g} for the whole run: each step moves a weight by "
               f"about lr at most, so no weight matrix of a standard initialisation (element RMS >= {WEIGHT_RMS_MIN:g}) "
               f"moves by more than {bound:.2g} of its size per step, {TARGET_UPDATE_RATIO / bound:.0f}x below the "
               f"~1e-3 at which training moves steadily; the loss went {curve.start:.4g} -> {curve.final:.4g} and {how}.")
        recs = [Recommendation.omitted(
            "lr", lr_max, f"this log has no update-to-weight ratios to scale the lr by; for {ctx.optimizer_class}, "
            f"steps of ~1e-3 of the weights need an lr of at least {TARGET_UPDATE_RATIO * WEIGHT_RMS_MIN:g} (weights of "
            f"element RMS {WEIGHT_RMS_MIN:g}) and up to {TARGET_UPDATE_RATIO:g} (RMS 1)")]
        conf = self.confidence["without ratios, from the lr"](RATIO_LOW / bound, still_falling)
        return [self.finding(confidence=conf, message=msg, first_step=int(curve.steps[0]), evidence=ev,
                             recommendations=recs)]

    def _decayed(self, ctx: RunContext, curve: Any) -> list[Finding]:
        """The lr itself decayed to nothing (``DECAYED`` of its maximum) for at least
        ``DECAYED_FRACTION`` of the run's steps, while the loss over that stretch stayed at
        ``FAR_FROM_CONVERGED`` of the trivial predictor's loss or more (judged only where the
        trivial loss is known: a run that learned before its schedule annealed is converged,
        not starved). A schedule written in epochs stepped every batch does this (StepLR's
        step_size counted in batches); the steps at the configured lr are fine, so the
        update-ratio test, which reads those steps, does not see it."""
        lr = ctx.lr
        ok = np.isfinite(lr) & (lr > 0)
        if ok.sum() < MIN_CURVE_RECORDS or curve.n < MIN_CURVE_RECORDS:
            return []
        rows = np.flatnonzero(ok)
        lr_max = float(lr[rows].max())
        low = lr[rows] <= DECAYED * lr_max
        if not low[-1]:
            return []
        k = int(rows[np.flatnonzero(~low)[-1] + 1])  # decayed from this row to the end
        first, last = int(ctx.step[rows[0]]), int(ctx.step[rows[-1]])
        s_dec = int(ctx.step[k])
        frac = (last - s_dec) / max(last - first, 1)
        if frac < DECAYED_FRACTION:
            return []
        tl = trivial_loss(ctx)
        if not tl.consistent:
            return []
        base_ratio = tl.ratio_between(s_dec, last)
        if not math.isfinite(base_ratio) or base_ratio < FAR_FROM_CONVERGED:
            return []
        lr_end = float(lr[rows[-1]])
        ev: dict[str, Any] = {"lr": lr_max, "lr_final": lr_end, "decayed_from_step": s_dec, "decayed_fraction": frac,
                              "optimizer": ctx.optimizer_class, "loss_initial": curve.start, "loss_final": curve.final,
                              "loss_over_trivial": base_ratio, "trivial_loss_kinds": tl.kinds}
        msg = (f"The learning rate fell from {lr_max:.3g} to {lr_end:.3g} ({math.log10(lr_max / lr_end):.0f} decades), "
               f"below {DECAYED:g} of its maximum from step {s_dec} on ({frac:.0%} of the run), while the loss stayed at "
               f"{base_ratio:.2f}x the loss of a model that ignores its input ({curve.start:.4g} -> {curve.final:.4g}): "
               "the schedule decayed it before the model learned, and the run has stood still since (a schedule "
               "written in epochs stepped every batch?).")
        recs = [Recommendation.code(
            "Step the scheduler at the unit its schedule is written in",
            "for epoch in range(epochs):\n"
            "    for x, y in loader:\n"
            "        ...\n"
            "        optimizer.step()\n"
            "    scheduler.step()        # once per epoch for StepLR / MultiStepLR / ExponentialLR")]
        conf = self.confidence["decayed"](frac)
        # the schedule that decays it is in force from the first step: the fault starts there
        return [self.finding(confidence=conf, message=msg, first_step=first, evidence=ev, recommendations=recs,
                             title="The learning rate decayed to nothing before the model learned")]

    def check(self, ctx: RunContext) -> list[Finding]:
        ratios = update_ratio_by_step(ctx)
        curve = loss_curve(ctx)
        decayed = self._decayed(ctx, curve)
        if decayed:
            return decayed
        if len(ratios) < 2:
            return self._from_the_lr(ctx, curve)
        if curve.n < MIN_CURVE_RECORDS or tiny_targets(ctx):
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
        progress = curve.progress
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
            "lr": lr_max, "optimizer": ctx.optimizer_class, "loss_initial": curve.start, "loss_final": curve.final,
            "progress": progress,
        }
        if math.isfinite(base_ratio):
            if base_ratio < 0.5:
                return []
            ev["loss_over_trivial"] = base_ratio
            ev["trivial_loss_kinds"] = tl.kinds
        elif tl.first_over_expected < TRAINED_BEFORE:
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
        c_ratio = self.confidence["c_ratio"](RATIO_LOW / max(ratio, 1e-300))
        conf = self.confidence["confidence"](c_ratio, max(0.0, progress))
        recs = []
        lr_cfg = median_lr(ctx, cfg.index)
        if lr_cfg:
            suggested = nice(lr_cfg * TARGET_UPDATE_RATIO / ratio)
            recs.append(Recommendation.hyperparameter("lr", lr_cfg, suggested, _lr_reason(family, ratio, TARGET_UPDATE_RATIO)))
        msg = (f"Optimizer steps change the weight matrices by {ratio:.2g} of their norm (median over sampled steps), "
               f"{TARGET_UPDATE_RATIO / ratio:.0f}x below the ~1e-3 at which training moves steadily, and the loss "
               f"moved {progress:.1%} ({curve.start:.4g} -> {curve.final:.4g})")
        if "loss_over_trivial" in ev:
            msg += f", still at {ev['loss_over_trivial']:.2f}x the loss of a model that ignores its input"
        msg += "."
        return [self.finding(confidence=conf, message=msg, first_step=int(cfg.index[0]), evidence=ev, recommendations=recs)]
