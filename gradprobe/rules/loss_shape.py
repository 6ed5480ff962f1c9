"""GP504-GP506: the shape of the loss curve (loss-spike, loss-plateau, overfitting).

These read the loss as :mod:`gradprobe.analysis.loss` defines it: one curve, its start, its
levels beyond noise, its spike events; and the trivial loss of a model that ignores its input
(:class:`gradprobe.analysis.TrivialLoss`).
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    TRIVIAL_LEVEL,
    LossCurve,
    RunContext,
    eval_curve,
    eval_loss_spikes,
    exploding_through_time,
    loss_curve,
    loss_spikes,
    trivial_loss,
)
from gradprobe.rules.base import Explanation, Field, Finding, Recommendation, Rule, register

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
              "lr-too-high", "missing-weight-decay", "fp16-overflow", "scaler-misuse", "nonfinite-inputs",
              "input-scale", "degenerate-targets", "overfitting")
    #: gradients growing backwards through time at or before the spike (not a window merely too long)
    causes_on_evidence = ("long-lookback",)
    severities = {
        "warning": "the loss came back after every spike",
        "error": "the loss never came back below half-way between its level and the peak",
    }
    evidence_fields = {
        "training": Field("training loss spikes"),
        "validation": Field("validation loss spikes"),
    }
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
        series.append(("training", tr, loss_spikes(ctx)))
        if "eval_loss" in ctx.signals:
            ec = eval_curve(ctx)
            if ec is not None:
                series.append(("validation", ec, eval_loss_spikes(ctx)))
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
        through_time = exploding_through_time(ctx)
        follow = ["long-lookback"] if through_time is not None and through_time <= first.step else []
        return [self.finding(confidence=conf, message=msg, first_step=first.step, evidence=ev, recommendations=recs,
                             severity="error" if unrecovered else "warning", may_follow=follow)]


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
    evidence_fields = {
        "plateau_start_step": Field("flat since", "step"),
        "plateau_level": Field("level", "loss"),
        "plateau_fraction": Field("of the run", "%"),
        "loss_initial": Field("first loss", "loss"),
        "records": Field("loss records"),
        "trivial_loss": Field("trivial loss", "loss"),
        "loss_over_trivial": Field("loss over the trivial loss", "x"),
        "trivial_kinds": Field("trivial loss of"),
        "prediction_spread": Field("prediction spread"),
        "at_trivial_since_step": Field("at the trivial level since", "step"),
        "progress": Field("progress", "%"),
    }
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
            fw = curve.first_window
            moved = max((fw - curve.final) / abs(fw) if fw != 0 else 0.0,
                        (first - curve.final) / abs(first) if first != 0 else 0.0)
            rose = (curve.final - curve.first_window) / abs(curve.first_window) if curve.first_window != 0 else 0.0
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
    evidence_fields = {
        "best_val_step": Field("best validation loss at", "step"),
        "best_val_loss": Field("best validation loss", "loss"),
        "final_val_loss": Field("final validation loss", "loss"),
        "val_rise": Field("rise since", "%"),
        "train_loss_at_best_val": Field("training loss then", "loss"),
        "final_train_loss": Field("final training loss", "loss"),
        "train_fall": Field("training loss fall since", "%"),
        "val_records_after_best": Field("evaluations after the best"),
        "val_records": Field("evaluations"),
    }
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
