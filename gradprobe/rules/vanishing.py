"""GP203: gradients too small to train (vanishing-gradients).

It reads the per-layer gradient and weight norms in forward order, the total gradient norm,
the learning rate, the optimizer family and its ``eps``, and the loss's progress
(:mod:`gradprobe.analysis`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from gradprobe.analysis import (
    MISSING,
    RunContext,
    layer_forward_order,
    layer_grads_by_row,
    loss_curve,
    optimizer_eps,
    optimizer_family,
    rank_correlation,
    total_numel,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register

#: float32 machine epsilon: a relative change of a weight below it is rounded away.
FLOAT32_EPS = 1.1920929e-07
#: The negligible form: on at least this fraction of at least ``MIN_STEPS`` steps, with the loss
#: judged on at least ``MIN_LOSS_RECORDS`` records and its final level above this fraction of
#: its start (below it the run converged, where gradients vanish by design).
NEGLIGIBLE_FRACTION = 0.8
MIN_STEPS = 5
MIN_LOSS_RECORDS = 6
CONVERGED_FRACTION = 1e-3
#: The depth form: at least this many weight layers, ``VANISH_DECADES`` between the median log
#: ratio of the last quarter (``DEPTH_QUARTER``) of them and the first, decaying with depth
#: (rank correlation at least ``DEPTH_CORRELATION``), on at least ``MIN_DEPTH_ROWS`` steps
#: where every layer was measured.
MIN_DEPTH_LAYERS = 4
DEPTH_QUARTER = 4
VANISH_DECADES = 3
DEPTH_CORRELATION = 0.7
MIN_DEPTH_ROWS = 3
#: A zero relative gradient on the log scale (-30 decades, below any float32 ratio).
LOG_FLOOR = 1e-30

_EMBEDDING_NAME = re.compile(r"emb|wte\b|wpe\b|(^|\.)tok", re.I)


def _embedding_layers(ctx: RunContext, names: list[str], order: dict[str, float]) -> set[str]:
    """Embedding tables: named like one, or the first layer of a model fed integer ids (the
    recorder then samples no ``first_layer`` inputs: an embedding took the ids)."""
    out = {n for n in names if _EMBEDDING_NAME.search(n)}
    inputs = ctx.samples("input", "integer")
    if not inputs.empty and (inputs["value"] > 0).any() and ctx.samples("first_layer").empty and names:
        first = min(names, key=lambda n: order.get(n, math.inf))
        module = ctx.layer_info.get(first, {}).get("module")
        out |= {n for n in names if ctx.layer_info.get(n, {}).get("module") == module}
    return out


@register
class VanishingGradients(Rule):
    """Early layers get gradients orders of magnitude below later layers, or every gradient is
    negligible.

    Depth form (``warning``): weight matrices and kernels only (>= 2 dims; biases and norm
    gains have their own scales), embedding tables excluded (their gradient is sparse by
    construction: parameters named like ``emb``/``wte``/``wpe``/``tok``, and the first layer
    of a model fed integer ids, which the recorder marks by sampling no ``first_layer``
    input), in forward order (module call order from the sampled activations, else
    registration order), at least 4 of them. Per layer, the median over steps of the relative
    gradient ||g|| / ||w||, the per-step relative update an SGD step makes per unit of lr. The
    median of log10 over the last quarter of the layers minus that of the first quarter must
    be >= 3 decades ("orders of magnitude": at 1000x, the early layers learn 1000x slower
    than the late ones under SGD) and the decay must be consistent with depth (Spearman rank
    correlation of position and log ratio >= 0.7), not one odd layer. Under an Adam-like
    optimizer, which normalises per parameter, the depth form is ``info`` unless the early
    layers' per-element gradient RMS is below the optimizer's eps (the update is then
    suppressed as well). A layer whose gradient is exactly zero on half of the steps or more
    takes no part: an exactly zero gradient is not a small one but no gradient path at all (a
    zero input, a dead or saturated path, an unused layer: GP605/GP604/GP505), and its ratio
    has no scale to decay from.

    Negligible form (``error``): on >= 80% of the steps the total gradient is exactly zero,
    or too small to change the weights: SGD-like, lr * ||g|| / ||w|| < float32 epsilon
    (1.19e-7: the update is rounded away); Adam-like, per-element RMS ||g|| / sqrt(N) < eps
    (eps dominates the denominator). And the loss is not moving (``LossCurve.fell`` false: no
    fall by 10% and by 3 standard errors of a window median)
    and not converged (its final level is above 1e-3 of its start): at convergence gradients
    vanish by design. Under SGD the criterion involves the learning rate, so a tiny lr (GP502)
    makes it true with ordinary gradients: when GP502 finds the lr too low, the negligible
    form names lr-too-low as its cause (the depth form never does: a ratio that decays
    through depth is the gradient's, and GP502's small steps are then its symptom).

    Causes (linked by the engine when present and not later): a poor initialisation,
    saturated or dead units, float16 without a scaler, unnormalised inputs, and an exploding
    step that threw the weights into saturation.

    Confidence: depth form: how far the ratio is past 1e3 on a log scale (0.5 at 3 decades,
    whole at 6), times how consistent the decay is with depth (whole from a rank correlation of
    0.9). Negligible form: the fraction of negligible steps.
    """

    code = "GP203"
    slug = "vanishing-gradients"
    severity = "warning"
    severities = {
        "warning": "the early layers' gradients are 1000x below the late ones' and the optimizer does not rescale "
                   "them (SGD-like, or Adam-like with the gradient below eps)",
        "info": "the depth decay under an Adam-like optimizer, which rescales per parameter",
        "error": "every gradient is negligible (zero, or too small to change the weights) and the loss is not moving",
    }
    #: under SGD the negligible form's criterion is lr x gradient: a too-low lr makes it true
    causes_on_evidence = ("lr-too-low",)
    evidence_fields = {
        "negligible_fraction": Field("steps with negligible gradients", "%"),
        "median_grad_norm": Field("median gradient norm", "norm"),
        "criterion": Field("negligible means"),
        "optimizer": Field("optimizer"),
        "median_grad_rms": Field("median per-element gradient RMS"),
        "loss_first": Field("loss at the start", "loss"),
        "loss_last": Field("loss at the end", "loss"),
        "decades": Field("early vs late layers", "decades"),
        "measure": Field("measured as"),
        "rank_correlation": Field("decay with depth (rank correlation)"),
        "early_layers": Field("early layers"),
        "late_layers": Field("late layers"),
        "layer_median_ratio": Field("median relative gradient per layer"),
        "early_grad_rms": Field("early layers' per-element gradient RMS"),
    }
    title = "Vanishing gradients"
    requires = ("grad_norm",)
    confidence = {
        "depth": (Confidence(0.5, Ramp(0.5, "late / early ratio", start=10**VANISH_DECADES, span=3.0, log=True))
                  * Confidence(0, Ramp(1.0, "rank correlation", span=0.9))),
        "negligible": Confidence(0, Ramp(1.0, "fraction of negligible steps")),
    }
    causes = ("poor-initialization", "saturated-activations", "dead-units", "amp-without-scaler", "input-scale",
              "exploding-gradients")
    computes: dict[str, str] = {}
    explanation = Explanation(
        what=(
            "Early layers receive gradients orders of magnitude below later layers, or all gradients "
            "are negligible."
        ),
        why=(
            "A layer whose gradient is 1000x smaller than the others' barely trains under SGD: the "
            "network behaves as if its first layers were frozen at their random initialisation. When "
            "every gradient is negligible (or zero), the run does not learn at all."
        ),
        causes=(
            "Deep stacks of sigmoid/tanh layers (their derivatives are <= 1/4 and <= 1, multiplied "
            "layer after layer); tiny initialisation gains; saturated or dead activations; float16 "
            "gradients underflowing without a GradScaler; a detached or constant output."
        ),
        fix=(
            "Use ReLU-family activations with He/Kaiming initialisation, normalisation layers or "
            "residual connections; an adaptive optimizer; check for dead units and AMP without a "
            "scaler when every gradient is zero."
        ),
        example="12-layer sigmoid MLP: layer 0 gets ||g||/||w|| ~ 1e-10 while the last layer gets ~1.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        out = self._negligible(ctx)
        if out:
            return out
        return self._depth(ctx)

    def _negligible(self, ctx: RunContext) -> list[Finding]:
        g = ctx.grad_norm
        rows = np.flatnonzero(np.isfinite(g) & ~ctx.skipped)
        if rows.size < MIN_STEPS:
            return []
        fam = optimizer_family(ctx)
        gg = g[rows]
        negl = gg == 0
        criterion = "exactly zero"
        numel = total_numel(ctx)
        if fam == "sgd":
            w = ctx.col("weight_norm")[rows]
            lr = ctx.lr[rows]
            with np.errstate(all="ignore"):
                rel = lr * gg / w
            negl |= np.nan_to_num(rel, nan=np.inf) < FLOAT32_EPS
            criterion = f"lr * ||g|| / ||w|| below float32 epsilon ({FLOAT32_EPS:.3g})"
        elif fam == "adaptive" and numel > 0:
            eps = optimizer_eps(ctx)
            negl |= gg / math.sqrt(numel) < eps
            criterion = f"per-element gradient RMS below {ctx.optimizer_class}'s eps ({eps:.2g})"
        frac = float(negl.mean())
        if frac < NEGLIGIBLE_FRACTION:
            return []
        curve = loss_curve(ctx)
        if curve.n >= MIN_LOSS_RECORDS:
            if curve.fell:
                return []
            if curve.start > 0 and curve.final <= CONVERGED_FRACTION * curve.start:
                return []
        first = ctx.step_at(int(rows[np.flatnonzero(negl)[0]]))
        evidence: dict[str, Any] = {"negligible_fraction": frac, "median_grad_norm": float(np.median(gg)),
                                    "criterion": criterion, "optimizer": ctx.optimizer_class}
        if numel:
            evidence["median_grad_rms"] = float(np.median(gg)) / math.sqrt(numel)
        if curve.n:
            evidence.update(loss_first=curve.start, loss_last=curve.final)
        message = (
            f"On {100 * frac:.0f}% of the steps the gradient is negligible ({criterion}; median total norm "
            f"{evidence['median_grad_norm']:.3g}) and the loss is not moving: the run is not learning."
        )
        # under SGD the criterion involves the lr: a too-low lr makes ordinary gradients negligible
        follow = ["lr-too-low"] if fam == "sgd" else []
        return [self.finding(confidence=self.confidence["negligible"](frac), message=message, first_step=first,
                             evidence=evidence, severity="error", title="All gradients negligible", may_follow=follow)]

    def _depth(self, ctx: RunContext) -> list[Finding]:
        lg = layer_grads_by_row(ctx)
        if lg.empty:
            return []
        lw = ctx.log.layer_weight
        info = ctx.layer_info
        names = [n for n in lg.columns if len(info.get(n, {}).get("shape") or []) >= 2]
        order = layer_forward_order(ctx)
        emb = _embedding_layers(ctx, names, order)
        names = [n for n in names if n not in emb]
        if len(names) < MIN_DEPTH_LAYERS:
            return []
        present = lg[names]
        zero_frac = (present == 0).sum(axis=0) / present.notna().sum(axis=0).clip(lower=1)
        names = [n for n in names if float(zero_frac.get(n, 0.0)) < 0.5]  # no gradient path: not vanishing
        if len(names) < MIN_DEPTH_LAYERS:
            return []
        names.sort(key=lambda n: order.get(n, math.inf))
        g = lg[names].to_numpy(dtype=np.float64)
        if not lw.empty and all(n in lw.columns for n in names):
            w = lw.reindex(ctx.step)[names].to_numpy(dtype=np.float64)
            w = np.where(w == MISSING, np.nan, w)
            with np.errstate(all="ignore"):
                rel = g / w
            measure = "||g|| / ||w||"
        else:
            rel = g
            measure = "||g||"
        rel = np.where(np.isfinite(rel), rel, np.nan)
        with np.errstate(all="ignore"):
            logr = np.log10(np.maximum(rel, LOG_FLOOR))
        ok_rows = np.isfinite(logr).all(axis=1)
        if ok_rows.sum() < MIN_DEPTH_ROWS:
            return []
        per_layer = np.median(logr[ok_rows], axis=0)
        L = len(names)
        q = max(1, L // DEPTH_QUARTER)
        early, late = float(np.median(per_layer[:q])), float(np.median(per_layer[-q:]))
        decades = late - early
        if decades < VANISH_DECADES:
            return []
        rho = rank_correlation(np.arange(L, dtype=np.float64), per_layer)
        if rho < DEPTH_CORRELATION:
            return []
        per_row = np.median(logr[:, -q:], axis=1) - np.median(logr[:, :q], axis=1)
        hit = np.flatnonzero(np.nan_to_num(per_row, nan=-np.inf) >= VANISH_DECADES)
        first = ctx.step_at(int(hit[0])) if hit.size else None
        starved = names[int(np.argmin(per_layer[:q]))]
        severity = "warning"
        fam = optimizer_family(ctx)
        pairs = list(zip(names, per_layer))
        evidence: dict[str, Any] = {
            "decades": decades,
            "measure": measure,
            "rank_correlation": rho,
            "early_layers": names[:q],
            "late_layers": names[-q:],
            "layer_median_ratio": {n: float(10**v) for n, v in pairs[:q] + pairs[-q:]},
        }
        if fam == "adaptive":
            eps = optimizer_eps(ctx)
            rms = []
            for n in names[:q]:
                numel = int(info.get(n, {}).get("numel") or 0)
                col = lg[n].to_numpy(dtype=np.float64)
                col = col[np.isfinite(col)]
                if numel and col.size:
                    rms.append(float(np.median(col)) / math.sqrt(numel))
            evidence["early_grad_rms"] = min(rms) if rms else None
            if not rms or min(rms) >= eps:
                severity = "info"
        conf = self.confidence["depth"](10 ** decades, rho)
        message = (
            f"Gradients vanish with depth: the first layers ({', '.join(names[:q][:3])}) get a relative gradient "
            f"{measure} about {10 ** decades:.2g}x smaller than the last ones ({', '.join(names[-q:][:3])}), "
            f"decaying steadily through the {L} weight layers (rank correlation {rho:.2f}). "
            + ("Under SGD the first layers barely train." if severity == "warning" else
               f"{ctx.optimizer_class} rescales per parameter, so the early layers still move; this is for "
               "information.")
        )
        recs = [Recommendation.code(
            "Keep the gradient scale through depth",
            "nn.ReLU() / nn.GELU() instead of nn.Sigmoid() / nn.Tanh() between layers\n"
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity='relu')\n"
            "# or add normalisation (nn.LayerNorm / nn.BatchNorm1d) and residual connections")]
        return [self.finding(confidence=conf, message=message, first_step=first, layer=starved,
                             evidence=evidence, recommendations=recs if severity != "info" else [],
                             severity=severity)]
