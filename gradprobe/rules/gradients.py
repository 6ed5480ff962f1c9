"""GP2xx: gradient magnitude (overclipping, exploding-gradients, missing-gradient-clipping; vanishing-gradients
is :mod:`gradprobe.rules.vanishing`).

These rules read the total gradient norm before clipping (``grad_norm``) and after it (the
norm the optimizer consumed, ``step_grad_norm``), the observed ``clip_grad_norm_`` calls,
per-layer gradient and weight norms, the learning rate and the optimizer family. Shared
statistics (spikes above the running level, the stable window, the clip threshold computed
from the run, loss progress) live in :mod:`gradprobe.analysis`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    MAX_NORM_FORMULA,
    MAX_NORM_PERCENTILE,
    SPIKE_ABOVE_SUSTAINED,
    SPIKE_FACTOR,
    TRIVIAL_LEVEL,
    RunContext,
    class_ordered_batches,
    exploding_through_time,
    geometric_growth,
    grad_spikes,
    layer_forward_order,
    layer_grads_by_row,
    loss_curve,
    loss_spikes,
    material_rise,
    optimizer_eps,
    optimizer_family,
    suggested_max_norm,
    tiny_targets,
    total_numel,
    trailing_level_at,
    trivial_loss,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Product, Ramp, Recommendation, Rule, register

#: GP202: the loss over the 10 steps after a spike at this many times the 10 before (and the
#: rise material: ``analysis.material_rise``) is harm; batch-to-batch noise of a 10-step median
#: stays well inside it.
LOSS_HARM_FACTOR = 1.5
#: GP202: spikes on 5% of the steps or more are a regime (warning even without harm): a few
#: unlucky batches (heavy-tailed features, a rare hard example) spike now and then, one step in
#: twenty does not.
SPIKE_FRACTION_WARN = 0.05
#: ... unless every spike lies within this many of the norm's own robust standard deviations
#: (``GradSpikes.scatter``, in decades) of its running level: a norm that scatters by
#: decades from record to record (batches of one example, whose gradients differ by orders
#: of magnitude; a saved log sampling one step in hundreds) reaches 10x its level as part of
#: its ordinary spread. Four: beyond it lies 1 record in 30,000 of Gaussian scatter.
SCATTER_SDS = 4.0
#: GP202: the loss jump is the median of this many records after the spike over the median of
#: as many before it.
LOSS_JUMP_RECORDS = 10
#: A layer's rise over a zero level, kept finite so that it still ranks.
FINITE_INF = 1e300

#: GP201: clipping that leaves at most this fraction of the update is a hidden lr divisor (a
#: factor of 5 is one step of a typical learning-rate search grid: it changes outcomes).
CUT_FACTOR = 0.2
#: GP201's starved form: an SGD-like run clipped on 90% of its steps to 1% of the update or less
#: steps at a learning rate two decades below the one it was configured with (beyond any search
#: grid), whatever the loss still does.
STARVED_FACTOR = 0.01
STARVED_CLIPPED = 0.9
#: GP201: clipping shrinks the gradient when the post/pre-clip ratio is below this (a norm
#: recomputed after a no-op clip differs from the original in the last digits).
CLIPPED_SHRINK = 0.999
#: GP201: the loss "moved" when it lost this fraction of its start (``LossCurve.fell``'s 10%).
LOSS_MOVES = 0.10
#: GP201: the trivial predictor's level reaches up to 2x its loss (an untrained model's
#: predictions add their own variance to the targets'); far above it the run blew up.
TRIVIAL_LEVEL_TOP = 2.0
#: GP201: fewest clipped steps, and loss records, a clipping regime is judged on.
MIN_CLIPPED_STEPS = 5
MIN_LOSS_RECORDS = 6
#: GP202/GP204: spikes make a pattern from this many events.
SPIKE_EVENTS = 3

_CLIP_SNIPPET = """\
loss.backward()
{unscale}torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm})
{step}"""


def _clip_snippet(ctx: RunContext, max_norm: float) -> str:
    amp = ctx.scaler is not None
    return _CLIP_SNIPPET.format(
        unscale="scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones\n" if amp else "",
        max_norm=max_norm,
        step="scaler.step(optimizer)\nscaler.update()" if amp else "optimizer.step()",
    )


def _max_norm_recommendations(ctx: RunContext, current: float | None, purpose: str) -> list[Recommendation]:
    """``max_norm`` from the run (:func:`gradprobe.analysis.suggested_max_norm`) and the clip
    call to make with it; when the run has too few healthy steps to compute it, or (clipping
    already on) the computed value would not raise the current one, says so."""
    sug = suggested_max_norm(ctx)
    if not sug:
        return [Recommendation.omitted("max_norm", current, sug.reason)]
    if current is not None and sug.value <= current:
        return [Recommendation.omitted(
            "max_norm", current, f"the {MAX_NORM_PERCENTILE}th percentile of the healthy pre-clip norms "
            f"({sug.value:g}) is not above the current max_norm")]
    window = sug.details["window"]
    return [
        Recommendation.hyperparameter(
            "max_norm", current, sug.value,
            f"{MAX_NORM_PERCENTILE}th percentile of pre-clip norms in the stable window (steps {window[0]}-{window[1]}, "
            f"median {sug.details['median']:.3g}): {purpose}"),
        Recommendation.code("Clip the gradient norm before the optimizer step" if current is None else
                            "Clip only outliers: set max_norm from the gradient norms this model actually has",
                            _clip_snippet(ctx, sug.value)),
    ]


@register
class Overclipping(Rule):
    """Gradient clipping cuts (nearly) every step by a large factor: the loss barely moves, or
    an SGD-like run crawls at a hundredth of its step size.

    Clipping rescales the whole gradient by ``max_norm / ||g||``. What that does to the update
    depends on the optimizer: an SGD-like step is ``lr * g``, so the step shrinks by the same
    factor and the effective learning rate is ``lr * shrink``; an Adam-like step is
    ``m / (sqrt(v) + eps)``, invariant to a uniform rescaling, so clipping only bites once the
    clipped per-element gradient approaches ``eps`` (the update then shrinks by about
    ``rms / (rms + eps)``). Clipping on every step is therefore not a fault in itself: the
    word_language_model recipe (SGD, lr 20, max_norm 0.25) clips almost every step by design
    and learns well, because its learning rate was chosen for clipped gradients. This rule
    judges the effective update and the loss together.

    Fires when all hold, on the steps where ``clip_grad_norm_`` was observed (steps that clip
    still-scaled AMP gradients are left to GP305):

    * the optimizer is SGD-like or Adam-like (LBFGS, Rprop... rescale or ignore the step size);
    * clipping shrinks the gradient (``step_grad_norm < grad_norm``) on >= 50% of them:
      clipping is the regime, not an outlier guard;
    * the effective update factor is <= 0.2: SGD-like, the median ``step_grad_norm /
      grad_norm`` over clipped steps; Adam-like, the eps-suppression ratio above. A factor of
      5 is as large as the steps of a typical learning-rate search grid: it changes outcomes;
    * the training loss barely moves: its final level (median of the last smoothing window,
      :class:`~gradprobe.analysis.LossCurve`) did not fall below where it started by 10% and
      by 3 standard errors of a window median (``LossCurve.fell``; the start is the first
      window's median, or the first record when that lies beyond 5 noise units of it, so one
      easy or hard first batch decides nothing), or, where the loss of a model that ignores
      its input is known (:class:`~gradprobe.analysis.TrivialLoss`), the second half of the
      run is still at 0.8x to 2x of it (the level of an untrained model, whose predictions add
      their own variance to the targets': it learned almost nothing, whatever it drifted;
      far above it the run blew up, which clipping does not do);
      and it did not rise (``LossCurve.rose``: by 3 standard errors of a window median and
      10% of the start; a loss rising beyond that is not what clipping causes).
      Healthy runs cut their loss by well over 10% in their first hundreds of steps; a run
      whose steps are cut 5x or more barely moves. Severity error.

    Starved, not stalled (warning): an SGD-like run clipped on at least 90% of its steps to at
    most 1% of the update (``STARVED_FACTOR``, ``STARVED_CLIPPED``) steps at a learning rate two
    decades below the configured one, beyond anything a learning-rate search would compare; its
    loss may still fall (still falling over the second half by more than half the curve's
    significance), slowly, and that is what hides it. It fires then too: the run would get
    there in a fraction of the steps.

    Recommended ``max_norm``: the 95th percentile of pre-clip norms in the stable window
    (:func:`~gradprobe.analysis.stable_window`: finite norms after warm-up, spikes and their
    aftermath excluded): clipping then trims only the largest 5% of normal steps and every
    spike. Needs >= 5 steps where clipping was observed.

    Confidence: the geometric mean of three terms (one weak term lowers it, none decides
    alone): how nearly every step is clipped (whole at 90%); how far the cut is past 5x (0.5
    at 5x, whole at 50x, on a log scale); how little the loss moved (0.5 at a 10% decrease,
    whole when it did not decrease at all).
    """

    code = "GP201"
    slug = "overclipping"
    severity = "error"
    severities = {
        "error": "the loss barely moves (or sits at the trivial predictor's level)",
        "warning": "the loss still falls, but at 1/100 of the step size or less (an SGD-like run starved by "
                   "clipping on 90% of its steps)",
    }
    evidence_fields = {
        "clipped_fraction": Field("clipped steps", "%"),
        "median_preclip_norm": Field("median pre-clip norm", "norm"),
        "median_shrink": Field("median post/pre-clip norm", "x"),
        "max_norm": Field("max_norm", "norm"),
        "optimizer": Field("optimizer"),
        "clipped_grad_rms": Field("clipped per-element gradient RMS"),
        "eps": Field("optimizer eps"),
        "effective_update_factor": Field("update kept after clipping", "x"),
        "loss_first": Field("loss at the start", "loss"),
        "loss_last": Field("loss at the end", "loss"),
        "relative_loss_decrease": Field("loss decrease", "%"),
        "lr": Field("configured lr", "lr"),
        "effective_lr": Field("effective lr", "lr"),
        "median_update_ratio": Field("median update-to-weight ratio"),
        "starved_but_falling": Field("still falling, at a fraction of its step size"),
    }
    title = "Gradient clipping cuts every step: the effective learning rate is a fraction of the configured one"
    requires = ("grad_norm", "clip", "loss", "optimizer")
    confidence = Product((
        Confidence(0, Ramp(1.0, "clipped fraction", span=0.9)),
        Confidence(0.5, Ramp(0.5, "1 / update factor", start=1 / CUT_FACTOR, log=True)),
        Confidence(0.5, Ramp(0.5, "(0.1 - relative loss decrease)", span=LOSS_MOVES)),
    ), geometric=True)
    causes = ()
    computes = {"max_norm": MAX_NORM_FORMULA}
    explanation = Explanation(
        what=(
            "clip_grad_norm_ fires on (nearly) every step and shrinks the gradient by a large factor, so "
            "with an SGD-like optimizer the effective learning rate is a fraction of the configured one, "
            "and the loss barely moves."
        ),
        why=(
            "A max_norm far below the typical gradient norm turns clipping from an outlier guard into a "
            "hidden learning-rate divisor: every step has length lr * max_norm whatever the gradient "
            "says, and training crawls. Adam-like optimizers normalise a uniform rescaling away, so "
            "for them clipping only hurts when the clipped gradients approach eps."
        ),
        causes=(
            "A max_norm copied from another model (0.5, 0.25, 1.0) without looking at this model's "
            "gradient norms; a learning rate lowered at the same time as clipping was added; loss "
            "terms summed instead of averaged, which makes every gradient norm large."
        ),
        fix=(
            "Set max_norm from this run's gradient norms (the 95th percentile of the stable window), "
            "so clipping only trims spikes; or keep clipping as the regime and raise the learning "
            "rate for clipped gradients, as word_language_model does."
        ),
        example=(
            "SGD lr 0.5, clip_grad_norm_(..., 0.01) with typical norms ~0.2: every step is cut 20x and "
            "the loss stays near ln(vocab) -> max_norm 0.25."
        ),
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        fam = optimizer_family(ctx)
        if fam not in ("sgd", "adaptive"):
            return []
        g, s = ctx.grad_norm, ctx.step_grad_norm
        clip = ctx.clip_mask & ~ctx.col("clip_on_scaled", bool)
        rows = np.flatnonzero(clip & np.isfinite(g) & np.isfinite(s) & (g > 0))
        if rows.size < MIN_CLIPPED_STEPS:
            return []
        shrink = s[rows] / g[rows]
        clipped = shrink < CLIPPED_SHRINK
        frac = float(clipped.mean())
        if frac < 0.5:
            return []
        med_shrink = float(np.median(shrink[clipped]))
        evidence: dict[str, Any] = {
            "clipped_fraction": frac,
            "median_preclip_norm": float(np.median(g[rows])),
            "median_shrink": med_shrink,
            "max_norm": ctx.max_norm,
            "optimizer": ctx.optimizer_class,
        }
        if fam == "sgd":
            factor = med_shrink
        else:
            numel = total_numel(ctx)
            eps = optimizer_eps(ctx)
            if numel <= 0:
                return []
            rms_post = float(np.median(s[rows][clipped])) / math.sqrt(numel)
            rms_pre = float(np.median(g[rows][clipped])) / math.sqrt(numel)
            factor = (rms_post / (rms_post + eps)) / (rms_pre / (rms_pre + eps))
            evidence.update(clipped_grad_rms=rms_post, eps=eps)
        evidence["effective_update_factor"] = factor
        if factor > CUT_FACTOR:
            return []
        curve = loss_curve(ctx)
        if curve.n < MIN_LOSS_RECORDS or not curve.start > 0:
            return []
        rel = curve.progress
        if curve.rose:
            return []
        starved = False
        if curve.fell:
            tl = trivial_loss(ctx)
            mid = int(curve.steps[curve.n // 2])
            late = tl.ratio_between(mid, int(curve.steps[-1])) if tl.consistent else math.nan
            half = curve.n // 2
            still_falling = float(curve.smooth[half] - curve.smooth[-1]) > curve.significance / 2
            starved = fam == "sgd" and factor <= STARVED_FACTOR and frac >= STARVED_CLIPPED and still_falling
            if not (TRIVIAL_LEVEL <= late <= TRIVIAL_LEVEL_TOP) and not starved:
                return []  # it learned (or blew up: not what clipping does); clipping is its regime
        evidence["starved_but_falling"] = starved
        evidence.update(loss_first=curve.start, loss_last=curve.final, relative_loss_decrease=rel)
        lr0 = ctx.lr0
        if lr0 is not None and math.isfinite(lr0):
            evidence.update(lr=lr0, effective_lr=lr0 * factor)
        upd = ctx.samples("update", "ratio")
        if not upd.empty:
            evidence["median_update_ratio"] = float(np.median(upd["value"].to_numpy(dtype=np.float64)))

        conf = self.confidence(frac, 1.0 / max(factor, 1e-12), LOSS_MOVES - max(rel, 0.0))

        current = ctx.max_norm
        recs = _max_norm_recommendations(ctx, current, "clipping then trims only spikes")
        first = ctx.step_at(int(rows[np.flatnonzero(clipped)[0]]))
        if fam == "sgd":
            how = (f"clipping cuts the gradient to {100 * med_shrink:.2g}% of its norm (median pre-clip norm "
                   f"{evidence['median_preclip_norm']:.3g} vs max_norm {current:.3g})")
            lr_txt = (f", so {ctx.optimizer_class} steps with an effective lr of {lr0 * factor:.3g} "
                      f"instead of {lr0:.3g}" if lr0 else "")
        else:
            how = (f"clipping leaves per-element gradients of {evidence['clipped_grad_rms']:.2g}, at the scale of "
                   f"{ctx.optimizer_class}'s eps ({evidence['eps']:.2g}), which suppresses the update to "
                   f"{100 * factor:.2g}%")
            lr_txt = ""
        message = (
            f"On {100 * frac:.0f}% of the clipped steps {how}{lr_txt}. The loss barely moved "
            f"({curve.start:.4g} -> {curve.final:.4g}, {100 * rel:.1f}%): clipping is acting as a hidden "
            "learning-rate divisor, not as a guard against spikes."
        )
        if starved:
            message = (
                f"On {100 * frac:.0f}% of the clipped steps {how}{lr_txt}. The loss is still falling "
                f"({curve.start:.4g} -> {curve.final:.4g}), but at 1/{1 / factor:.0f} of the step size its learning rate "
                "was set for: the run is starved, not stalled, and would get where it is going in a fraction of the "
                "steps with clipping that only trims spikes.")
        return [self.finding(confidence=conf, message=message, first_step=first, evidence=evidence,
                             recommendations=recs, severity="warning" if starved else "error")]


def _start_layer(ctx: RunContext, base_row: int, onset_row: int) -> tuple[str | None, list[tuple[str, float]]]:
    """The layer an explosion starts in, and the layers ranked by their rise at the onset.

    Each layer's rise is its norm over its own level before the onset (its trailing median
    at ``base_row + 1``). The start is the first step at which any layer rose >= 10x; among
    the layers that did at that step, backpropagation carries an amplification from the
    layer where it arises towards the input, so the layers closer to the output that did not
    spike rule themselves out: the start is the spiking module latest in forward order, and
    within it the parameter with the largest rise. Without a 10x layer: the largest rise."""
    lg = layer_grads_by_row(ctx)
    if lg.empty or onset_row >= len(lg) or base_row + 1 > onset_row:
        return None, []
    arr = lg.to_numpy(dtype=np.float64)
    names = list(lg.columns)
    base = trailing_level_at(arr, base_row + 1)  # each layer's trailing_level at base_row + 1
    window = arr[base_row + 1 : onset_row + 1]
    with np.errstate(all="ignore"):
        rise = window / np.where(base > 0, base, np.nan)
    rise = np.nan_to_num(rise, nan=0.0, posinf=FINITE_INF)
    at_onset = rise[-1]
    ranked = sorted(((names[j], float(at_onset[j])) for j in range(len(names)) if at_onset[j] > 0), key=lambda t: -t[1])
    hit = rise >= SPIKE_FACTOR
    rows = np.flatnonzero(hit.any(axis=1))
    if not rows.size:
        return (ranked[0][0] if ranked else None), ranked[:5]
    cols = np.flatnonzero(hit[rows[0]])
    order = layer_forward_order(ctx)
    info = ctx.layer_info

    def module_of(j: int) -> str:
        return str(info.get(names[j], {}).get("module") or names[j].rsplit(".", 1)[0])

    position: dict[str, float] = {}
    for j in range(len(names)):
        m = module_of(j)
        position[m] = min(position.get(m, math.inf), order.get(names[j], float(j)))
    last_module = max({module_of(j) for j in cols}, key=lambda m: position.get(m, -math.inf))
    in_module = [j for j in cols if module_of(j) == last_module]
    best = max(in_module, key=lambda j: rise[rows[0], j])
    return names[best], ranked[:5]


def _loss_jump(ctx: RunContext, row: int) -> tuple[float | None, float, float]:
    """(median loss over the 10 steps after ``row`` over the median of the 10 before, the
    median before, the median after); the ratio is None without both."""
    loss = ctx.loss
    before = loss[max(0, row - LOSS_JUMP_RECORDS) : row]
    after = loss[row + 1 : row + 1 + LOSS_JUMP_RECORDS]
    before, after = before[np.isfinite(before)], after[np.isfinite(after)]
    if before.size == 0 or after.size == 0:
        return None, math.nan, math.nan
    b, a = float(np.median(before)), float(np.median(after))
    return (a / b if b > 0 else None), b, a


@register
class ExplodingGradients(Rule):
    """The gradient norm spikes far above its running level or grows geometrically.

    Signals: the total pre-clip gradient norm per step, per-layer norms, observed clipping,
    loss and non-finite flags.

    * spike: a norm >= 10x its running level (median of the previous 20 finite norms; one
      earlier step suffices, so an explosion at step 1 is seen). Mini-batch noise moves the
      norm by a factor of 2-3; explosions by 10x-1e6x (``SPIKE_FACTOR``). Norms below 1e-3 of
      the run's starting scale (median of the first tenth of the norms) are never spikes: a
      converged run's 1e-20 -> 1e-15 is far below any step the learning rate can take. Nor
      are norms below 3x the highest running level the run sustained before them
      (``SPIKE_ABOVE_SUSTAINED``): as a run converges or memorises its data its gradient norm
      shrinks, and ordinary scatter then reaches 10x the shrunken level while staying inside
      the scale the run already trained at.
    * geometric growth: the norm, smoothed by a trailing median of 5 steps (so that one
      small batch followed by one large one is not growth), rises >= 100x (two decades) over
      >= 4 steps from its minimum of the previous 50, increasing on >= 60% of those steps, and
      ending above the scale the run trained at (as spikes must): a divergence that compounds
      step after step rather than a single bad batch, and not a converged run's gradient
      growing back from 1e-7 of its starting scale to 1e-4 of it.

    The layer it starts in: at the first step where some layer's own norm rose >= 10x over
    its level before the onset, the spiking module latest in forward order (backpropagation
    carries an amplification from where it arises towards the input, so the layers nearer
    the output that stayed calm are not where it started), and in it the parameter with the
    largest rise.

    Severity, by harm, not by size: a spike the run did not feel moved the weights by one
    large step and left the loss where it was.

    * ``error`` when it did harm: a non-finite loss or gradient at or after the onset, or the
      loss over the next 10 steps >= 1.5x the 10 before (``LOSS_HARM_FACTOR``: a 10-step
      median does not move that much by batch noise) with a rise that undid at least 5% of
      the progress the loss had made (``analysis.material_rise``: at convergence a loss of
      1e-6 that doubles is no harm), unless the loss of the onset batch itself had already
      jumped (a loss spike spanning the onset step: that loss was computed before this
      gradient was applied, so the rise is the loss spike's, judged by GP504, and the gradient
      follows it: new classes joining the data, a curriculum stage, corrupt batches);
    * ``warning`` without harm when the norm grew geometrically (it compounds: it will hurt),
      or spiked on 5% of the steps or more (``SPIKE_FRACTION_WARN``: a regime, not a few
      unlucky batches), clipped or not;
    * ``info`` for occasional spikes the loss did not feel, clipped or not (a transient in the
      first steps gone two steps later, the rare batch of heavy-tailed features: facts about
      the run, not faults), and for frequent ones the loss did not feel that lie within the
      norm's own scatter: every spike within ``SCATTER_SDS`` (4) robust standard deviations
      of log10(norm / level) (``GradSpikes.scatter``). Mini-batch gradients average many
      examples and scatter by ~0.1 decade, so 10x is 10 standard deviations out; a batch of one
      example has the gradient of that example, and per-example gradient norms differ by
      orders of magnitude (one the model already predicts, one it finds surprising): there
      10x and even 1000x is the ordinary spread, and only harm tells an explosion.

    Contained: clipping ran on every spike step and the clipped norm stayed <= 3x the larger of
    the running level and the highest level the run sustained before (a step of that size is
    one the run already trained with). A log that does not record clipping (most foreign
    logs) says so instead of claiming nothing clipped.

    Recommended ``max_norm`` (only when the run never clips): the 95th percentile of pre-clip
    norms in the stable window, as GP201/GP204.

    Not judged on tiny regression targets (RMS <= 1e-3, GP602) unless non-finite values
    follow: the gradient is proportional to the residual, and the first optimizer step moves
    the predictions from the targets' scale to the step's own scale, multiplying the residual,
    and the gradient with it, by orders of magnitude without anything exploding.

    Causes: when the spike starts on a record of a training-loss spike (GP504: the loss of that
    very batch was already several times its level), the large gradient is that loss's: the
    gradient scales with the loss, and the loss of step s is computed before step s's update,
    so the gradient spike cannot have caused it. The finding then names ``loss-spike`` as its
    cause (with the static causes present in the report); otherwise the engine links the
    static causes.

    Confidence: how far the largest ratio (or growth factor) is past 10x on a log scale (0.5
    at 10x, whole at 1000x), times how many events there were (one can be a freak batch,
    ``SPIKE_EVENTS`` are a pattern).
    """

    code = "GP202"
    slug = "exploding-gradients"
    severity = "error"
    severities = {
        "error": "it did harm: non-finite values, or the loss of the next 10 steps 1.5x the 10 before, a rise that "
                 "undid at least 5% of the run's progress",
        "warning": "no harm, but the norm grew geometrically, or it spiked on 5% of the steps or more (clipped or not)",
        "info": "isolated spikes the loss did not feel (clipped or not): a fact, not a fault",
    }
    #: the gradient of a batch whose loss already spiked is that loss's (it scales with the loss);
    #: gradients that grew backwards through time at or before the onset are the recurrence's
    causes_on_evidence = ("loss-spike", "long-lookback")
    evidence_fields = {
        "pattern": Field("pattern"),
        "onset_step": Field("onset", "step"),
        "grad_norm_at_onset": Field("gradient norm at the onset", "norm"),
        "running_level": Field("running level before it", "norm"),
        "max_ratio": Field("largest jump over the running level", "x"),
        "spikes": Field("spikes", "steps"),
        "spike_fraction": Field("steps that spiked", "%"),
        "clipped": Field("clipping on"),
        "contained_by_clipping": Field("contained by clipping"),
        "growth_factor": Field("growth", "x"),
        "growth_steps": Field("over", "steps"),
        "layer_rise_at_onset": Field("layers' rise at the onset", "x"),
        "loss_after_over_before": Field("loss after over before", "x"),
        "nonfinite_step": Field("non-finite from", "step"),
        "loss_spike_step": Field("loss spike at", "step"),
        "scatter_decades": Field("record-to-record scatter", "decades"),
    }
    title = "Exploding gradients"
    requires = ("grad_norm",)
    confidence = (Confidence(0.5, Ramp(0.5, "largest ratio", start=SPIKE_FACTOR, span=2.0, log=True))
                  * Confidence(0.7, Ramp(0.3, "events", span=SPIKE_EVENTS)))
    causes = ("undetached-hidden-state", "lr-too-high", "poor-initialization", "input-scale", "missing-weight-decay",
              "fp16-overflow")
    computes = {"max_norm": "only if the run never clips: " + MAX_NORM_FORMULA}
    explanation = Explanation(
        what=(
            "The total gradient norm spikes far above its running level or grows geometrically; the "
            "report names the layer the explosion starts in."
        ),
        why=(
            "One exploded step moves the weights by orders of magnitude more than any normal step: "
            "the loss jumps, Adam's second-moment estimates are poisoned for thousands of steps, and "
            "the next step often overflows to NaN."
        ),
        causes=(
            "A hidden state carried across steps, long BPTT windows through recurrent weights with "
            "spectral radius > 1, a learning rate above the stability limit, unnormalised inputs, "
            "weights growing without weight decay, a bad batch."
        ),
        fix=(
            "Remove the cause (detach the state, shorten the window, lower the learning rate, "
            "normalise inputs); add gradient clipping with a max_norm computed from the run's normal "
            "gradient norms so that spikes are cut."
        ),
        example="grad_norm 1.5, 1.6, 131663 at step 6 (rnn.weight_hh_l0 first) -> clip at the 95th percentile.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        sp = grad_spikes(ctx)
        growth = geometric_growth(ctx)
        if sp.first is None and growth is None:
            return []
        use_growth = growth is not None and (sp.first is None or growth[0] < sp.first and growth[1] <= sp.first)
        if use_growth:
            assert growth is not None
            base_row, onset_row, size = growth[0], growth[1], growth[2]
            pattern = "geometric growth"
            event_rows = np.array([onset_row])
        else:
            onset_row = int(sp.first)  # type: ignore[arg-type]
            base_row = onset_row - 1
            size = float(sp.ratio[onset_row])
            pattern = "spike"
            event_rows = sp.rows
        n_events = int(event_rows.size)
        max_ratio = max(size, sp.max_ratio)
        first_step = ctx.step_at(onset_row if not use_growth else base_row)
        layer, ranked = _start_layer(ctx, base_row, onset_row) if base_row >= 0 else (None, [])

        clip_calls = ctx.clip_mask
        s = ctx.step_grad_norm
        scale = np.fmax(np.nan_to_num(sp.level[event_rows], nan=0.0), sp.sustained[event_rows])
        bounded = np.nan_to_num(s[event_rows], nan=np.inf) <= SPIKE_ABOVE_SUSTAINED * scale
        contained_rows = clip_calls[event_rows] & bounded
        contained = bool(contained_rows.all()) and bool(clip_calls.any())
        nonfinite = ~np.isfinite(ctx.loss) & (ctx.col("loss_nonfinite", bool) | ctx.col("loss_fn_nonfinite", bool))
        nonfinite |= ctx.col("grad_nonfinite_layers", np.int64) > 0
        nonfinite_after = np.flatnonzero(nonfinite[onset_row:])
        if tiny_targets(ctx) and not nonfinite_after.size:
            return []  # the residual, and the gradient, jump from the targets' scale to the step's (GP602)
        jump, before_level, after_level = _loss_jump(ctx, onset_row)
        curve = loss_curve(ctx)
        onset_step = ctx.step_at(onset_row)
        same_batch = [e for e in loss_spikes(ctx) if e.step <= onset_step <= e.end_step]
        # a loss that had jumped on the onset batch itself was computed before this gradient
        # was applied: the rise is the loss spike's (GP504 judges what it did), not this step's
        # batches of one class each (GP504): the loss jumps at each new class before any update on it
        ordered = class_ordered_batches(ctx) is not None and bool(loss_spikes(ctx))
        felt = (jump is not None and jump >= LOSS_HARM_FACTOR and material_rise(curve, before_level, after_level)
                and not same_batch and not ordered)
        harmed = bool(nonfinite_after.size) or felt
        spike_fraction = n_events / max(1, int(np.isfinite(sp.norm).sum()))
        in_scatter = not use_growth and bool(
            (np.log10(sp.ratio[event_rows]) <= SCATTER_SDS * sp.scatter).all())
        if harmed:
            severity = "error"
        elif (use_growth or spike_fraction >= SPIKE_FRACTION_WARN) and not in_scatter:
            severity = "warning"
        else:
            severity = "info"  # isolated spikes the run did not feel: a fact, not a fault

        evidence: dict[str, Any] = {
            "pattern": pattern,
            "onset_step": ctx.step_at(onset_row),
            "grad_norm_at_onset": float(sp.norm[onset_row]) if np.isfinite(sp.norm[onset_row]) else None,
            "running_level": float(sp.level[onset_row]) if np.isfinite(sp.level[onset_row]) else None,
            "max_ratio": max_ratio,
            "spikes": int(sp.rows.size),
            "spike_fraction": spike_fraction,
            "clipped": bool(clip_calls.any()),
            "contained_by_clipping": contained,
        }
        if use_growth:
            evidence.update(growth_factor=size, growth_steps=int(onset_row - base_row))
        if ranked:
            evidence["layer_rise_at_onset"] = {n: v for n, v in ranked[:3]}
        if jump is not None:
            evidence["loss_after_over_before"] = jump
        if nonfinite_after.size:
            evidence["nonfinite_step"] = ctx.step_at(onset_row + int(nonfinite_after[0]))
        caused_by: list[str] = []
        if same_batch:
            evidence["loss_spike_step"] = same_batch[0].step
        if same_batch or ordered:
            caused_by = ["loss-spike"]
        through_time = exploding_through_time(ctx)
        if through_time is not None and through_time <= onset_step:
            caused_by.append("long-lookback")

        conf = self.confidence(max_ratio, n_events)
        recs = []
        if not clip_calls.any():
            recs = _max_norm_recommendations(ctx, None, "cuts spikes, leaves normal steps")
        where = f" It starts in `{layer}`." if layer else ""
        if use_growth:
            what = (f"The gradient norm grew {size:.3g}x over {onset_row - base_row} steps "
                    f"(step {ctx.step_at(base_row)} to {ctx.step_at(onset_row)}), compounding step after step.")
        else:
            what = (f"At step {ctx.step_at(onset_row)} the gradient norm jumped to {sp.norm[onset_row]:.3g}, "
                    f"{size:.3g}x its running level {sp.level[onset_row]:.3g}"
                    + (f" ({int(sp.rows.size)} spikes >= {SPIKE_FACTOR:g}x in all, largest {sp.max_ratio:.3g}x)."
                       if sp.rows.size > 1 else "."))
        after = []
        if nonfinite_after.size:
            after.append(f"gradients or loss became non-finite at step {evidence['nonfinite_step']}")
        if felt:
            after.append(f"the loss over the next 10 steps was {jump:.2g}x the 10 before")
        elif not nonfinite_after.size:
            after.append("the loss did not feel it")
        if contained:
            after.append("clipping bounded the step")
        elif clip_calls.any():
            after.append("clipping did not bound it")
        elif "clip" in ctx.signals:
            after.append("nothing clipped it")
        else:
            after.append("this log does not record whether anything clipped it")
        message = what + where + " Then " + "; ".join(after) + "."
        if in_scatter and not harmed:
            evidence["scatter_decades"] = sp.scatter
            message += (f" The norm scatters by {sp.scatter:.2g} decades (one robust standard deviation) from record "
                        "to record: these spikes lie within its ordinary spread.")
        if same_batch:
            message += (f" The loss of that batch had already jumped (loss spike from step {same_batch[0].step}): the "
                        "gradient follows the loss.")
        return [self.finding(confidence=conf, message=message, first_step=first_step, layer=layer,
                             evidence=evidence, recommendations=recs, severity=severity, may_follow=caused_by)]


@register
class MissingGradientClipping(Rule):
    """A recurrent run has gradient spikes and never clips.

    Fires when no ``clip_grad_norm_`` call was observed in the whole run, the run is recurrent
    (a recurrent module or cell is watched, or a state was carried across steps) and its
    gradient spiked at least once. A feed-forward network that spikes is GP202's alone: its
    spikes come from the data or the learning rate, not from a Jacobian multiplied over time,
    and clipping is not its standard guard. Spikes are those of GP202: a pre-clip norm >= 10x its running level (the median of the
    previous 20 finite norms) and >= 1e-3 of the run's starting scale. Recurrent networks
    multiply the gradient by the recurrent Jacobian at every step back in time, so a spike is
    their characteristic failure (Pascanu et al., 2013) and clipping is the standard guard;
    one observed spike says the run lives in that regime.

    Recommended ``max_norm``: the 95th percentile of pre-clip norms in the stable window
    (finite norms after warm-up, spikes and the 2 steps after each excluded), so clipping
    cuts the spikes and leaves normal steps alone.

    Confidence: how far the largest spike is past 10x on a log scale (0.5 at 10x, whole at
    1000x), times how many spikes there were (one observed spike already places the run in
    that regime: 0.6; ``SPIKE_EVENTS`` make it certain).
    """

    code = "GP204"
    slug = "missing-gradient-clipping"
    severity = "warning"
    evidence_fields = {
        "spikes": Field("spikes", "steps"),
        "max_ratio": Field("largest spike over the running level", "x"),
        "first_spike_step": Field("first spike", "step"),
        "recurrent_modules": Field("recurrent modules"),
        "clip_calls": Field("clip calls"),
        "median_grad_norm": Field("median gradient norm", "norm"),
    }
    title = "Gradient spikes in a recurrent run with no clipping"
    requires = ("grad_norm", "clip")
    confidence = (Confidence(0.5, Ramp(0.5, "largest spike", start=SPIKE_FACTOR, span=2.0, log=True))
                  * Confidence(0.6, Ramp(0.4, "spikes", span=SPIKE_EVENTS)))
    causes = ("exploding-gradients",)
    computes = {"max_norm": MAX_NORM_FORMULA}
    explanation = Explanation(
        what="A recurrent run (an RNN, LSTM or GRU, or a state carried across steps) has gradient spikes and no gradient clipping at all.",
        why=(
            "Without clipping, one exploded gradient moves the weights by orders of magnitude more "
            "than a normal step; recurrent networks produce such spikes whenever the recurrent "
            "Jacobian amplifies over the window. Clipping at the scale of the normal gradient norms "
            "cuts them at no cost to normal steps."
        ),
        causes="No clip_grad_norm_ in the training loop of an RNN/LSTM/GRU or a model that carries its state across steps.",
        fix="Call torch.nn.utils.clip_grad_norm_ between backward and optimizer.step (after scaler.unscale_ with AMP).",
        example="RNN language model, SGD lr 10, grad norm 1.5 -> 131663 at step 6 -> clip at max_norm ~2.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        if ctx.clip_mask.any():
            return []
        sp = grad_spikes(ctx)
        n = int(sp.rows.size)
        if n == 0:
            return []
        recurrent = bool(ctx.recurrent) or bool((ctx.col("state_age") >= 1).any())
        if not recurrent:
            return []
        sug = suggested_max_norm(ctx)
        evidence: dict[str, Any] = {
            "spikes": n,
            "max_ratio": sp.max_ratio,
            "first_spike_step": ctx.step_at(int(sp.first)),  # type: ignore[arg-type]
            "recurrent_modules": [r.get("module") for r in ctx.recurrent],
            "clip_calls": 0,
        }
        recs = _max_norm_recommendations(ctx, None, "cuts spikes, leaves normal steps")
        if sug:
            evidence["median_grad_norm"] = sug.details["median"]
        message = (
            f"This recurrent run never clips its gradients, and the gradient norm spiked {n} time(s) to >= "
            f"{SPIKE_FACTOR:g}x its running level (largest {sp.max_ratio:.3g}x, first at step "
            f"{evidence['first_spike_step']})"
            + (f". Clipping at max_norm={sug.value:g} (the normal steps' {MAX_NORM_PERCENTILE}th percentile) would cut "
               "the spikes and leave normal steps alone." if sug else ".")
        )
        conf = self.confidence(sp.max_ratio, n)
        return [self.finding(confidence=conf, message=message, first_step=evidence["first_spike_step"],
                             evidence=evidence, recommendations=recs)]
