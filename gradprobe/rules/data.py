"""GP601-GP603: the data and the initialisation (input-scale, degenerate-targets,
poor-initialization); the activations they produce (GP604, GP605) are in
:mod:`gradprobe.rules.activations`.

The mechanics these rules reason from. PyTorch's initialisers (and Xavier/Kaiming) are
designed for unit-scale inputs: with inputs of scale s, a Linear layer's pre-activations have
scale ~s, so the initialisation, the nonlinearity's useful range (tanh/sigmoid saturate past
|z| ~ 3) and the learning rate (an Adam step moves a weight by ~lr, which moves a
pre-activation by ~lr x s x fan_in) are all off by the factor s. A good initialisation keeps
the activation scale roughly constant from layer to layer (gain 5/3 for tanh, sqrt 2 for ReLU,
1 for linear); a gain g off by a factor f multiplies the scale by ~f per layer, so after L
layers the signal is f**L of its input: 0.001**4 = 1e-12 is gone. A tanh/sigmoid unit at its
bound passes less than 2% of its gradient (derivative < 0.02 past |tanh| = 0.99); a ReLU unit
that is negative for every input passes none and never recovers by itself.

All statistics come from the sampled deep probes (``gradprobe/probe/deep.py``): ``input`` and
``first_layer`` (float features where they enter the model and its first parametric layer;
token ids and embedding lookups are not features), ``target`` (the loss function's target and
prediction), ``activation`` (output statistics of parametric, saturating and ReLU-family
modules by call order, on grad-enabled forwards only) and ``gates`` (recurrent gates).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.analysis import (
    TARGET_TINY,
    RunContext,
    layer_forward_order,
    layer_grads,
    loss_curve,
    nonlinearity,
    normalised,
    sample_table,
    tiny_targets,
    trivial_loss,
)
from gradprobe.rules.base import (
    Confidence,
    Explanation,
    Field,
    Finding,
    Flag,
    Ramp,
    Recommendation,
    Rule,
    register,
)

#: GP601: features of scale above 10 (a decade above unit) with a largest magnitude above 10.
INPUT_LARGE = 10.0
#: GP601: features of scale below 0.01 (two decades below unit) with a largest magnitude below 0.1.
INPUT_SMALL = 1e-2
INPUT_SMALL_ABSMAX = 10 * INPUT_SMALL
#: GP602: a std this small relative to the targets' magnitude is a constant (float32 rounding).
TARGET_CONSTANT = 1e-6
#: GP602: a magnitude floor, so that a std of exactly 0 still compares as constant.
MAGNITUDE_FLOOR = 1e-30
#: GP602: constant targets over this many sampled batches are certain (fewer could be one
#: unlucky draw of identical labels).
CONSTANT_BATCHES = 3
#: GP602: MSE at or below 1e-4 of the target variance (R^2 >= 0.9999).
LEAKAGE_RATIO = 1e-4
#: GP602: a fit is memorisation, not leakage, when the validation loss over the last quarter of
#: the evaluations stayed at 1% of the target variance or above, or when this many sampled
#: batches or more all had the same input statistics.
MEMORISED_VAL_FLOOR = 1e-2
LATE_QUARTER = 4
SAME_INPUT_BATCHES = 3
#: GP602: a training loss exactly 0 on this fraction of its records (and at least this many)
#: is stuck there: a loss that only touches 0 now and then (an easy batch) is not.
ZERO_FRACTION = 0.10
ZERO_RECORDS = 5
#: GP602: hinge losses, max(0, margin - score): exactly 0 once every example of the batch clears
#: a finite margin (1 by default), their intended end state, with no certainty involved; the
#: soft-margin (logistic) forms are not among them.
HINGE_LOSSES = frozenset({"triplet_margin_loss", "triplet_margin_with_distance_loss", "margin_ranking_loss",
                          "hinge_embedding_loss", "multi_margin_loss", "multilabel_margin_loss",
                          "cosine_embedding_loss"})
#: GP603: two decades of activation scale lost (or gained) across the hidden layers at step 0.
INIT_DECADES = 2.0
#: GP603 without activation samples: three decades between the first and last weight gradients.
INIT_GRAD_DECADES = 3.0
#: GP603: from 6 decades the signal is below float32's relative resolution of the values it is
#: added to: an error.
INIT_ERROR_DECADES = 6
#: GP603: at least this many layers (or the input and one layer), with at least this share of
#: the transitions going the same way (a trend, not one odd layer).
MIN_INIT_LAYERS = 3
INIT_TREND = 2 / 3
#: GP603: the samples of the first steps up to this one show the initialisation.
INIT_STEPS = 3
#: GP603: features of this std are of unit scale (the scale initialisers are designed for);
#: other scales are GP601's.
UNIT_STD_MIN, UNIT_STD_MAX = 0.1, INPUT_LARGE
#: GP603: a zero scale on the log scale (-30 decades, below anything float32 holds).
LOG_FLOOR = 1e-30
#: GP603: how many layers' scales a message lists.
SHOWN_LAYERS = 8


INIT_SNIPPETS = {
    "relu": ("kaiming_normal_(m.weight, nonlinearity=\"relu\")", "sqrt(2)"),
    "tanh": ("xavier_uniform_(m.weight, gain=nn.init.calculate_gain(\"tanh\"))", "5/3"),
    "sigmoid": ("xavier_uniform_(m.weight, gain=1.0)", "1"),
    "linear": ("xavier_uniform_(m.weight, gain=1.0)", "1"),
}


def _init_snippet(nonlin: str, recurrent: bool = False) -> str:
    call, gain = INIT_SNIPPETS[nonlin]
    rec = (
        "    elif isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):\n"
        "        for name, p in m.named_parameters():\n"
        "            if \"weight_ih\" in name:\n"
        "                nn.init.xavier_uniform_(p)   # gain 1: the gates see unit-scale inputs\n"
        "            elif \"weight_hh\" in name:\n"
        "                nn.init.orthogonal_(p)       # gain 1: the state keeps its scale over time\n"
        "            elif \"bias\" in name:\n"
        "                nn.init.zeros_(p)\n"
    ) if recurrent else ""
    return (
        "import torch.nn as nn\n\n"
        "def init_weights(m):\n"
        "    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):\n"
        f"        nn.init.{call}  # gain {gain}: keeps the activation scale ~constant layer to layer\n"
        "        if m.bias is not None:\n"
        "            nn.init.zeros_(m.bias)\n"
        f"{rec}\n"
        "model.apply(init_weights)"
    )


# ------------------------------------------------------------------------------------------
@register
class InputScale(Rule):
    """Fires when the float features entering the first parametric layer (``first_layer``
    samples; the model's own input when there is none; token ids and embedding lookups are
    skipped) are far from unit scale, on the median of the sampled batches:

    * too large: the features' scale (RMS, sqrt(mean^2 + std^2)) or the largest per-feature
      std is above 10 and the largest magnitude is above 10. Initialisers assume unit-scale
      inputs: a decade more puts tanh/sigmoid pre-activations past their useful range (|z| ~ 3)
      and makes every Adam step on the first layer a decade larger than intended.
    * too small: the scale is below 0.01 and the largest magnitude below 0.1: the first layer
      starts two decades below its design scale, its pre-activations are dominated by the
      biases, and it must grow its weights 100x before the input matters.

    Standardised data with heavy tails (scale ~1, a few |x| > 10) is not a finding; raw
    pixels (0-255), physical units, timestamps and counts are.

    Confidence: 0.5 at the threshold, whole two decades past it (raw pixels, physical units).
    """

    code = "GP601"
    slug = "input-scale"
    severity = "warning"
    title = "Input features are far from unit scale"
    requires = ("inputs",)
    confidence = Confidence(0.5, Ramp(0.5, "decades past the threshold", span=2.0))
    evidence_fields = {
        "layer": Field("where they enter"),
        "where": Field("measured at"),
        "mean": Field("mean"),
        "std": Field("std"),
        "absmax": Field("largest magnitude"),
        "scale": Field("scale (RMS)"),
        "feature_std_max": Field("largest feature std"),
        "feature_std_min": Field("smallest feature std"),
        "samples": Field("sampled batches"),
        "problem": Field("problem"),
    }
    explanation = Explanation(
        what="Float features entering the first layers far from unit scale: raw pixels in 0-255, physical units, "
        "counts or timestamps (max |x| > 10 and scale > 10), or features squeezed below 0.01.",
        why="Initialisation and learning rates assume unit-scale inputs. Large inputs saturate tanh/sigmoid units and "
        "make the first layer's updates a decade too large; tiny inputs leave the first layer starting from nothing.",
        causes="Missing normalisation in the data pipeline; statistics computed but not applied; a feature in different "
        "units from the others (meters next to millimeters).",
        fix="Standardise each feature with the training set's mean and std (or scale images to [0, 1] and normalise "
        "per channel).",
        example="Features with mean 1.2e4 and std 3e3 entering nn.Linear: x = (x - 1.2e4) / 3e3.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        probe = "first_layer"
        w = sample_table(ctx, probe)
        if w.empty:
            w = sample_table(ctx, "input")
            probe = "input"
        if w.empty or "std" not in w:
            return []
        w = w[~w["target"].str.contains(r"\[", regex=True)]
        if "integer" in w:
            w = w[w["integer"].fillna(0) < 0.5]
        if w.empty:
            return []
        target = w["target"].mode().iloc[0]
        w = w[w["target"] == target]
        med = {k: float(w[k].median()) for k in ("mean", "std", "absmax", "feature_std_min", "feature_std_max") if k in w}
        mean, std, absmax = med.get("mean", 0.0), med.get("std", 0.0), med.get("absmax", 0.0)
        fmax = med.get("feature_std_max", std)
        scale = math.sqrt(mean * mean + std * std)
        big = max(scale, fmax if math.isfinite(fmax) else 0.0)
        first = int(w["step"].min())
        ev = {"layer": target, "where": probe, "mean": mean, "std": std, "absmax": absmax, "scale": scale,
              "feature_std_max": fmax, "feature_std_min": med.get("feature_std_min"), "samples": int(len(w))}
        if absmax > INPUT_LARGE and big > INPUT_LARGE:
            decades = math.log10(big / INPUT_LARGE)
            kind = "large"
            msg = (f"The features entering {target} have mean {mean:.3g}, std {std:.3g} (largest feature std "
                   f"{fmax:.3g}) and reach |x| = {absmax:.3g}: {big:.3g}x unit scale.")
        elif 0 < scale < INPUT_SMALL and absmax < INPUT_SMALL_ABSMAX:
            decades = math.log10(INPUT_SMALL / scale)
            kind = "small"
            msg = (f"The features entering {target} have mean {mean:.3g}, std {std:.3g} and never exceed "
                   f"|x| = {absmax:.3g}: {1 / scale:.3g}x below unit scale.")
        else:
            return []
        ev["problem"] = kind
        conf = self.confidence(decades)
        sd = std if std > 0 else 1.0
        snippet = (
            f"# gradprobe measured the features entering {target}: mean {mean:.3g}, std {std:.3g}, max |x| {absmax:.3g}\n"
            f"# standardise every feature with statistics of the training set (not of each batch):\n"
            f"feat_mean = X_train.mean(dim=0, keepdim=True)\n"
            f"feat_std = X_train.std(dim=0, keepdim=True).clamp_min(1e-8)\n"
            f"x = (x - feat_mean) / feat_std\n"
            f"# first approximation from the measured statistics: x = (x - {mean:.3g}) / {sd:.3g}"
        )
        recs = [Recommendation.code("Standardise the input features", snippet)]
        return [self.finding(confidence=conf, message=msg, first_step=first, layer=target, evidence=ev,
                             recommendations=recs)]


# ------------------------------------------------------------------------------------------
@register
class DegenerateTargets(Rule):
    """Fires on the loss functions' targets (``target`` samples), in three cases:

    * constant targets (error): in every sampled batch the targets' std is at most 1e-6 of
      their magnitude (float32 rounding of a constant) and their mean is the same across
      batches, for every loss function of the run: there is nothing to learn. Batches that are
      constant but differ from each other (an unshuffled, sorted dataset; a GAN's real/fake
      labels through one loss function) are not this, nor is a penalty term such as
      ``mse_loss(h, zeros)`` next to a loss with real targets.
    * tiny targets (warning): float regression targets whose RMS is at most 1e-3. The trivial
      predictor's MSE is then at most 1e-6, so every loss looks converged, and the model's
      outputs, initialised at unit scale, must shrink 1000x: one Adam step at its default lr
      of 1e-3 already moves a prediction by about the whole target range.
    * a loss near zero judged against the target variance (warning): under MSE (on the
      baseline's scale, see :class:`gradprobe.analysis.TrivialLoss`) the loss reached 1e-4 of
      the target variance or less (R^2 >= 0.9999) on a sampled step: noiseless targets or a
      target leaking into the inputs. Not when the fit is memorisation: a validation loss at
      1% of the variance or above, or the same input batch at every sampled step.
    * a training loss stuck at exactly 0 (warning; no target samples needed, so foreign logs
      too): after being non-zero, the loss reads exactly 0.0 on records that cover at least
      ``ZERO_FRACTION`` of the run (and ``ZERO_RECORDS`` of them). In float32 a cross-entropy
      (or a soft-margin loss) is exactly 0 only when every example is predicted with certainty (a
      logit margin above ~17 nats): the gradient is then exactly 0 too, and nothing is learned
      from there on. A task solved that completely has targets that carry nothing to learn
      (constant, templated, duplicated, or leaked into the inputs), unless the margin was
      blown up rather than earned: inputs far from unit scale (GP601) or weights grown by
      steps too large (GP501) scale every logit, and the margin past 17 nats, with them; the
      engine names those as the cause when they fired no later. A loss that is 0 from its
      first record is not judged: an untrained model cannot have a loss of 0, so that term is
      not being trained (a loss switched off, e.g. a GAN discriminator before it starts). Nor
      a run whose every loss function is a hinge (``HINGE_LOSSES``: triplet, ranking,
      multi-class SVM margins): max(0, margin - score) is exactly 0 whenever the batch clears
      a finite margin, which is what it trains for (a triplet embedding: 0 on 71 of every 100
      batches once it separates the classes), and the examples inside the margin still give
      a gradient.

    Confidence: constant targets are measured, certain over ``CONSTANT_BATCHES`` batches; tiny
    targets from 0.5 at 1e-3, whole three decades below; a loss near zero from 0.5 at 1e-4 of
    the variance, never above 0.8 (noiseless targets fit that well too, without a leak); a
    loss at exactly 0 from 0.6, whole when it covers half the run.
    """

    code = "GP602"
    slug = "degenerate-targets"
    severity = "warning"
    title = "Targets are constant, of a vanishing scale, or fit suspiciously well"
    severities = {
        "warning": "tiny targets, a loss near zero against the target variance, or a training loss stuck at "
                   "exactly 0",
        "error": "constant targets in every sampled batch, for every loss function: there is nothing to learn",
    }
    requires = ("targets|loss",)
    causes_on_evidence = ("input-scale", "lr-too-high")
    confidence = {
        "constant": Confidence(0.9, Flag(0.1, f"constant over {CONSTANT_BATCHES}+ sampled batches")),
        "tiny": Confidence(0.5, Ramp(0.5, "decades below 1e-3", span=3.0)),
        "near zero": Confidence(0.5, Ramp(0.1, "1e-4 / (MSE / target variance)", start=1.0, log=True, clip=False),
                                cap=0.8),
        "exactly zero": Confidence(0.6, Ramp(0.4, "fraction of the run at 0", span=0.5)),
    }
    evidence_fields = {
        "zero_records": Field("records at exactly 0"),
        "zero_fraction": Field("of the run", "%"),
        "zero_from_step": Field("exactly 0 from", "step"),
        "last_nonzero_loss": Field("last non-zero loss", "loss"),
        "loss_function": Field("loss function"),
        "value": Field("constant target"),
        "std": Field("target std"),
        "batches": Field("sampled batches"),
        "rms": Field("target RMS"),
        "mean": Field("target mean"),
        "absmax": Field("largest target magnitude"),
        "loss_initial": Field("first loss", "loss"),
        "loss_over_variance": Field("loss over target variance", "x"),
        "step": Field("at", "step"),
        "target_variance": Field("target variance"),
        "loss": Field("loss", "loss"),
    }
    explanation = Explanation(
        what="Targets with (near) zero variance, targets of a vanishing scale (RMS <= 1e-3) that make every loss look "
        "tiny, or an MSE near zero compared with the target variance (possible leakage).",
        why="Constant targets teach nothing; tiny targets hide a model that learned nothing behind a loss of 1e-8 and "
        "sit below the step size of the optimizer; a near-perfect fit usually means the answer is in the input.",
        causes="A label column filled with a default; targets in the wrong units (returns of 1e-7, volts in megavolts); "
        "the target (or a shifted copy of it) among the features.",
        fix="Standardise the targets (and un-standardise predictions); check the label pipeline; drop features that "
        "contain the target.",
        example="Targets with RMS 3e-7 under MSE: the loss is 1e-13 from step 0; y = (y - mean) / std.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        zero = self._exactly_zero(ctx)
        w = sample_table(ctx, "target")
        if w.empty or "std" not in w:
            return [zero] if zero else []
        out = self._from_targets(ctx, w)
        return out if out or zero is None else [zero]

    def _exactly_zero(self, ctx: RunContext) -> Finding | None:
        curve = loss_curve(ctx)
        v = curve.values
        if curve.n < ZERO_RECORDS or not (v != 0).any():
            return None  # no loss, or one that is 0 from its first record: not a term being trained
        fns = set(ctx.meta.get("loss_functions") or [])
        if fns and fns <= HINGE_LOSSES:
            return None  # a hinge is exactly 0 whenever the batch clears its margin: its aim
        nz = np.flatnonzero(v != 0)
        if v[0] == 0:
            return None
        zero = v == 0
        if int(zero.sum()) < ZERO_RECORDS:
            return None
        span = int(curve.steps[-1]) - int(curve.steps[0]) + 1
        first = int(curve.steps[np.flatnonzero(zero)[0]])
        covered = float(zero.sum()) / curve.n
        if covered < ZERO_FRACTION or span < 2:
            return None
        ev = {"zero_records": int(zero.sum()), "zero_fraction": covered, "zero_from_step": first,
              "last_nonzero_loss": float(v[nz[-1]]), "loss_initial": float(v[0])}
        msg = (f"The training loss was exactly 0 on {int(zero.sum())} of {curve.n} records ({covered:.0%} of the run), "
               f"from step {first} on (it started at {v[0]:.4g}): every example is predicted with certainty, the "
               "gradient is exactly 0, and nothing is learned from there. A task solved that completely has targets "
               "that carry nothing to learn (constant, templated or duplicated examples, or the label leaking into "
               "the inputs), unless the logits were blown up rather than trained: inputs far from unit scale, or "
               "weights grown by too large steps, reach the same certainty.")
        return self.finding(confidence=self.confidence["exactly zero"](covered), message=msg, first_step=first,
                            evidence=ev, may_follow=("input-scale", "lr-too-high"),
                            title="The training loss is exactly zero",
                            recommendations=[Recommendation.code(
                                "Check what makes the task trivial",
                                "labels = torch.cat([y for _, y in train_loader])\n"
                                "print(labels.unique(return_counts=True))        # one class, or nearly?\n"
                                "X = torch.cat([x.flatten(1) for x, _ in train_loader])\n"
                                "print(len(X), len(torch.unique(X, dim=0)))      # duplicated examples?")])

    def _from_targets(self, ctx: RunContext, w: Any) -> list[Finding]:
        out: list[Finding] = []
        constants: list[Finding] = []
        n_functions = 0
        for name, g in w.groupby("target", sort=False):
            n_functions += 1
            g = g.dropna(subset=["std"])
            if g.empty:
                continue
            mean = g["mean"].to_numpy(dtype=np.float64)
            std = g["std"].to_numpy(dtype=np.float64)
            absmax = g["absmax"].to_numpy(dtype=np.float64) if "absmax" in g else np.abs(mean)
            mag = np.maximum(np.abs(mean), absmax)
            first = int(g["step"].min())
            integer = bool((g.get("integer", pd.Series([0.0])).fillna(0) > 0.5).all())
            constant = bool(np.all(std <= TARGET_CONSTANT * np.maximum(mag, MAGNITUDE_FLOOR)))
            same = bool(np.ptp(mean) <= TARGET_CONSTANT * max(float(np.max(mag)), MAGNITUDE_FLOOR)) if mean.size else False
            if constant and same:
                val = float(np.median(mean))
                ev = {"loss_function": name, "value": val, "std": float(np.max(std)), "batches": int(len(g))}
                constants.append(self.finding(
                    confidence=self.confidence["constant"](len(g) >= CONSTANT_BATCHES), severity="error",
                    first_step=first, evidence=ev,
                    message=f"The targets of {name} are the constant {val:.6g} in every sampled batch ({len(g)}): "
                    f"there is nothing to learn.",
                    recommendations=[Recommendation.code(
                        "Check the label pipeline", "y = torch.cat([y for _, y in loader])\n"
                        "print(y.unique(return_counts=True))   # one value: the labels were lost upstream")]))
                continue
            if integer or name.startswith("binary_cross_entropy") or name in ("cross_entropy", "nll_loss"):
                continue
            tiny = tiny_targets(ctx).get(str(name))
            if tiny is not None:
                rms, amax, m, s = tiny["rms"], tiny["absmax"], tiny["mean"], tiny["std"]
                decades = math.log10(TARGET_TINY / rms)
                ev = {"loss_function": name, "rms": rms, "mean": m, "std": s, "absmax": amax, "batches": int(len(g))}
                lf = ctx.col("loss_fn")
                lf = lf[np.isfinite(lf)]
                if lf.size:
                    ev["loss_initial"] = float(lf[0])
                snippet = (f"# gradprobe measured targets of mean {m:.3g} and std {s:.3g}\n"
                           f"y_mean, y_std = y_train.mean(), y_train.std()\n"
                           f"y_scaled = (y - y_mean) / y_std          # train on unit-scale targets\n"
                           f"prediction = model(x) * y_std + y_mean   # and map predictions back")
                out.append(self.finding(
                    confidence=self.confidence["tiny"](decades), first_step=first, evidence=ev,
                    message=f"The targets of {name} have RMS {rms:.3g} (max |y| {amax:.3g}): the loss of a model that "
                    f"predicts 0 is already {rms * rms:.3g}, so every loss looks converged, and one optimizer step "
                    f"moves a prediction by about the whole target range.",
                    recommendations=[Recommendation.code("Standardise the targets", snippet)]))
                continue
            if name == "mse_loss":
                tl = trivial_loss(ctx)
                if tl.consistent and not tl.table.empty and tl.kinds == ["mean"]:
                    r = tl.table["ratio"].dropna()
                    r = r[r > 0]
                    low = r[r <= LEAKAGE_RATIO]
                    if len(low) and not self._memorised(ctx, float(tl.table["baseline"].median())):
                        step0 = int(low.index[0])
                        best = float(r.min())
                        ev = {"loss_function": name, "loss_over_variance": best, "step": step0,
                              "target_variance": float(tl.table.loc[step0, "baseline"]),
                              "loss": float(tl.table.loc[step0, "loss_fn"])}
                        conf = self.confidence["near zero"](LEAKAGE_RATIO / max(best, 1e-300))
                        out.append(self.finding(
                            confidence=conf, first_step=step0, evidence=ev,
                            message=f"At step {step0} the MSE was {best:.2g} of the target variance (R^2 = "
                            f"{1 - best:.6f}): the targets are noiseless or leak into the inputs.",
                            recommendations=[Recommendation.code(
                                "Look for a feature that contains the target",
                                "X, y = next(iter(loader))\n"
                                "corr = [torch.corrcoef(torch.stack([X[:, j], y.flatten()]))[0, 1] for j in range(X.shape[1])]\n"
                                "print(sorted(enumerate(corr), key=lambda t: -abs(t[1]))[:5])  # |r| ~ 1: leakage")]))
        if constants and len(constants) == n_functions:
            out = constants + out
        return out

    @staticmethod
    def _memorised(ctx: RunContext, variance: float) -> bool:
        """A near-perfect training fit that is memorisation, not leakage: the validation loss
        stayed at 1% of the target variance or above (the fit does not carry over to new data,
        whereas a leaked target does), or every sampled batch had the same input statistics (the
        same few examples every step, which a large enough model can always fit exactly)."""
        ev = ctx.eval_loss
        if len(ev) >= 2 and variance > 0 and \
                float(ev.iloc[-max(1, len(ev) // LATE_QUARTER):].median()) >= MEMORISED_VAL_FLOOR * variance:
            return True
        for probe in ("first_layer", "input"):
            w = sample_table(ctx, probe)
            if w.empty or "mean" not in w or "std" not in w:
                continue
            w = w[~w["target"].str.contains(r"\[", regex=True)]
            if len(w) >= SAME_INPUT_BATCHES:
                return bool(w["mean"].nunique() == 1 and w["std"].nunique() == 1)
        return False


# ------------------------------------------------------------------------------------------
@register
class PoorInitialization(Rule):
    """Fires when the activation scale collapses or explodes layer over layer at the first
    sampled step (step 0: the initialisation): the output std of the parametric layers (Linear,
    Conv, recurrent, attention: modules that own parameters) taken in call order, without the
    output head (whose scale is often set small on purpose), preceded by the std of the
    features entering the first layer when those are of unit scale (0.1 to 10; other scales
    are GP601's), falls or grows by at least 2 decades (100x) from the first to the last, with
    at least 2/3 of the transitions going the same way (a trend, not one odd layer). At least
    3 layers, or the input and one layer (a first layer that alone shrinks unit-scale features
    100x, e.g. a recurrent layer initialised with gain 0.001, erases the input as surely). A good
    initialisation keeps the scale within a factor ~2 over any depth; 100x means the deep
    layers see the input through a signal 100 times weaker (or stronger) than the biases and
    nonlinearities were set up for. Networks with normalisation layers (a BatchNorm,
    LayerNorm, GroupNorm, InstanceNorm or RMSNorm module) reset the scale at each of them, so
    no gain compounds through their depth: their activation form is not judged (the sampled
    activations are of the parametric layers only, so a norm layer's reset, e.g. of raw
    inputs of scale 1e3 to unit scale, would read as a collapse).

    Without activation samples (light profile), the per-element RMS of the weight gradients at
    the first step, in forward order, with a 3-decade spread and the same 2/3 trend rule
    (gradient sizes legitimately differ by fan-in, hence the extra decade).

    Recommends an initialisation for the nonlinearity the network uses (Kaiming for ReLU, Xavier
    with gain 5/3 for tanh, 1 for sigmoid/linear): gains that keep the scale constant. Never a
    tiny gain: a gain of 0.001 is exactly what starves a network.

    A first layer whose output is exactly constant (std 0 over batch and units) while its input
    varies is the limit case: a zero (or constant) initialisation erased the input, and every
    unit after it gets the same gradient (error, confidence 1).

    Severity: warning; error from 6 decades (the signal is below float32's relative resolution
    of the values it is added to). Confidence: 0.5 at the threshold, whole 4 decades past it
    (for activations that is the error threshold's 6 decades).
    """

    code = "GP603"
    slug = "poor-initialization"
    severity = "warning"
    title = "Initial activations collapse or explode layer over layer"
    severities = {
        "warning": "the scale shrinks or grows by 2 to 6 decades layer over layer at initialisation",
        "error": "6 decades or more (below float32's relative resolution), or a first layer whose output is constant",
    }
    requires = ("activations|layer_grad",)
    confidence = {
        "activations": Confidence(0.5, Ramp(0.5, "decades", start=INIT_DECADES, span=4.0)),
        "weight gradients": Confidence(0.5, Ramp(0.5, "decades", start=INIT_GRAD_DECADES, span=4.0)),
        "constant first layer": Confidence(1.0),
    }
    evidence_fields = {
        "source": Field("measured on"),
        "step": Field("at", "step"),
        "layers": Field("layers"),
        "scales": Field("scales"),
        "decades": Field("change from first to last", "decades"),
        "per_layer_factor": Field("per layer", "x"),
        "trend": Field("transitions going the same way", "%"),
        "nonlinearity": Field("nonlinearity"),
        "zero_output": Field("constant output"),
    }
    explanation = Explanation(
        what="At initialisation the activation scale shrinks or grows by orders of magnitude from the first layer to "
        "the last (or the weight gradients do).",
        why="A collapsed signal carries nothing of the input to the output and its gradients vanish with it; an "
        "exploding one saturates units and makes the first steps huge.",
        causes="Init gains far from the nonlinearity's (xavier gain 0.001 or 0.01 'for stability'); normal(0, 1) "
        "weights in wide layers; PyTorch's default init in a deep ReLU stack without normalisation.",
        fix="Initialise with the gain the nonlinearity needs (Kaiming for ReLU, Xavier gain 5/3 for tanh), or add "
        "normalisation layers. Never shrink gains below 1 to 'stabilise' a network.",
        example="A 6-layer tanh MLP with xavier gain 0.001: activation std 0.6, 6e-4, 6e-7, ...: use gain 5/3.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        res = self._activations(ctx)
        source = "activations"
        if res is None and ctx.samples("activation").empty:
            res = self._gradients(ctx)
            source = "gradients"
        if res is None:
            return []
        names, scales, step = res
        nonlin = nonlinearity(ctx)
        if source == "activations":
            if scales[0] == 0.0 and self._input_varies(ctx, step):
                return [self._zeroed(names, scales, step, nonlin, bool(ctx.recurrent))]
            if normalised(ctx):
                return []  # every norm layer resets the scale: an init gain cannot compound
            names, scales = names[:-1], scales[:-1]  # without the output head: often small on purpose
            inp = self._unit_input_std(ctx, step)
            if inp is not None and names:
                names, scales = ["input", *names], [inp, *scales]  # the first layer's own gain counts too
            if len(names) < MIN_INIT_LAYERS and not (inp is not None and len(names) == 2):
                return []
        logs = np.log10(np.maximum(np.asarray(scales, dtype=np.float64), LOG_FLOOR))
        total = float(logs[-1] - logs[0])
        need = INIT_DECADES if source == "activations" else INIT_GRAD_DECADES
        if abs(total) < need:
            return []
        d = np.diff(logs)
        trend = float(np.mean(np.sign(d) == np.sign(total)))
        if trend < INIT_TREND:
            return []
        per_layer = 10 ** (total / (len(logs) - 1))
        decades = abs(total)
        kind = "collapse" if total < 0 else "explode"
        conf = self.confidence["activations" if source == "activations" else "weight gradients"](decades)
        sev = "error" if decades >= INIT_ERROR_DECADES else "warning"
        what = "activation std" if source == "activations" else "weight-gradient RMS"
        seq = ", ".join(f"{n}: {s:.2g}" for n, s in list(zip(names, scales))[:SHOWN_LAYERS])
        msg = (f"At step {step} the {what} {'shrinks' if total < 0 else 'grows'} by {decades:.1f} decades from {names[0]} "
               f"to {names[-1]} ({per_layer:.2g}x per layer: {seq}{', ...' if len(names) > SHOWN_LAYERS else ''}).")
        ev = {"source": source, "step": step, "layers": names, "scales": [float(s) for s in scales],
              "decades": total, "per_layer_factor": per_layer, "trend": trend, "nonlinearity": nonlin}
        _, gain = INIT_SNIPPETS[nonlin]
        recs = [Recommendation.code(
            f"Initialise for {nonlin} (gain {gain}) so the scale stays constant layer to layer",
            _init_snippet(nonlin, bool(ctx.recurrent)),
            reason=f"each layer currently multiplies the scale by {per_layer:.2g}; the gain must change by about "
            f"{1 / per_layer:.2g}x, to the standard gain for {nonlin}")]
        return [self.finding(confidence=conf, message=msg, first_step=step, layer=names[-1], evidence=ev,
                             recommendations=recs, severity=sev, title=f"Initial activations {kind} layer over layer")]

    def _zeroed(self, names: list[str], scales: list[float], step: int, nonlin: str, recurrent: bool) -> Finding:
        ev = {"source": "activations", "step": step, "layers": names, "scales": [float(x) for x in scales],
              "zero_output": names[0], "nonlinearity": nonlin}
        _, gain = INIT_SNIPPETS[nonlin]
        msg = (f"At step {step} the output of {names[0]}, the first layer, is exactly constant over the batch and its "
               f"units while its input varies: a zero (or constant) initialisation erases the input there, and every "
               f"unit after it receives the same (zero) gradient.")
        recs = [Recommendation.code(f"Initialise for {nonlin} (gain {gain}) instead of zeros", _init_snippet(nonlin, recurrent))]
        return self.finding(confidence=self.confidence["constant first layer"](), message=msg, first_step=step,
                            layer=names[0], evidence=ev,
                            recommendations=recs, severity="error", title="Initial activations collapse to zero")

    @staticmethod
    def _unit_input_std(ctx: RunContext, step: int) -> float | None:
        """The std of the float features entering the first parametric layer at ``step`` when
        they are of unit scale (0.1 to 10: the scale initialisers are designed for; other
        scales are GP601's), else None."""
        w = sample_table(ctx, "first_layer")
        if w.empty or "std" not in w:
            return None
        w = w[(w["step"] == step) & ~w["target"].str.contains(r"\[", regex=True)]
        if "integer" in w:
            w = w[w["integer"].fillna(0) < 0.5]
        if not len(w):
            return None
        sd = float(w["std"].iloc[0])
        return sd if UNIT_STD_MIN <= sd <= UNIT_STD_MAX else None

    @staticmethod
    def _input_varies(ctx: RunContext, step: int) -> bool:
        for probe in ("first_layer", "input"):
            w = sample_table(ctx, probe)
            if w.empty or "std" not in w:
                continue
            w = w[(w["step"] == step) & ~w["target"].str.contains(r"\[", regex=True)]
            if len(w):
                return bool((w["std"] > 0).any())
        return False

    @staticmethod
    def _activations(ctx: RunContext) -> tuple[list[str], list[float], int] | None:
        act = sample_table(ctx, "activation")
        if act.empty or "std" not in act:
            return None
        step = int(act["step"].min())
        if step > INIT_STEPS:
            return None
        modules = {str(info.get("module")) for info in ctx.layer_info.values() if info.get("module") is not None}
        a = act[(act["step"] == step) & act["target"].isin(modules) & (act["call"] == 0)].sort_values("index")
        if "nonfinite" in a:
            a = a[a["nonfinite"].fillna(0) == 0]
        names = a["target"].tolist()
        scales = a["std"].to_numpy(dtype=np.float64).tolist()
        if len(names) < 2:
            return None
        return names, scales, step

    @staticmethod
    def _gradients(ctx: RunContext) -> tuple[list[str], list[float], int] | None:
        lg = layer_grads(ctx)
        if lg.empty:
            return None
        row = lg.iloc[0]
        step = int(lg.index[0])
        order = layer_forward_order(ctx)
        names, scales = [], []
        for name in sorted(lg.columns, key=lambda n: order.get(n, math.inf)):
            shape = ctx.layer_info.get(str(name), {}).get("shape") or []
            g = float(row[name])
            if len(shape) < 2 or not math.isfinite(g):
                continue
            numel = float(np.prod(shape))
            names.append(str(name))
            scales.append(g / math.sqrt(numel))
        if len(names) < MIN_INIT_LAYERS:
            return None
        return names, scales, step
