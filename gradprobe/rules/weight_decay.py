"""GP503: weights that grow without bound and no weight decay (missing-weight-decay)."""

from __future__ import annotations

import math

import numpy as np

from gradprobe.analysis import RunContext, loss_curve, loss_harm, median_lr, nice
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Flag, Ramp, Recommendation, Rule, register

#: GP503: a weight norm grown by this factor no longer reflects the initialisation ...
WEIGHT_GROWTH = 3.0
#: ... and is still growing when the last quarter of the run added at least this fraction.
LATE_GROWTH = 0.10
#: GP503 recommends weight decay only for growth up to 1% per step; faster growth is the
#: learning rate's doing (GP501), and a decay that strong would erase the weights' learning.
MAX_DECAY_PER_STEP = 0.01
#: Fewest records a norm's growth is judged on (a window at each end and in the middle).
MIN_GROWTH_RECORDS = 20
#: The window: a twentieth of the records (20 windows across the run keep its shape), at least 3.
WINDOWS = 20
MIN_WINDOW = 3
#: The last quarter of the records starts here.
LAST_QUARTER = 0.75
#: The growth began where the norm first passed this multiple of its start.
ONSET_GROWTH = 1.5
#: Growth is useless when the second half of the run bought less than this fraction of the
#: run's loss progress while the norm grew at least ``USELESS_NORM_GROWTH`` (judged on a loss of
#: at least ``MIN_GROWTH_RECORDS`` records).
USELESS_GAIN = 0.05
USELESS_NORM_GROWTH = 0.2
#: ... and only growth at a drift's pace: the growth above the start (norm - start) rising at
#: least as t**0.75 over the last quarter of the steps. Adam along a consistent gradient moves
#: every weight by ~lr per step in the same direction: the norm grows linearly (exponent 1),
#: without bound. Steps of a fixed size in random directions (a noisy gradient under Adam)
#: grow it as a random walk, sqrt(t) (exponent 0.5), and gradient descent on separable data
#: logarithmically (exponent -> 0): every noisy run without decay shows the random walk, and
#: neither harms anything by itself. 0.75 lies midway between diffusion and drift.
DRIFT_EXPONENT = 0.75


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


def _norm_growth(values: np.ndarray, reference: float = 0.0) -> dict[str, float] | None:
    """Growth of a (positive) norm series of at least 20 records: ``start`` (median of the first
    window), ``initial`` (the larger of ``start`` and ``reference``), ``final`` (median of the
    last window), ``total`` = final / initial, ``late`` (growth over the last quarter, as a
    fraction) and ``rate`` (d ln(norm) per record over the second half)."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size < MIN_GROWTH_RECORDS:
        return None
    w = max(MIN_WINDOW, v.size // WINDOWS)
    start = float(np.median(v[:w]))
    first = max(start, reference)
    last = float(np.median(v[-w:]))
    q = int(LAST_QUARTER * v.size)
    at_q = float(np.median(v[max(0, q - w // 2): q + w // 2 + 1]))
    h = v.size // 2
    at_h = float(np.median(v[max(0, h - w // 2): h + w // 2 + 1]))
    rate = math.log(last / at_h) / max(1, (v.size - 1 - h)) if at_h > 0 and last > 0 else 0.0
    return {"start": start, "initial": first, "final": last, "total": last / first if first > 0 else math.inf,
            "late": last / at_q - 1.0 if at_q > 0 else 0.0, "rate": rate}


def _growth_exponent(steps: np.ndarray, values: np.ndarray, start: float) -> float:
    """p in (norm - start) ~ t**p over the last quarter of the steps (t counted from the first
    record), from window medians at the three-quarter point and at the end; 0 when the norm
    did not grow there."""
    w = max(MIN_WINDOW, values.size // WINDOWS)
    t = steps.astype(np.float64) - float(steps[0]) + 1.0
    q = int(np.searchsorted(t, LAST_QUARTER * t[-1]))
    lo = max(0, min(q, values.size - 1) - w // 2)
    g_q = float(np.median(values[lo: lo + w])) - start
    g_end = float(np.median(values[-w:])) - start
    t_q, t_end = float(np.median(t[lo: lo + w])), float(np.median(t[-w:]))
    if g_q <= 0 or g_end <= g_q or t_end <= t_q:
        return 0.0
    return math.log(g_end / g_q) / math.log(t_end / t_q)


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
      grew at least 20% at a drift's pace (``DRIFT_EXPONENT``: the growth above the start rising
      as t**0.75 or faster over the last quarter; a random walk's sqrt(t), which every noisy run
      without decay shows, is not a finding: a frozen backbone's linear head under Adam grew
      4.4x that way while its accuracy held at 0.96). Growth that buys loss (a head growing to the
      targets' scale) is not a finding.

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

    Confidence: 0.5 from the conditions above, more with a larger growth (whole at 10x) and
    when instability followed it.
    """

    code = "GP503"
    slug = "missing-weight-decay"
    severity = "warning"
    title = "Weights grow without bound and there is no weight decay"
    requires = ("weights", "optimizer")
    confidence = Confidence(0.5, Ramp(0.25, "growth", start=1.0, log=True), Flag(0.25, "instability followed"))
    causes = ("exploding-gradients",)
    evidence_fields = {
        "layer": Field("weight matrix"),
        "growth": Field("norm growth", "x"),
        "start_norm": Field("norm at the start", "norm"),
        "reference_norm": Field("reference norm", "norm"),
        "final_norm": Field("norm at the end", "norm"),
        "late_growth": Field("growth in the last quarter", "%"),
        "growth_rate_per_step": Field("growth per step (ln)"),
        "growth_onset_step": Field("growth onset", "step"),
        "weight_decay": Field("weight decay"),
        "instability_after": Field("instability after it"),
        "unproductive": Field("growth bought no loss"),
        "growth_exponent": Field("growth ~ t^p over the last quarter, p"),
    }
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
        if _weight_groups_without_decay(ctx) is not True or ctx.n < MIN_GROWTH_RECORDS:
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
            g = _norm_growth(values[fin], reference)
            if g is None or g["total"] < WEIGHT_GROWTH or g["late"] < LATE_GROWTH:
                continue
            if best is None or g["total"] > best[1]["total"]:
                best = (name, g, steps[fin], values[fin])
        if best is None:
            return []
        name, g, steps, values = best
        onset = int(steps[int(np.argmax(values > ONSET_GROWTH * g["start"]))])
        harm = {k: v for k, v in loss_harm(ctx).items() if v["step"] >= onset}
        curve = loss_curve(ctx)
        useless = False
        if curve.n >= MIN_GROWTH_RECORDS:
            mid = curve.values[curve.n // 2 - curve.window // 2: curve.n // 2 + curve.window // 2 + 1]
            gain_total = curve.start - curve.best
            gain_late = float(np.median(mid)) - curve.final if mid.size else 0.0
            half = values[len(values) // 2:]
            grew_late = half[-1] / half[0] - 1.0 if half.size and half[0] > 0 else 0.0
            useless = gain_total > 0 and gain_late < USELESS_GAIN * gain_total and grew_late >= USELESS_NORM_GROWTH
            if useless:
                g["exponent"] = _growth_exponent(steps, values, g["start"])
                useless = g["exponent"] >= DRIFT_EXPONENT
        if not harm and not useless:
            return []
        h0 = int(steps[len(steps) // 2])
        lr = median_lr(ctx, [s for s in ctx.step if s >= h0]) or ctx.lr0
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
        conf = self.confidence(g["total"], bool(harm))
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
        if "exponent" in g:
            ev["growth_exponent"] = g["exponent"]
        # the norms are measured after the optimizer step: the forward of the next step is the
        # first to run with the grown weights (and a gradient spike of the onset step itself,
        # computed before that update, cannot be this growth's doing)
        return [self.finding(confidence=conf, message=msg, first_step=onset + 1, layer=name, evidence=ev,
                             recommendations=recs)]
