"""GP506: overfitting, a validation loss that rises while the training loss keeps falling.

It reads the validation curves as :func:`gradprobe.analysis.eval_curves` gives them (one per
no-grad loss stream, or a saved log's eval loss) against the training loss curve.
"""

from __future__ import annotations

import math

import numpy as np

from gradprobe.analysis import (
    TRIVIAL_LEVEL,
    LossCurve,
    RunContext,
    TrivialLoss,
    eval_curves,
    loss_curve,
    rising_trend,
    trivial_loss,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register

#: GP506: evaluations needed (4 only when every one after the minimum rose), training records.
MIN_OVERFIT_EVALS = 4
MIN_OVERFIT_EVALS_ANY_SHAPE = 5
MIN_OVERFIT_TRAIN_RECORDS = 5
#: GP506: the validation loss must end at least 5% above its minimum (the fall the training
#: loss must show: the two curves part by the same measure), by more than this many robust
#: standard deviations of its noise, with at least ``MIN_AFTER_MINIMUM`` records after it (its
#: end is the median of the last ``OVERFIT_TAIL`` of them, at most half), ...
OVERFIT_RISE = 0.05
OVERFIT_NOISE = 3.0
MIN_AFTER_MINIMUM = 3
OVERFIT_TAIL = 3
#: ... while the training loss fell by at least 5% over the same steps, and by more than this
#: many standard errors of a window median.
OVERFIT_TRAIN_FALL = 0.05
OVERFIT_TRAIN_SE = 2.0
#: GP506: 1.4826 x the median absolute difference between consecutive evaluations, / sqrt(2),
#: is the standard deviation of one evaluation's scatter (for Gaussian noise).
MAD_TO_SD = 1.4826
#: GP506: the records from the minimum on climb as a trend when Kendall's S (pairs in rising
#: order minus pairs in falling order) lies this many standard deviations above 0, the value
#: evaluations in random order give (one-sided p <= 0.01, normal approximation with the
#: continuity correction): 8 records need 24 of their 28 pairs in rising order.
OVERFIT_TREND_Z = 2.326


@register
class Overfitting(Rule):
    """Fires when a validation loss (``probe.log(val_loss=...)``, a foreign log's eval loss, or
    any of the recorder's no-grad loss streams; at least 5 records, or 4 that rise at every
    evaluation after the minimum: three rises in a row happen by noise one time in six, and
    the 5% and 3-noise-unit conditions below must hold as well) rose after its minimum
    while the training loss kept falling (at least 5 training records).

    The recorder keeps one stream per call site of a loss computed without grad
    (:func:`~gradprobe.analysis.eval_curves`): a loop that evaluates the training set and the
    validation set each epoch, from two lines, has two, and each is judged alone. Their mean
    would fall with the training-set one while the validation one rises; the stream computed on
    the training data falls with the training loss and never fires. Where several fire (a
    validation and a test set), the one with the highest confidence is reported, with its call
    site.

    Minimum: the lowest point of the validation series lightly smoothed (centred median of 3,
    so one lucky evaluation is not the minimum). Rise: the median of the last min(3, half of
    the records after the minimum) records is at least 5% above the minimum (the fall asked of
    the training loss: the curves part by the same measure; the best checkpoint is 5% better
    than the last, which early stopping keeps) and more than
    3 robust standard deviations of the validation noise (the curve's ``noise``: 1.4826 x the
    median absolute residual about its rolling median), with at least 3 records after the
    minimum. Training still falling: the training loss's level at the end is at least 5%
    below its level at the validation minimum (and by more than 2 standard errors): the two
    curves diverge, the signature of memorising the training set. A validation loss that
    rises together with the training loss is divergence (GP501), not overfitting; nor is one
    beside a training loss that stays at the trivial level after the minimum (within 0.8x the
    loss of a model that ignores its input, where the recorder measured it, as GP505 has it):
    a model that learned nothing has memorised nothing, and its training loss moves by noise. The noise
    the rise must clear is the larger of the curve's ``noise`` and the scatter from one
    evaluation to the next (1.4826 x the median absolute difference of consecutive records /
    sqrt(2)): a finite evaluation set scatters its loss from one evaluation to the next, and a
    rolling median over a few noisy records follows that scatter and understates it, so a
    lucky minimum in a flat noisy band looked like a rise. A rise at every evaluation after the
    minimum is judged against the curve's ``noise`` alone (its differences are the climb), and
    so is a climb: records from the minimum on whose order is a rising trend beyond chance
    (Kendall's S at least ``OVERFIT_TREND_Z`` standard deviations above 0, one-sided p <= 0.01;
    a rise at every evaluation is the extreme case). Evaluations in a flat noisy band come in
    random order; a climb that pauses or steps back once or twice does not, and its steps from
    one evaluation to the next are the climb, not scatter.

    Confidence: 0.5 at the thresholds, more with a larger rise (whole at 50%) and with more
    evaluations after the minimum (whole at 7).
    """

    code = "GP506"
    slug = "overfitting"
    severity = "warning"
    title = "The validation loss rises while the training loss keeps falling"
    requires = ("loss", "eval_loss")
    confidence = Confidence(0.5, Ramp(0.25, "rise", span=0.5),
                            Ramp(0.25, "records after the minimum", start=MIN_AFTER_MINIMUM - 1, span=5.0))
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
        "val_site": Field("computed at"),
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
        tr = loss_curve(ctx)
        if tr.n < MIN_OVERFIT_TRAIN_RECORDS:
            return []
        curves = eval_curves(ctx)
        tl = trivial_loss(ctx)
        found = [f for f in (self._check_curve(ec, tr, tl, where, len(curves) > 1) for where, ec in curves)
                 if f is not None]
        # the stream that shows it most clearly (several at once: a validation and a test set)
        return [max(found, key=lambda f: (f.confidence, f.evidence["val_rise"]))] if found else []

    def _check_curve(self, ec: LossCurve, tr: LossCurve, tl: TrivialLoss, where: str,
                     several: bool) -> Finding | None:
        if ec.n < MIN_OVERFIT_EVALS:
            return None
        v = ec.values
        sm = np.array([np.median(v[max(0, i - 1): i + 2]) for i in range(ec.n)])
        k = int(np.argmin(sm))
        after = ec.n - 1 - k
        if after < MIN_AFTER_MINIMUM:
            return None
        monotone = bool(np.all(np.diff(v[k:]) > 0))
        climbing = monotone or rising_trend(v[k:]) >= OVERFIT_TREND_Z
        if ec.n < MIN_OVERFIT_EVALS_ANY_SHAPE and not monotone:
            return None  # with this few evaluations only a rise at every one of them says anything
        # a rise at every evaluation has no lucky minimum to smooth away
        vmin = float(v[k]) if monotone else float(sm[k])
        tail = v[-min(OVERFIT_TAIL, max(1, after // 2)):]
        vend = float(np.median(tail))
        rise = (vend - vmin) / abs(vmin) if vmin != 0 else math.inf
        # the scatter from one evaluation to the next (a finite evaluation set's noise, which a
        # rolling median over a few noisy records follows and so understates); not for a climb,
        # whose differences are the climb itself
        step_noise = 0.0 if climbing else MAD_TO_SD * float(np.median(np.abs(np.diff(v)))) / math.sqrt(2.0)
        noise = max(ec.noise, step_noise)
        if rise < OVERFIT_RISE or vend - vmin <= OVERFIT_NOISE * noise:
            return None
        s_min = int(ec.steps[k])
        if tl.consistent and tl.ratio_between(s_min, int(tr.steps[-1])) >= TRIVIAL_LEVEL:
            return None  # a model at the trivial loss has memorised nothing: its training loss moves by noise
        ti = tr.index_at(s_min)
        lo = max(0, ti - tr.window // 2)
        seg = tr.values[lo: lo + tr.window]
        if not seg.size:
            return None
        t_at = float(np.median(seg))
        t_end = tr.final
        se = tr.median_se
        fall = (t_at - t_end) / abs(t_at) if t_at != 0 else 0.0
        if fall < OVERFIT_TRAIN_FALL or t_at - t_end <= OVERFIT_TRAIN_SE * se:
            return None
        conf = self.confidence(rise, after)
        ev = {"best_val_step": s_min, "best_val_loss": vmin, "final_val_loss": vend, "val_rise": rise,
              "train_loss_at_best_val": t_at, "final_train_loss": t_end, "train_fall": fall,
              "val_records_after_best": after, "val_records": ec.n}
        # evaluations that noise alone can keep above the minimum: 3 noise units against the 5% rise
        patience = max(2, min(after, int(math.ceil(OVERFIT_NOISE * noise / max(abs(vmin) * OVERFIT_RISE, 1e-300)))))
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
        what = "The validation loss"
        if several and where:  # which of the run's no-grad losses it is
            ev["val_site"] = where
            what = f"The loss computed without grad at {where}"
        msg = (f"{what} reached its minimum {vmin:.4g} at step {s_min} and rose {rise:.0%} to {vend:.4g} "
               f"over the next {after} evaluations, while the training loss fell {fall:.0%} ({t_at:.4g} -> {t_end:.4g}).")
        return self.finding(confidence=conf, message=msg, first_step=s_min, evidence=ev, recommendations=recs)
