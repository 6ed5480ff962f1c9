"""GP507: a training loss that falls without bound (unbounded-loss)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradprobe.analysis import RunContext, loss_curve, rank_correlation
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register

#: GP507: the loss must stay negative over at least this fraction of the run's records, ...
NEGATIVE_FRACTION = 0.25
#: ... fall steadily there (rank correlation with the step at most -0.9), ...
STEADY = 0.9
#: ... and lose at least this fraction of its first half's drop over the second half (a loss
#: approaching a floor halves its remaining distance and more).
NOT_SLOWING = 0.5
#: ... with the weight norm grown at least this much since the crossing (the scores grow only
#: through the weights), or, without weight norms, ending this many times deeper below 0 than
#: its largest magnitude before the crossing.
WEIGHT_GROWTH = 2.0
DEPTH = 10.0
MIN_UNBOUNDED_RECORDS = 20
#: GP507: the weight growth at which confidence is whole (a decade), and how steady the fall
#: must be for it (a perfect -1 rank correlation, from ``STEADY``).
GROWTH_FULL = 10.0
STEADY_SPAN = 0.1
#: GP507: fewest records after the crossing whose trend is judged, and fewest weight-norm
#: records whose growth is.
MIN_NEGATIVE_RECORDS = 4
MIN_WEIGHT_RECORDS = 4


# ------------------------------------------------------------------------------------------
@register
class UnboundedLoss(Rule):
    """Fires when the training loss goes negative and keeps falling without bound: the loss is
    unbounded below for the model's outputs, and the optimizer exploits that instead of fitting
    the data.

    A loss that measures a fit is bounded below: a cross-entropy or a negative log-likelihood of
    a normalised distribution over classes is >= 0, a squared error >= 0. Some losses are
    legitimately negative (the Gaussian NLL of a density above 1, a WGAN critic's
    Wasserstein estimate), but a bounded loss approaches its floor: its fall slows down. An
    unbounded one (``NLLLoss`` on raw scores instead of log-probabilities: -score[target], which
    any growth of the scores lowers) falls at the same pace or faster for as long as the run
    lasts, and the weights grow to make the scores grow.

    Fires when all hold on the smoothed training loss (:class:`~gradprobe.analysis.LossCurve`):

    * it crossed below 0 and stayed below for at least ``NEGATIVE_FRACTION`` of the run's
      records, ending negative;
    * after the crossing it falls steadily (rank correlation with the step <= -``STEADY``) and
      does not slow down: the drop over the last half of that stretch is at least
      ``NOT_SLOWING`` times the drop over its first half (a loss approaching a floor loses most
      of its remaining distance early);
    * what grows with it, where recorded: the total weight norm at the end is at least
      ``WEIGHT_GROWTH`` times its value at the crossing (scores grow only through weights);
      without weight norms (foreign logs) the loss must end at least ``DEPTH`` times further
      below 0 than its largest magnitude before the crossing.

    Confidence: 0.6 from the conditions above, more with a larger weight growth (whole at
    10x) and a steadier fall (whole at a rank correlation of -1).
    """

    code = "GP507"
    slug = "unbounded-loss"
    severity = "error"
    title = "The loss falls without bound: the loss function can be lowered without fitting the data"
    requires = ("loss",)
    confidence = Confidence(0.6, Ramp(0.2, "weight growth", span=GROWTH_FULL),
                            Ramp(0.2, "-rank correlation", start=STEADY, span=STEADY_SPAN))
    evidence_fields = {
        "negative_from_step": Field("negative from", "step"),
        "loss_at_crossing": Field("loss then", "loss"),
        "loss_final": Field("loss at the end", "loss"),
        "fall_first_half": Field("fall over the first half", "loss"),
        "fall_second_half": Field("fall over the second half", "loss"),
        "rank_correlation": Field("steadiness of the fall (rank correlation)"),
        "weight_growth": Field("weight norm growth since", "x"),
    }
    explanation = Explanation(
        what="The training loss goes negative and keeps falling without bound, while the weights (and the model's "
        "outputs) grow with it.",
        why="A loss that can be lowered without limit by scaling the outputs is being exploited, not minimised: every "
        "step makes the scores larger instead of the predictions better, the weights grow until something "
        "overflows, and the loss value says nothing about the fit.",
        causes="nn.NLLLoss (or F.nll_loss) applied to raw scores instead of log_softmax outputs; an unnormalised "
        "likelihood (a density without its normaliser); a sign error that maximises what should be minimised; a "
        "regulariser with the wrong sign.",
        fix="Feed NLLLoss log-probabilities (F.log_softmax(scores, dim=-1)) or use nn.CrossEntropyLoss on the raw "
        "scores; normalise likelihoods; check the sign of every loss term.",
        example="F.nll_loss(model(x), y) on raw scores: the loss goes 0.02 -> -40 -> -900 over 300 steps while the "
        "weight norm grows 100x; with F.cross_entropy it falls to 0.3 and stays positive.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        curve = loss_curve(ctx)
        if curve.n < MIN_UNBOUNDED_RECORDS or not curve.final < 0:
            return []
        sm = curve.smooth
        neg = np.flatnonzero(sm < 0)
        if not neg.size:
            return []
        k = int(neg[0])
        if not (sm[k:] < 0).all() or (curve.n - k) < NEGATIVE_FRACTION * curve.n or curve.n - k < MIN_NEGATIVE_RECORDS:
            return []
        tail = sm[k:]
        rho = rank_correlation(np.arange(tail.size, dtype=np.float64), tail)
        half = tail.size // 2
        d1, d2 = float(tail[0] - tail[half]), float(tail[half] - tail[-1])
        if rho > -STEADY or d1 <= 0 or d2 < NOT_SLOWING * d1:
            return []
        step0 = int(curve.steps[k])
        ev: dict[str, Any] = {"negative_from_step": step0, "loss_at_crossing": float(sm[k]), "loss_final": curve.final,
                              "fall_first_half": d1, "fall_second_half": d2, "rank_correlation": rho}
        wn = ctx.col("weight_norm") if ctx.n else np.zeros(0)
        fin = np.isfinite(wn) & (wn > 0)
        growth = None
        if fin.sum() >= MIN_WEIGHT_RECORDS:
            at = wn[(ctx.step >= step0) & fin]
            if at.size >= 2:
                growth = float(at[-1] / at[0])
                ev["weight_growth"] = growth
                if growth < WEIGHT_GROWTH:
                    return []  # the weights are not growing: a legitimately negative loss settling somewhere
        else:
            before = np.abs(curve.values[:max(k, 1)])
            if abs(curve.final) < DEPTH * max(float(before.max()), 1e-12):
                return []
        conf = self.confidence(growth or DEPTH, -rho)
        msg = (f"The training loss went below 0 at step {step0} and kept falling without slowing down, to "
               f"{curve.final:.4g} ({d1:.4g} over the first half of that stretch, {d2:.4g} over the second)"
               + (f", while the weight norm grew {growth:.3g}x" if growth is not None else "")
               + ": the loss is unbounded below for the model's outputs, and the optimizer is lowering it by making "
               "the outputs larger, not by fitting the data.")
        recs = [Recommendation.code(
            "Give the loss a floor: log-probabilities into NLLLoss, or cross-entropy on raw scores",
            "scores = model(x)\n"
            "loss = F.cross_entropy(scores, y)                    # raw scores: softmax inside, loss >= 0\n"
            "# or: loss = F.nll_loss(F.log_softmax(scores, dim=-1), y)")]
        return [self.finding(confidence=conf, message=msg, first_step=step0, evidence=ev, recommendations=recs)]
