"""GP504-GP505: the shape of the training loss curve (loss-spike, loss-plateau); GP506 in
:mod:`gradprobe.rules.overfitting`.

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
    LOSS_SPIKE_FACTOR,
    REGAIN_WINDOWS,
    TRIVIAL_LEVEL,
    LossCurve,
    RunContext,
    class_ordered_batches,
    eval_curve,
    eval_loss_spikes,
    exploding_through_time,
    gradient_free_rows,
    harder_data,
    loss_curve,
    loss_spikes,
    on_probability_floor,
    probabilities_into_cross_entropy,
    set_back,
    transient,
    trivial_loss,
    uniform_classes,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Flag, Ramp, Recommendation, Rule, register

#: GP505: the plateau must cover at least this fraction of the run (and 2 smoothing windows).
PLATEAU_FRACTION = 0.30
#: GP505: a run shorter than this is too young to call stuck: a freshly initialised network
#: sits at the trivial loss for its first tens of steps (an Adam step of lr 1e-3 moves a weight
#: of scale 0.1 by 1%; an SGD step, lr x a gradient that starts small), so a short run that has
#: not left it yet has not stopped improving, it has not started.
MIN_PLATEAU_RECORDS = 50
#: GP505: the loss-only forms judge a run on the optimizer steps its log covers, not on its
#: records (a Hugging Face log averages each record over many steps): 50 steps, as above.
MIN_PLATEAU_STEPS = 50
#: GP505's frozen form: records equal to this relative tolerance are the same number. A loss
#: carries ~7 significant digits in float32; any update of the weights moves a validation loss
#: by more than its last digit.
FROZEN_RTOL = 1e-6
FROZEN_DIGITS = 6
#: ... unless it froze at this fraction of its start or below: three decades of progress is
#: convergence, where an optimizer with a stopping tolerance (LBFGS) stops changing anything.
CONVERGED_FRACTION = 1e-3
#: ... over at least this many consecutive records (two equal values can be chance rounding of
#: a log; three in a row at 6 digits cannot).
MIN_FROZEN_RECORDS = 3
#: GP505's uniform form: every record within 2% of the level (max - min). Predictions that
#: ignore the input give a cross-entropy that is ln K on every batch, whatever the batch holds,
#: so even per-batch records stay this flat; a model that learns anything spreads them out.
#: The flatness, not the level alone, makes the case: ln K lies within 2% of almost any level
#: above 3 for some K.
UNIFORM_FLAT = 0.02
#: A loss that left its start and then sits at ln K must sit there to four decimals (all records
#: of the stretch within 1e-4 of each other, relative): a converged loss is flat to a few
#: percent, not to four decimals while its weights still move.
UNIFORM_COLLAPSED_FLAT = 1e-4
#: ... and with fewer records than this, its level must match ln K tightly (``uniform_classes``).
MIN_LOOSE_RECORDS = 8
#: GP505: an improvement counts when the smoothed loss beats its best by 1% (and by 4 standard
#: errors of a block median: one odd block among ~20 under pure noise stays below it; the
#: standard error of a median is 1.25 x noise / sqrt(records), for Gaussian noise).
PLATEAU_IMPROVEMENT = 0.01
PLATEAU_IMPROVEMENT_SE = 4.0
MEDIAN_SE_FACTOR = 1.25
#: GP505: confidence in a plateau is whole when it covers 70% of the run (0.4 past the
#: ``PLATEAU_FRACTION`` it needs).
PLATEAU_SPAN = 0.4
#: GP505: a rise of the trivial-loss ratio by 10% from the first half to the second is a
#: divergence, not a plateau.
TRIVIAL_RISE = 0.1
#: GP505: predictions whose across-batch spread is below 5% (of the target std, or of 1 nat
#: for logits) do not vary with the input.
CONSTANT_PREDICTION = 0.05
#: GP505 without target statistics: the loss never moved when it ended less than 5% below
#: where it started (``LossCurve.start``) and not 10% above its first window, with the
#: plateau starting in the first tenth of the run; and not already this far below the loss
#: of predictions unrelated to the targets (a model trained before it was watched).
NEVER_MOVED = 0.05
PLATEAU_FROM_START = 0.1
TRAINED_BEFORE = 1 / 3
#: ... judged, where no trivial loss is known (a saved log), from this many records when they
#: cover ``MIN_PLATEAU_STEPS`` optimizer steps (a logged record stands for many steps): enough
#: for a first window of 5 and a plateau of 2 windows after it.
MIN_NEVER_RECORDS = 12
#: GP505's probability-floor form fires once the loss is within 25% of the floor a
#: cross-entropy fed probabilities cannot pass (a run that has not reached it yet may still be
#: learning, slowly).
AT_FLOOR = 1.25
#: ... a rise counts as divergence (not judged here, GP501) from 10%, as ``LossCurve.rose``
#: has it: a loss that never fell and drifted up by less never decreased either.
NEVER_ROSE = 0.10
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
    fewer two records are not enough). A saved log's records count the same way when each is one
    step's loss sampled every few steps (Lightning's ``self.log``, TensorBoard's ``add_scalar``);
    validation records, and records that average many steps (a Hugging Face trainer state, an
    epoch's mean), count alone.

    A symptom: ``caused_by`` names the root cause found in the same run (an undetached
    state, exploding gradients, a too-high lr, float16 overflow, ...; for the validation
    loss, overfitting: a validation loss that climbs fast while the training loss falls
    crosses 3x its running level).

    Severity, by what the spike did to the run: error when the loss did not come back below
    half-way between its level and the peak (the run is broken); warning when it came back but
    settled above where it was before (``analysis.set_back``: the window after the spike is
    above the level before it by more than 3 standard errors of a window median, 10% of that
    level, and the 99th percentile of how far the window after any record before the spike,
    away from spikes, lies above the level before it (``analysis.level_wander``: per-sample
    losses spanning decades move window medians further than their standard error says):
    the weights were knocked off course and the run lost ground, and was not back at its level
    within 3 windows (``REGAIN_WINDOWS``: a catapult of a large-lr SGD run lifts the loss for
    a few dozen steps and returns it, a transient); info when the
    loss came straight back to its level after every spike, or within those windows. A hard or corrupt batch, or a
    heavy-tailed feature, lifts its own records and nothing after them; damaged weights lift
    the loss of the batches that follow. Nor is it a set-back when the data got harder
    (``analysis.harder_data``): the step before the jump was ordinary (its gradient norm within
    3x its running level, its lr unchanged), so one ordinary update cannot have lifted the loss
    several-fold; the batches right after stayed as high (not one corrupt batch); and after
    the spike the loss settled no higher than its first record (new classes joining a stream,
    a curriculum stage: what it sits above is the old data's level).

    Class-ordered data (warning, or error when the loss did not come back): the training loss
    spiked and most sampled batches held one class each, 2 or more classes over the run, far
    more often than shuffled batches could (:func:`~gradprobe.analysis.class_ordered_batches`).
    Then the jumps are the ordering's: each run of one class pulls the model towards predicting
    that class (the loss of that class falls to ~0), and the first batch of the next class,
    computed before any update on it, pays for it; at any learning rate. The
    recommendation is to shuffle. Confidence: 0.5 at the spike threshold,
    whole a decade past it (30x), more with several spikes.
    """

    code = "GP504"
    slug = "loss-spike"
    severity = "warning"
    title = "The loss jumps far above its running level"
    requires = ("loss",)
    confidence = Confidence(0.5, Ramp(0.5, "worst factor", start=LOSS_SPIKE_FACTOR, log=True),
                            Flag(0.1, "several spikes"))
    causes = ("undetached-hidden-state", "graph-retained-across-steps", "exploding-gradients", "missing-gradient-clipping",
              "lr-too-high", "missing-weight-decay", "fp16-overflow", "scaler-misuse", "nonfinite-inputs",
              "input-scale", "degenerate-targets", "overfitting")
    #: gradients growing backwards through time at or before the spike (not a window merely too long)
    causes_on_evidence = ("long-lookback",)
    severities = {
        "warning": "the loss came back, but settled above where it was before a spike (the weights were set back), "
                   "or the batches each hold one class (the data is sorted by class)",
        "error": "the loss never came back below half-way between its level and the peak",
        "info": "the loss came straight back to where it was after every spike (hard batches, not damaged weights)",
    }
    evidence_fields = {
        "training": Field("training loss spikes"),
        "validation": Field("validation loss spikes"),
        "class_ordered": Field("single-class batches"),
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
        # each recovered spike judged once: set back, unless the data got harder there (the step
        # before the jump ordinary, the loss settling no higher than the first new batch): then
        # it sits above the old data's level, not knocked off course
        setback, harder, passing = [], [], []
        for name, c, evs in hits:
            for e in evs:
                if e.recovered and set_back(c, e, evs):
                    (harder if name == "training" and harder_data(ctx, c, e) else setback).append((name, e))
                elif e.recovered and transient(c, e, evs):
                    passing.append((name, e))
        conf = self.confidence(max(worst.factor, 1e-12), len(events) > 1)
        ev: dict[str, Any] = {}
        for name, c, evs in hits:
            ev[name] = {"spikes": len(evs), "max_factor": max(e.factor for e in evs),
                        "events": [e.to_json() for e in evs[:5]], "unrecovered": sum(not e.recovered for e in evs),
                        "set_back": sum(n == name for n, _ in setback)}
            if name == "training" and harder:
                ev[name]["harder_data"] = len(harder)
        parts = []
        for name, c, evs in hits:
            e = max(evs, key=lambda x: x.factor)
            parts.append(f"the {name} loss spiked {len(evs)} time(s), worst at step {e.peak_step}: {e.peak_value:.4g} "
                         f"against a running level of {e.level:.4g} ({e.factor:.1f}x)")
        msg = "; ".join(parts) + "."
        msg = msg[0].upper() + msg[1:]
        ordered = class_ordered_batches(ctx) if any(n == "training" for n, _, _ in hits) else None
        if ordered is not None:
            ev["class_ordered"] = ordered
        if unrecovered:
            msg += f" The loss never came back after the spike at step {unrecovered[0][1].step}."
        if ordered is not None:
            msg += (f" {ordered['single_class']} of the {ordered['sampled']} sampled batches held a single class "
                    f"({ordered['classes']} different classes among them; shuffled batches of {ordered['batch']:.0f} "
                    f"would, with chance {_chance(ordered['chance'])}): the data reaches the model sorted by class. Each run "
                    "of one class pulls the model towards predicting that class, and the first batch of the next "
                    "class pays for it.")
        elif unrecovered:
            pass  # said above: nothing after a spike the loss never came back from
        elif setback:
            msg += (f" After the spike at step {setback[0][1].step} the loss settled above where it was before: the "
                    "weights were knocked off course.")
        elif harder:
            e = harder[0][1]
            msg += (f" At step {e.step} the loss was already high on the first batch, after an ordinary step, and it "
                    f"settled below that ({tr.values[e.start]:.4g}) after the spike: the data got harder "
                    "there (new classes, a curriculum stage); the run lost no ground on it.")
        elif passing:
            msg += (f" After the spike at step {passing[0][1].step} the loss stayed above its level for a while and was "
                    f"back there within {REGAIN_WINDOWS} smoothing windows: a transient, not a set-back.")
        else:
            msg += " Each time the loss came straight back to where it was: hard batches, not damaged weights."
        recs = [Recommendation.code(
            "Find what changed at the spike",
            f"# the {first_name} loss first spiked at step {first.step}: inspect that batch and the gradient norm there\n"
            f"total = torch.nn.utils.clip_grad_norm_(model.parameters(), float('inf'))  # norm before the step\n"
            f"if loss.item() > 3 * running_loss:\n"
            f"    print(step, loss.item(), total.item())  # a spike with a huge norm: clip, fix the cause linked above")]
        if ordered is not None:
            recs.insert(0, Recommendation.code(
                "Shuffle the training data",
                "loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)  # every batch mixes the classes"))
        through_time = exploding_through_time(ctx)
        follow = ["long-lookback"] if through_time is not None and through_time <= first.step else []
        return [self.finding(confidence=conf, message=msg, first_step=first.step, evidence=ev, recommendations=recs,
                             severity="error" if unrecovered else "warning" if setback or ordered else "info",
                             may_follow=[] if ordered else follow)]


_CHECK_SNIPPET = Recommendation.code(
    "Check that the predictions depend on the input and that gradients reach the first layer",
    "with torch.no_grad():\n"
    "    out = model(x)\n"
    "print(out.std(dim=0))            # ~0: the model ignores its input (dead/saturated units, zero init)\n"
    "loss_fn(model(x), y).backward()\n"
    "for n, p in model.named_parameters():\n"
    "    print(n, p.grad.norm().item() if p.grad is not None else None)  # ~0 early on: vanishing")


#: GP504: a chance below this prints as "below 1e-100" (float64 underflows to 0 further down).
CHANCE_FLOOR = 1e-100


def _chance(p: float) -> str:
    return f"{p:.1g}" if p >= CHANCE_FLOOR else f"below {CHANCE_FLOOR:g}"


def _span(c: LossCurve) -> int:
    """Steps the curve covers."""
    return int(c.steps[-1]) - int(c.steps[0]) + 1 if c.n else 0


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
    se = MEDIAN_SE_FACTOR * curve.noise / math.sqrt(w)
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
        tol = max(PLATEAU_IMPROVEMENT * abs(blocks[k]), PLATEAU_IMPROVEMENT_SE * se)
        if blocks[k] - med > tol:
            return int(k + 1) * w
    return 0


#: a softmax applied before a cross-entropy, which applies it again
_LOGITS_REC = Recommendation.code(
    "Give CrossEntropyLoss the raw scores: drop the softmax before it",
    "logits = model(x)                 # no nn.Softmax at the end of the model\n"
    "loss = F.cross_entropy(logits, y)  # log_softmax is inside\n"
    "probs = logits.softmax(-1)        # only where probabilities are needed (inference)")


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
    moved at all: under 5% below where it started and not 10% above its first window (a
    divergence, GP501, as ``LossCurve.rose`` has it), with the plateau starting in the first
    tenth of the run, and (where target statistics exist but their scale does not match) not
    already 3x below the loss of predictions unrelated to the targets (a model trained before
    it was watched). A run that learned and then flattened at a low level
    (e.g. ReduceLROnPlateau at its floor) is not a finding, nor one whose loss fell early by 5%
    or more and then sat on a floor it cannot go below (a robust loss over gross outliers):
    without a trivial loss, a fall is a fall, however noisy the records around it. Where it
    started is ``LossCurve.start``: the first window's median, or the first record when that
    lies more than 5 noise units away from it (a loss that fell within its first records). A
    single first record inside the noise is one easy or hard batch, not a level: a probe on
    random features whose first logged batch happened to cost 11% more than the rest, and
    whose loss never moved from its level, did not learn.
    A saved log is judged from 12 records when they cover 50 optimizer steps (each record of
    a Hugging Face or Lightning log stands for many steps).

    Probabilities into a cross-entropy (checked first): when every sampled input of
    ``cross_entropy`` averages exactly 1/K and none exceeds 1, a softmax was applied before the
    loss, which applies it again: the loss cannot go below ln(e + K - 1) - 1. Fires once the loss
    is within 25% of that floor, confidence 0.9 (the inputs are measured, the floor exact).
    Where the inputs of the loss were not seen (a saved log, a custom loss), the loss alone:
    its lowest record within 0.1% of ln(e + K - 1) - 1 for a K whose neighbouring floors lie
    4% or more away (K <= 13: a level lands that close to one of them by chance less than 5% of
    the time), and half of its records from the first one within 1% above that floor on, over
    at least 30% of the run: a loss that settled onto the floor and stays, its excursions only
    upward (a floor cannot be passed). Confidence 0.75 (the floor is exact; the inputs unseen).

    No gradient (checked first, on the recorder's own logs): a backward ran and an optimizer
    stepped at every step of a stretch covering at least 30% of the run (``PLATEAU_FRACTION``)
    and 50 steps (``MIN_PLATEAU_RECORDS``), and no parameter received a gradient
    (:func:`~gradprobe.analysis.gradient_free_rows`). PyTorch's optimizers skip a parameter
    whose ``.grad`` is None (weight decay included), so no weight moved and the loss cannot
    improve, whatever it does from batch to batch. Confidence 0.9: measured at every step, the
    only guess is why (the causes the message names).

    A symptom: ``caused_by`` names the root cause found (lr-too-low, dead units, saturation,
    or an overflow or explosion that wrecked the weights before the plateau...). Its
    ``first_step`` is where the loss got stuck: the plateau's start, or, at the trivial level,
    the first sampled step from which every sampled loss sat at that level when that is
    earlier (a loss that never left the trivial level was stuck from the start, whatever
    noise made its last "improvement"), so that a fault that began later (units dying in a
    run that never learned anything) is not linked as its cause.
    Confidence: more the longer the plateau, and more when the predictions do not vary with
    the input (across-batch spread < 5% of the target std, or of 1 nat for logits); lower
    without a baseline (the level cannot be compared with the trivial loss). A loss frozen at
    one number is measured exactly; one at ln K more so the more records show it.
    """

    code = "GP505"
    slug = "loss-plateau"
    severity = "warning"
    title = "The loss stopped decreasing at a level that is not convergence"
    requires = ("loss|eval_loss",)
    confidence = {
        "at the trivial level": Confidence(0.5, Ramp(0.3, "plateau fraction", start=PLATEAU_FRACTION, span=PLATEAU_SPAN),
                                           Flag(0.2, "the predictions do not vary with the input")),
        "never decreased, without a baseline": Confidence(
            0.4, Ramp(0.3, "plateau fraction", start=PLATEAU_FRACTION, span=PLATEAU_SPAN)),
        "frozen": Confidence(0.6, Ramp(0.4, "fraction of the run", start=PLATEAU_FRACTION, span=PLATEAU_SPAN)),
        "at ln K": Confidence(0, Flag(0.7, f"{MIN_LOOSE_RECORDS}+ records", otherwise=0.55)),
        "at the probability floor": Confidence(0.9),
        "on the probability floor, from the loss": Confidence(0.75),
        "no gradient": Confidence(0.9),
    }
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
        "series": Field("loss"),
        "identical_records": Field("identical records in a row"),
        "uniform_classes": Field("classes of the uniform prediction"),
        "gradient_free_steps": Field("steps with no gradient"),
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
        nothing_trained = self._no_gradient(ctx, curve)
        if nothing_trained is not None:
            return [nothing_trained]  # whatever the optimizers: no weight moved
        if len(ctx.meta.get("optimizers") or []) > 1:
            return []  # adversarial or multi-objective losses need not decrease
        floor = self._probability_floor(ctx, curve)
        if floor is not None:
            return [floor]
        if curve.nonfinite_step is not None and not (curve.steps > curve.nonfinite_step).any():
            return []  # the run broke (GP401-GP403): its finite part ends there, not where the run meant to end
        # the most specific form first: the trivial loss measured from the targets, then a
        # cross-entropy at the uniform prediction, then a loss frozen at one number, then a
        # loss that never decreased
        judged = curve.n >= MIN_PLATEAU_RECORDS or (curve.n >= MIN_NEVER_RECORDS and _span(curve) >= MIN_PLATEAU_STEPS
                                                     and not trivial_loss(ctx).consistent)
        found = self._plateau(ctx, curve) if judged and not curve.signed else []
        if found and "trivial_loss" in found[0].evidence:
            return found
        # a loss centred on 0 (a policy-gradient surrogate...) has no plateau to judge
        series = [(name, c) for name, c in (("training", curve), ("validation", eval_curve(ctx)))
                  if c is not None and c.n >= MIN_FROZEN_RECORDS and not c.signed]
        for form in (self._at_uniform, self._frozen):
            for name, c in series:
                f = form(c, name)
                if f is not None:
                    return [f]
        return found

    def _no_gradient(self, ctx: RunContext, c: LossCurve) -> Finding | None:
        """Backward ran and the optimizer stepped, and no parameter had a gradient
        (:func:`~gradprobe.analysis.gradient_free_rows`) for ``PLATEAU_FRACTION`` of the run:
        nothing was trained over that stretch."""
        rows = gradient_free_rows(ctx)
        if rows is None:
            return None
        a, b = rows
        n = b - a + 1
        if n < MIN_PLATEAU_RECORDS or n < PLATEAU_FRACTION * ctx.n:
            return None
        first, last = ctx.step_at(a), ctx.step_at(b)
        lo = ctx.loss[a:b + 1]
        level = float(np.median(lo[np.isfinite(lo)]))
        ev = {"plateau_start_step": first, "plateau_level": level, "plateau_fraction": n / ctx.n,
              "records": int(c.n), "gradient_free_steps": n}
        msg = (f"From step {first} to step {last} ({n} steps, {n / ctx.n:.0%} of the run) backward ran and the "
               f"optimizer stepped, but no parameter received a gradient: every .grad stayed None, so no weight "
               f"moved and the loss (median {level:.4g}) could not improve. Backward reached no trainable "
               "parameter: the model frozen whole (a freezing loop over model.parameters() instead of the "
               "backbone's), a loss detached from the graph (.item(), .detach(), torch.tensor(loss)) and "
               "re-attached with requires_grad_(True), or an optimizer given another model's parameters.")
        rec = Recommendation.code(
            "Make the loss reach the parameters you train",
            "print(sum(p.numel() for p in model.parameters() if p.requires_grad))  # > 0\n"
            "assert loss.grad_fn is not None  # never loss.requires_grad_(True) to silence the error\n"
            "for p in model.backbone.parameters():  # freeze only what you mean to\n"
            "    p.requires_grad = False")
        return self.finding(confidence=self.confidence["no gradient"](), message=msg, first_step=first,
                            evidence=ev, recommendations=[rec], title="Nothing is trained: no parameter gets a gradient")

    def _probability_floor(self, ctx: RunContext, c: LossCurve) -> Finding | None:
        """What the run feeds ``cross_entropy`` are probabilities
        (:func:`~gradprobe.analysis.probabilities_into_cross_entropy`): it applies softmax
        again, so the loss cannot go below ln(e + K - 1) - 1 (1.46 for 10 classes) and its
        gradient fades as it gets there. Fires once the loss sits within ``AT_FLOOR`` of that
        floor (the run has reached the floor it cannot pass)."""
        found = probabilities_into_cross_entropy(ctx)
        if found is None and ctx.samples("target").empty:
            return self._on_floor(c)  # what the loss was fed is unknown: its level alone
        if found is None or c.n < MIN_FROZEN_RECORDS or not c.final <= AT_FLOOR * found[1]:
            return None
        k, floor = found
        ev = {"plateau_level": c.final, "trivial_loss": floor, "records": int(c.n), "uniform_classes": k,
              "loss_initial": c.start}
        msg = (f"The inputs of cross_entropy are probabilities (every sampled batch averages exactly 1/{k} and none "
               f"exceeds 1): a softmax is applied before the loss, which applies softmax again, so the loss cannot "
               f"fall below ln(e + {k} - 1) - 1 = {floor:.4g}, and its gradient fades on the way there. It sits at "
               f"{c.final:.4g} ({c.final / floor - 1:.1%} above that floor).")
        return self.finding(confidence=self.confidence["at the probability floor"](), message=msg,
                            first_step=int(c.steps[0]), evidence=ev, recommendations=[_LOGITS_REC],
                            title="The loss sits at the floor of a cross-entropy fed probabilities")

    def _on_floor(self, c: LossCurve) -> Finding | None:
        """Without the inputs of the loss (a saved log, a custom loss): the loss settled onto
        ln(e + K - 1) - 1 for a K whose floor no neighbour crowds, its lowest record within
        0.1% of it and half of its records from then on within 1% above it, for at least
        ``PLATEAU_FRACTION`` of the run (:func:`~gradprobe.analysis.on_probability_floor`). A
        loss cannot sit on that number by chance to 0.1%; a cross-entropy fed probabilities
        reaches it when every prediction is right, and stays there."""
        if c.n < MIN_NEVER_RECORDS:
            return None
        found = on_probability_floor(c, PLATEAU_FRACTION)
        if found is None:
            return None
        k, floor, i, frac = found
        low = float(c.values.min())
        start = int(c.steps[i])
        ev = {"plateau_start_step": start, "plateau_level": c.final, "plateau_fraction": frac,
              "trivial_loss": floor, "records": int(c.n), "uniform_classes": k, "loss_initial": c.start}
        msg = (f"The training loss settled on {floor:.5g} = ln(e + {k} - 1) - 1 from step {start} on ({frac:.0%} of "
               f"the run; its lowest record {low:.5g}, {low / floor - 1:+.2%}): the floor a cross-entropy cannot pass "
               f"when what it is fed are probabilities over {k} classes. A softmax is applied before "
               f"CrossEntropyLoss, which applies softmax again; the loss stops there even when every prediction is "
               f"right, and its gradient fades on the way.")
        return self.finding(confidence=self.confidence["on the probability floor, from the loss"](), message=msg,
                            first_step=start, evidence=ev, recommendations=[_LOGITS_REC],
                            title="The loss sits at the floor of a cross-entropy fed probabilities")

    def _frozen(self, c: LossCurve, name: str) -> Finding | None:
        """The loss repeats the same number to ``FROZEN_RTOL`` over consecutive records spanning
        at least ``PLATEAU_FRACTION`` of the run's steps: nothing is being updated. A validation
        loss on a fixed set changes with any update of the weights at float32 resolution
        (~1e-7 relative); a training loss computed on different batches repeats itself only when
        the outputs no longer depend on the input. A loss identically 0 is not judged here (an
        inactive term, or degenerate-targets'), nor one frozen at ``CONVERGED_FRACTION`` of its
        start or below (converged: LBFGS stops updating at its tolerance)."""
        v = c.values
        same = np.abs(np.diff(v)) <= FROZEN_RTOL * np.maximum(np.abs(v[1:]), 1e-300)
        best = (0, -1)
        i = 0
        while i < same.size:
            if same[i]:
                j = i
                while j + 1 < same.size and same[j + 1]:
                    j += 1
                if j - i > best[1] - best[0]:
                    best = (i, j + 1)
                i = j + 1
            else:
                i += 1
        a, b = best
        if b - a + 1 < MIN_FROZEN_RECORDS or v[a] == 0:
            return None
        if c.start > 0 and abs(v[a]) <= CONVERGED_FRACTION * c.start:
            return None  # frozen three decades below where it started: converged (LBFGS stops there)
        span = _span(c)
        covered = (int(c.steps[b]) - int(c.steps[a])) / span if span else 0.0
        if covered < PLATEAU_FRACTION:
            return None
        level = float(v[a])
        ev = {"plateau_start_step": int(c.steps[a]), "plateau_level": level, "plateau_fraction": covered,
              "records": int(c.n), "series": name, "identical_records": int(b - a + 1)}
        msg = (f"The {name} loss was the same number ({level:.7g}, to {FROZEN_DIGITS} significant digits) at "
               f"{b - a + 1} records in a row, from step {int(c.steps[a])} to step {int(c.steps[b])} ({covered:.0%} of "
               "the run): nothing was being updated (a learning rate of 0 or ~0, frozen parameters, or outputs that "
               "no longer depend on the input).")
        return self.finding(confidence=self.confidence["frozen"](covered), message=msg,
                            first_step=int(c.steps[a]), evidence=ev, recommendations=[_CHECK_SNIPPET],
                            title="The loss is frozen at one value")

    def _at_uniform(self, c: LossCurve, name: str) -> Finding | None:
        """A cross-entropy at the uniform prediction: its records all lie within ``UNIFORM_FLAT``
        of their level (it never left), or, from a point at least ``PLATEAU_FRACTION`` of the run
        before the end, within ``UNIFORM_COLLAPSED_FLAT`` (it collapsed there), and the level is ln K
        for a whole number of classes K (``analysis.uniform_classes``). A classifier whose
        logits ignore the input predicts the class frequencies, and on balanced classes the
        uniform distribution, whose cross-entropy is exactly ln K on every batch. Judged on the
        steps the log covers (at least ``MIN_PLATEAU_STEPS``), not on its records: a Hugging
        Face log averages each record over many steps."""
        if _span(c) < MIN_PLATEAU_STEPS:
            return None
        v = c.values
        if float(np.max(v) - np.min(v)) <= UNIFORM_FLAT * float(np.median(v)):
            a = 0  # flat from the first record: it never left
        else:
            # collapsed: the longest stretch to the end flat to four decimals, a flatness no
            # converging or converged loss has while its weights still move
            a = c.n - 1
            lo = hi = float(v[-1])
            while a > 0:
                lo2, hi2 = min(lo, float(v[a - 1])), max(hi, float(v[a - 1]))
                if hi2 - lo2 > UNIFORM_COLLAPSED_FLAT * max(abs(lo2), 1e-300):
                    break
                lo, hi, a = lo2, hi2, a - 1
        records = c.n - a
        covered = (int(c.steps[-1]) - int(c.steps[a])) / max(_span(c) - 1, 1)
        if records < MIN_FROZEN_RECORDS or (a > 0 and covered < PLATEAU_FRACTION):
            return None
        level = float(np.median(v[a:]))
        k = uniform_classes(level, tight=records < MIN_LOOSE_RECORDS)
        if k is None:
            return None
        never_left = a == 0
        ev = {"plateau_start_step": int(c.steps[a]), "plateau_level": level,
              "plateau_fraction": 1.0 if never_left else covered, "records": int(c.n), "series": name,
              "uniform_classes": k}
        match = abs(level - math.log(k)) / math.log(k)
        if never_left:
            what = f"never left {level:.4g}"
        else:
            what = (f"went from {float(v[0]):.4g} to {level:.4g} at step {int(c.steps[a])} and stayed there "
                    f"({covered:.0%} of the run)")
            ev["loss_initial"] = float(v[0])
        msg = (f"The {name} loss {what}: ln {k} (to {match:.1%}), the cross-entropy of predicting the uniform "
               f"distribution over {k} classes, until step {int(c.steps[-1])}. The model's outputs no longer depend "
               "on its input: it has learned nothing, or " + ("never learned anything." if never_left else
                                                               "collapsed and forgot what it had."))
        return self.finding(confidence=self.confidence["at ln K"](records >= MIN_LOOSE_RECORDS), message=msg,
                            first_step=int(c.steps[a]), evidence=ev, recommendations=[_CHECK_SNIPPET],
                            title="The loss sits at the uniform prediction")

    def _plateau(self, ctx: RunContext, curve: LossCurve) -> list[Finding]:
        n = curve.n
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
            rose = math.isfinite(early) and math.isfinite(late) and late - early >= TRIVIAL_RISE * early and curve.rose
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
        constant_pred = False
        if math.isfinite(base_ratio):
            if base_ratio < TRIVIAL_LEVEL:
                return []
            spread = tl.pred_spread[(tl.pred_spread.index >= start) & (tl.pred_spread.index <= end)]
            constant_pred = bool(len(spread)) and float(spread.median()) < CONSTANT_PREDICTION
            ev.update({"trivial_loss": baseline, "loss_over_trivial": base_ratio, "trivial_kinds": tl.kinds,
                       "prediction_spread": float(spread.median()) if len(spread) else None})
            conf = self.confidence["at the trivial level"](frac, constant_pred)
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
            # where it started as LossCurve.start has it: the single first record only when it
            # lies beyond noise of the first window (one easy or hard first batch is not a level)
            fw = curve.first_window
            moved = curve.progress
            rose = (curve.final - fw) / abs(fw) if fw != 0 else 0.0
            if last > PLATEAU_FROM_START * n or moved >= NEVER_MOVED or rose >= NEVER_ROSE:
                return []  # it learned, or it rose (divergence: GP501), not a plateau
            if tl.first_over_expected < TRAINED_BEFORE:
                return []  # already far below the loss of unrelated predictions: trained before it was watched
            ev["progress"] = moved
            conf = self.confidence["never decreased, without a baseline"](frac)
            msg = (f"The training loss never decreased: it sits at {level:.4g} from step {start} to step {end} "
                   f"({moved:.1%} below where it started).")
        return [self.finding(confidence=conf, message=msg, first_step=first_step, evidence=ev,
                             recommendations=[_CHECK_SNIPPET])]
