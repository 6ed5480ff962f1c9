"""GP4xx: non-finite values, ordered inputs -> loss -> gradients -> parameters.

Within one step the order is fixed: the batch enters, the forward computes the loss, the
backward fills the gradients, the optimizer updates the parameters. A NaN/Inf that appears
at one stage propagates to every later stage of the same step and, through the parameters,
to every later step. So the earliest stage at the earliest step is the root: each rule finds
the first step and the first place of its stage, and names an earlier stage as its cause in
``caused_by`` (links within one step follow the stage order; a cause in a later stage must
come at a strictly earlier step, e.g. parameters that went NaN at step s make the loss of
step s+1 NaN). The shared timeline is :class:`gradprobe.analysis.NonfiniteTimeline`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    RunContext,
    exploding_through_time,
    first_index,
    layer_forward_order,
    layer_grads,
    nonfinite_timeline,
    risen_before,
    too_early_to_rise,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Flag, Ramp, Recommendation, Rule, register

STAGE_ORDER = {"input": 0, "first_layer": 1, "target": 2}
#: a probe of no known stage sorts after every stage of the same step
UNKNOWN_STAGE = max(STAGE_ORDER.values()) + 1

GUARD_SNIPPET = """\
# while debugging: raise at the autograd op that produced the first NaN/Inf
torch.autograd.set_detect_anomaly(True)
...
loss = loss_fn(model(x), y)
if not torch.isfinite(loss):
    raise RuntimeError(f"non-finite loss at step {step}")  # stop at the first one"""

GRAD_GUARD_SNIPPET = """\
loss.backward()
total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))  # measures only
if torch.isfinite(total):
    optimizer.step()          # never apply NaN/Inf gradients to the parameters
optimizer.zero_grad(set_to_none=True)"""

EVAL_GUARD_SNIPPET = """\
model.eval()
with torch.no_grad():
    for x, y in val_loader:
        out = model(x)
        if not torch.isfinite(out).all():
            print("non-finite outputs", x.abs().max())
        loss = loss_fn(out.float(), y)   # evaluate the loss in float32
        if not torch.isfinite(loss):
            print("non-finite loss on finite outputs")"""

INPUT_SNIPPET = """\
# once, on the dataset: find the rows that carry NaN/Inf
bad = ~torch.isfinite(features).all(dim=1) | ~torch.isfinite(targets).reshape(len(targets), -1).all(dim=1)
print(f"{int(bad.sum())} bad rows", bad.nonzero()[:10].flatten().tolist())
features, targets = features[~bad], targets[~bad]   # or impute / fix the source
# in the loop, cheaply while debugging:
assert torch.isfinite(x).all() and torch.isfinite(y).all(), f"non-finite batch at step {step}" """


#: Root causes outside this family a non-finite value can follow from when the run diverged
#: (unnormalised inputs make the first layer's gradient, and an SGD step on it, as large as
#: the features: the first updates overshoot; an initialisation that multiplies the activation
#: scale at every layer makes the first loss and gradients as large as the product, decades at
#: step 0, and the first update overshoots the same way).
DIVERGENCE_CAUSES = ("exploding-gradients", "lr-too-high", "input-scale", "poor-initialization")
#: ... and, when gradients grew backwards through time at or before the first non-finite value,
#: the recurrence that made them (long-lookback's exploding form; not a window merely too long)
THROUGH_TIME_CAUSE = "long-lookback"


def _divergence_causes(ctx: RunContext, step: int) -> list[str]:
    """The divergence root causes a non-finite value at ``step`` may follow from (the engine
    links those present and not later)."""
    through_time = exploding_through_time(ctx)
    return [*DIVERGENCE_CAUSES, *([THROUGH_TIME_CAUSE] if through_time is not None and through_time <= step else [])]


#: A non-finite value is a pattern, not a stray, from this many occurrences: confidence rises
#: from 0.6 at one to 1.0 at three (the measurement itself is exact).
PATTERN_COUNT = 3
#: The confidence of an exact count of non-finite occurrences: 0.6 for one (a NaN is never
#: noise, but one could be a stray batch), whole at ``PATTERN_COUNT`` (a pattern).
EXACT_COUNT_BASE = 0.6
#: A loss non-finite on at least this fraction of the steps is systematic: one batch in twenty
#: never trains (the data or the model has a fault), not a stray batch.
SYSTEMATIC_FRACTION = 0.05
#: A loss that stayed non-finite for the last this-many steps of the run (and at least a
#: tenth of it) has stopped training: further steps cannot bring it back by themselves.
SUSTAINED_NONFINITE = 20
SUSTAINED_NONFINITE_FRACTION = 0.1
#: The lr a recommended snippet shows when the run's is unknown (Adam's default).
SNIPPET_LR = 1e-3


def _count_confidence(what: str) -> Confidence:
    """0.6 for one non-finite occurrence of ``what``, whole at ``PATTERN_COUNT``."""
    return Confidence(EXACT_COUNT_BASE, Ramp(1.0 - EXACT_COUNT_BASE, what, span=PATTERN_COUNT))


def _nonfinite_layers_at(frame: Any, step: int) -> list[str]:
    """Columns of a per-layer frame that are NaN/Inf at ``step`` (MISSING = -1 is not)."""
    if frame is None or frame.empty or step not in frame.index:
        return []
    row = frame.loc[step]
    if hasattr(row, "ndim") and row.ndim > 1:
        row = row.iloc[-1]
    vals = row.to_numpy(dtype=np.float64)
    return [str(c) for c, v in zip(frame.columns, vals) if not math.isfinite(v)]


def _nan_layers_at(frame: Any, step: int) -> set[str]:
    if frame is None or frame.empty or step not in frame.index:
        return set()
    row = frame.loc[step]
    if hasattr(row, "ndim") and row.ndim > 1:
        row = row.iloc[-1]
    return {str(c) for c, v in zip(frame.columns, row.to_numpy(dtype=np.float64)) if math.isnan(v)}


# ------------------------------------------------------------------------------------------
@register
class NonfiniteInputs(Rule):
    """Fires when a batch carried NaN/Inf. Two observations count, zero being the only
    threshold (a finite-valued dataset never has one):

    * the recorder's per-step check (``data_nonfinite``): how many data tensors held a NaN/Inf
      (the watched models' first input of every training forward, the float targets of
      observed loss functions). It is exact: the step it names is the step the bad batch
      entered;
    * the sampled ``nonfinite`` count of the model's input, of the input to the first
      parametric layer, or of a loss function's target (sampled steps only; it also sees
      inputs passed as a second argument or to the first layer after a preprocessing step).

    Only observations that cannot come from non-finite parameters count (the model's first
    input always; a carried state, the first layer's input, a target or the per-step count
    only on steps up to the one where the parameters went non-finite). A log with samples but
    without the per-step count (older logs) bounds the first step with the per-step evidence:
    the first step after the last clean sample, at or before the first bad one, whose loss or
    gradients went non-finite while the parameters were still finite.

    Confidence: an exact observation (0.6), a pattern from ``PATTERN_COUNT`` bad steps, and
    corroborated when the loss or gradients of the first step were non-finite too.
    """

    code = "GP404"
    slug = "nonfinite-inputs"
    severity = "error"
    title = "NaN/Inf in the inputs or targets"
    #: the sampled ``inputs`` or ``targets`` signal, either one (a model called with keyword
    #: arguments only has target samples)
    requires = ("inputs|targets|data_finiteness",)
    confidence = Confidence(EXACT_COUNT_BASE, Ramp(0.2, "bad steps observed", span=PATTERN_COUNT),
                            Flag(0.2, "the loss or gradients of the first step were non-finite too"))
    evidence_fields = {
        "first_observed_step": Field("first seen", "step"),
        "last_clean_sample_step": Field("last clean sample", "step"),
        "places": Field("where"),
        "bad_samples": Field("sampled tensors with NaN/Inf"),
        "bad_steps": Field("steps with NaN/Inf data", "steps"),
    }
    explanation = Explanation(
        what="NaN or Inf values in the inputs fed to the model, in the input of its first layer, or in the targets "
        "fed to the loss.",
        why="One NaN in a batch makes the loss and every gradient of that step NaN; an optimizer step then writes "
        "NaN into every parameter, and the run is lost from there on.",
        causes="Missing values in the raw data (empty CSV cells, divisions by zero in feature engineering, log of 0), "
        "normalisation by a zero standard deviation, a corrupt shard or augmentation.",
        fix="Find and drop or impute the bad rows at the source; validate once at load time. Do not paper over it "
        "with a smaller learning rate or gradient clipping: neither removes a NaN.",
        example="A feature column with one empty cell parsed as NaN: the input of step 5 has 1 non-finite entry, the "
        "loss and all gradients of step 5 are NaN, and SGD writes NaN into every weight.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        if not {"inputs", "targets", "data_finiteness"} & ctx.signals:
            return []
        tl = nonfinite_timeline(ctx)
        if not tl.inputs and tl.data_step is None:
            return []
        sampled = sorted(tl.inputs, key=lambda r: (r["step"], STAGE_ORDER.get(r["probe"], UNKNOWN_STAGE)))
        data_rows = np.flatnonzero(tl.data)
        # the per-step count: one observation per bad step, no module to name
        per_step = [{"step": int(ctx.step[i]), "probe": "data", "target": "", "nonfinite": float(tl.data_counts[i]),
                     "numel": math.nan} for i in data_rows]
        bad = sorted(per_step + sampled, key=lambda r: r["step"])
        first_bad = bad[0]
        places: dict[str, dict[str, Any]] = {}
        for r in bad:
            key = f"{r['probe']}:{r['target']}"
            p = places.setdefault(key, {"probe": r["probe"], "target": r["target"], "first_step": r["step"],
                                        "steps": 0, "max_nonfinite": 0.0, "numel": r["numel"]})
            p["steps"] += 1
            p["max_nonfinite"] = max(p["max_nonfinite"], r["nonfinite"])
        first = tl.input_step if tl.input_step is not None else first_bad["step"]
        i0 = first_index(ctx.step == first)
        corroborated = i0 is not None and bool(tl.loss[i0] or tl.grad_raw[i0])
        n_steps = len({r["step"] for r in bad})
        conf = self.confidence(n_steps, corroborated)
        what = {"input": "the model's input", "first_layer": "the input of the first layer", "target": "the target of",
                "data": "the step's data (model input and loss targets)"}
        desc = []
        for p in list(places.values())[:4]:
            frac = p["max_nonfinite"] / p["numel"] if p["numel"] and math.isfinite(p["numel"]) else math.nan
            name = f"{what.get(p['probe'], p['probe'])} {p['target']}".rstrip()
            if p["probe"] == "data":
                desc.append(f"{name}: NaN/Inf on {p['steps']} step(s), first at step {p['first_step']}")
                continue
            desc.append(f"{name}: up to {p['max_nonfinite']:.0f} non-finite entries"
                        + (f" of {p['numel']:.0f} ({frac:.2%})" if math.isfinite(frac) else "")
                        + f", first seen at step {p['first_step']}")
        ev: dict[str, Any] = {
            "first_observed_step": tl.input_observed_step if tl.data_step is None else first,
            "last_clean_sample_step": tl.last_clean_input_step,
            "places": list(places.values())[:10],
            "bad_samples": len(sampled),
            "bad_steps": int(data_rows.size),
        }
        msg = "NaN/Inf entered with the data: " + "; ".join(desc) + "."
        if tl.data_step is None and tl.input_step is not None and tl.input_observed_step is not None \
                and tl.input_step < tl.input_observed_step:
            msg += (f" Samples are taken on some steps only; the loss/gradients were already non-finite at step "
                    f"{tl.input_step}, after the last clean sample"
                    + (f" at step {tl.last_clean_input_step}" if tl.last_clean_input_step is not None else "")
                    + ", so the bad batch most likely entered there.")
        return [self.finding(
            confidence=conf, message=msg, first_step=first, layer=sampled[0]["target"] if sampled else None, evidence=ev,
            recommendations=[Recommendation.code("Find and remove the non-finite rows at the source", INPUT_SNIPPET)],
        )]


# ------------------------------------------------------------------------------------------
@register
class NonfiniteLoss(Rule):
    """Fires when a loss was NaN/Inf on any step: a backward root or a loss-function output
    computed with grad. Zero tolerance: a non-finite loss is never a valid training signal.
    With a training loss finite throughout, a validation loss (``probe.log``, a foreign log's
    eval loss under any name) that was NaN/Inf at an evaluation fires too: no checkpoint can be
    chosen from it (error when the last evaluation is still non-finite).

    It reports the first step and what preceded it: the last finite loss and gradient norm
    against their running medians (a divergence shows as growth before the NaN), whether the
    parameters were already non-finite before (then the loss follows from them:
    ``caused_by`` nonfinite-parameters), whether counted gradients were non-finite before,
    and, on a sampled step, the first module (in forward order) whose output was non-finite.

    "Had risen" means the last finite value was at least 3x the median of the 20 finite
    values before it (a factor no ordinary batch-to-batch noise of a loss or a gradient norm
    reaches, and the signature of a divergence running away). Only then (or when the loss
    went non-finite after only 1 or 2 finite records, too early for a history to rise from,
    but after an update), and
    when the data was clean, is the loss linked to exploding-gradients / lr-too-high /
    input-scale (if present): a NaN batch is never blamed on the learning rate.

    Severity error when the run did not recover (the last recorded loss is non-finite, the
    parameters went non-finite) or at least 5% of steps had a non-finite loss (one batch in
    twenty never trains: the data or the model has a systematic fault, not a stray batch);
    warning for isolated, recovered ones (e.g. skipped by a GradScaler or a guard).
    Confidence: the measurement is exact, the question is whether it is a pattern, which
    ``PATTERN_COUNT`` occurrences settle.
    """

    code = "GP401"
    slug = "nonfinite-loss"
    severity = "error"
    title = "The loss became NaN/Inf"
    severities = {
        "error": f"the run did not recover (the last loss is non-finite, or the parameters are), or at least "
                 f"{SYSTEMATIC_FRACTION:.0%} of the steps had a non-finite loss, or the validation loss is still "
                 "non-finite at the last evaluation",
        "warning": "isolated non-finite losses the run recovered from (skipped by a GradScaler or a guard), or a "
                   "validation loss non-finite at some evaluations but finite at the last",
    }
    requires = ("loss",)
    confidence = {"training loss": _count_confidence("steps with a non-finite loss"),
                  "validation loss": _count_confidence("non-finite evaluations")}
    causes = ("nonfinite-inputs", "fp16-overflow")
    causes_on_evidence = ("nonfinite-parameters", "nonfinite-gradients", *DIVERGENCE_CAUSES, THROUGH_TIME_CAUSE)
    final_when = (f"the loss stayed non-finite through the last {SUSTAINED_NONFINITE} steps (and a tenth of the run), "
                  "or the parameters are non-finite: no later step computes a finite loss from them")
    evidence_fields = {
        "nonfinite_steps": Field("steps with a non-finite loss", "steps"),
        "fraction": Field("of the steps", "%"),
        "last_finite_loss": Field("last finite loss", "loss"),
        "last_finite_grad_norm": Field("last finite gradient norm", "norm"),
        "loss_rise": Field("loss before it over its running level", "x"),
        "grad_norm_rise": Field("gradient norm before it over its running level", "x"),
        "lr": Field("lr", "lr"),
        "first_nonfinite_module": Field("first module with a non-finite output"),
        "skipped_by_scaler": Field("skipped by the GradScaler", "steps"),
        "recovered": Field("recovered"),
        "nonfinite_tail": Field("non-finite through the last", "steps"),
        "nonfinite_evaluations": Field("non-finite evaluations"),
        "evaluations": Field("evaluations"),
    }
    explanation = Explanation(
        what="The first step whose loss was NaN or Inf, and what preceded it: a rising loss or gradient norm, "
        "non-finite parameters from an earlier step, non-finite data, or the module where the forward first "
        "produced a NaN.",
        why="A non-finite loss makes every gradient of the step non-finite; one optimizer step on it destroys the "
        "parameters. Skipping such steps silently hides the cause.",
        causes="NaN/Inf in the batch; parameters already NaN from an earlier step (Adam eps=0, an exploded update); "
        "divergence (learning rate too high, no clipping); log/sqrt/division of 0 in the loss; float16 overflow.",
        fix="Fix the stage named in caused_by first. To find the op, run a few steps with "
        "torch.autograd.set_detect_anomaly(True) and stop at the first non-finite loss.",
        example="The loss is NaN from step 5 on; the input of step 5 had one NaN entry (nonfinite-inputs).",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        tl = nonfinite_timeline(ctx)
        if not tl.loss.any():
            return self._validation_only(ctx)
        i0 = first_index(tl.loss)
        assert i0 is not None
        first = ctx.step_at(i0)
        count = int(tl.loss.sum())
        ev: dict[str, Any] = {"nonfinite_steps": count, "fraction": round(count / max(ctx.n, 1), 4)}
        loss = ctx.loss
        context: list[str] = []
        before = loss[:i0][np.isfinite(loss[:i0])]
        if before.size:
            ev["last_finite_loss"] = float(before[-1])
        gn = ctx.grad_norm[:i0][np.isfinite(ctx.grad_norm[:i0])]
        if gn.size:
            ev["last_finite_grad_norm"] = float(gn[-1])
        loss_rise = risen_before(loss, i0)
        grad_rise = risen_before(ctx.grad_norm, i0)
        if loss_rise:
            ev["loss_rise"] = round(loss_rise[1], 2)
            context.append(f"the loss had risen to {loss_rise[1]:.1f}x its running median")
        if grad_rise:
            ev["grad_norm_rise"] = round(grad_rise[1], 2)
            context.append(f"the gradient norm had risen to {grad_rise[1]:.1f}x its running median")
        lr = ctx.lr[i0] if i0 < len(ctx.lr) else math.nan
        if math.isfinite(lr):
            ev["lr"] = float(lr)
        caused_by: list[str] = []
        if tl.param_step is not None and tl.param_step < first:
            caused_by.append("nonfinite-parameters")
            context.append(f"the parameters were already non-finite after step {tl.param_step}")
        if tl.grad_step is not None and tl.grad_step < first:
            caused_by.append("nonfinite-gradients")
            context.append(f"gradients were already non-finite at step {tl.grad_step}")
        data = tl.input_step is not None and tl.input_step <= first
        if data:
            context.append(f"the data carried NaN/Inf (from step {tl.input_step})")
        elif loss_rise or grad_rise or (tl.grad_step is not None and tl.grad_step < first) or too_early_to_rise(loss, i0):
            caused_by += [c for c in _divergence_causes(ctx, first) if c not in caused_by]
        module = self._first_module(ctx, first)
        if module is not None:
            ev["first_nonfinite_module"] = module
            context.append(f"in the forward of step {first} the first non-finite output came from {module}")
        skipped = tl.loss & ctx.skipped
        if skipped.any():
            ev["skipped_by_scaler"] = int(skipped.sum())
        with_loss = np.flatnonzero(np.isfinite(loss) | tl.loss)  # rows that computed a training loss
        last_finite = bool(with_loss.size) and not tl.loss[with_loss[-1]]
        params_bad = tl.param_step is not None
        recovered = last_finite and not params_bad
        ev["recovered"] = recovered
        severe = not recovered or count / max(ctx.n, 1) >= SYSTEMATIC_FRACTION
        tail = 0
        for flag in tl.loss[with_loss][::-1]:
            if not flag:
                break
            tail += 1
        ev["nonfinite_tail"] = tail
        final = params_bad or (tail >= SUSTAINED_NONFINITE and tail >= SUSTAINED_NONFINITE_FRACTION * max(ctx.n, 1))
        msg = (f"The loss was NaN/Inf first at step {first} ({count} of {ctx.n} steps"
               + (", the run never recovered" if not last_finite else "") + ")")
        msg += (". Before it: " + "; ".join(context) + ".") if context else (
            ". The loss and gradient norm were steady before it and the parameters finite: the NaN entered with that "
            "step's batch or its forward.")
        return [self.finding(
            confidence=self.confidence["training loss"](count), message=msg, first_step=first, layer=module, evidence=ev,
            severity="error" if severe else "warning", may_follow=caused_by, final=final,
            recommendations=[Recommendation.code("Stop at the first non-finite loss and find the op", GUARD_SNIPPET)],
        )]

    def _validation_only(self, ctx: RunContext) -> list[Finding]:
        """The training loss stayed finite but evaluations were NaN/Inf: the model's outputs on
        held-out data (or the evaluation's own arithmetic, e.g. a perplexity or a float16
        evaluation) overflow, and no checkpoint can be chosen from them."""
        ev_series = ctx.eval_loss
        if ev_series is None or not len(ev_series):
            return []
        vals = ev_series.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(vals)
        if not bad.any():
            return []
        steps = ev_series.index.to_numpy()
        first = int(steps[np.flatnonzero(bad)[0]])
        count = int(bad.sum())
        last_bad = bool(bad[-1])
        ev: dict[str, Any] = {"nonfinite_evaluations": count, "evaluations": int(vals.size), "recovered": not last_bad}
        msg = (f"The validation loss was NaN/Inf at {count} of {vals.size} evaluations (first at step {first}) while "
               "the training loss stayed finite: the model's outputs on held-out data, or the evaluation's own "
               "arithmetic (a perplexity exp(loss), a float16 evaluation), overflow, and no checkpoint can be chosen "
               "from these evaluations.")
        return [self.finding(
            confidence=self.confidence["validation loss"](count), message=msg, first_step=first, evidence=ev,
            severity="error" if last_bad else "warning", title="The validation loss became NaN/Inf",
            recommendations=[Recommendation.code("Find where the evaluation overflows", EVAL_GUARD_SNIPPET)],
        )]

    @staticmethod
    def _first_module(ctx: RunContext, step: int) -> str | None:
        act = ctx.samples("activation", "nonfinite")
        if act.empty:
            return None
        at = act[(act["step"] == step) & (act["value"] > 0)]
        if at.empty:
            return None
        return str(at.sort_values("index")["target"].iloc[0])


# ------------------------------------------------------------------------------------------
@register
class NonfiniteGradients(Rule):
    """Fires when a gradient was NaN/Inf on a step that counts: the recorder's per-layer
    non-finite flag (a NaN/Inf layer norm) or an infinite total norm. Not counted: steps a
    GradScaler skipped on purpose (``skipped``: float16 calibration or overflow, GP301/302)
    and scaled steps discarded without ``update()`` (GP305). Zero tolerance otherwise.

    The first layer is where the NaN appears first in backward order: backward runs from the
    loss to the input, so among the layers non-finite at the first step the one furthest
    down the forward (by sampled call order, else registration order) is where it starts;
    when the loss itself was finite that step, the NaN arose inside the backward there.

    Causes: the stages before it (inputs, loss, earlier non-finite parameters), float16
    overflow, and, only when the gradient norm had risen to >= 3x its running median right
    before (a divergence, not a bad batch) or the gradients went non-finite after only 1 or 2
    finite ones (too early for a history to rise from), exploding-gradients / lr-too-high /
    input-scale if present.

    Not counted either, in a log that does not record a loss scaler (a saved log): a
    non-finite gradient norm on a step whose loss was finite, after which the run went on
    finite (every later loss finite, gradient norms finite again): a float16 overflow the
    GradScaler skipped (a Hugging Face fp16 run logs grad_norm = inf there). An optimizer step
    on a non-finite gradient writes inf/NaN into the weights and every later loss; a run that
    went on finite did not take it.

    Severity error when an optimizer applied them or the run did not recover; warning when
    every counted step was left without an optimizer step and the parameters stayed finite.
    Confidence: exact counts, a pattern from ``PATTERN_COUNT`` steps.
    """

    code = "GP402"
    slug = "nonfinite-gradients"
    severity = "error"
    title = "NaN/Inf gradients"
    severities = {
        "error": "an optimizer stepped on them, or the run did not recover",
        "warning": "every counted step was left without an optimizer step and the parameters stayed finite",
    }
    requires = ("grad_norm",)
    confidence = _count_confidence("counted steps")
    causes = ("nonfinite-inputs", "nonfinite-loss", "fp16-overflow")
    causes_on_evidence = ("nonfinite-parameters", *DIVERGENCE_CAUSES, THROUGH_TIME_CAUSE)
    evidence_fields = {
        "nonfinite_steps": Field("steps with non-finite gradients", "steps"),
        "fraction": Field("of the steps", "%"),
        "skipped_by_scaler_not_counted": Field("skipped by the GradScaler (not counted)", "steps"),
        "discarded_under_scaler_not_counted": Field("discarded without update() (not counted)", "steps"),
        "overflow_skips_not_counted": Field("float16 overflows skipped, inferred (not counted)", "steps"),
        "nonfinite_layers": Field("layers"),
        "n_nonfinite_layers": Field("layers at the first step"),
        "loss_finite_at_first_step": Field("loss finite at that step"),
        "nonfinite_entries": Field("non-finite entries per layer"),
        "grad_norm_rise": Field("gradient norm before it over its running level", "x"),
        "applied_by_optimizer": Field("applied by the optimizer"),
    }
    explanation = Explanation(
        what="The first step and the first layer (in backward order) with NaN/Inf gradients, not counting the steps a "
        "GradScaler skipped on purpose.",
        why="An optimizer step on a NaN/Inf gradient writes NaN/Inf into the parameters and the run is lost; a guard "
        "that silently skips such steps wastes them and hides the cause.",
        causes="A non-finite loss (bad data, divergence); a backward singularity (sqrt or norm at 0, division by a "
        "zero std, log of 0, acos at +-1) in the named layer; exploding gradients.",
        fix="Fix the cause named in caused_by. If the loss was finite, the op that produced the NaN is in or right "
        "after the named layer: add an epsilon (sqrt(x + eps), x / (std + eps)) or clamp its input. Never step on "
        "non-finite gradients.",
        example="torch.norm of a zero vector in a custom layer: the loss is finite but that layer and every layer "
        "before it get NaN gradients at step 0.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        tl = nonfinite_timeline(ctx)
        skips = self._overflow_skips(ctx, tl)
        counted = tl.grad & ~skips
        if not counted.any():
            return []
        i0 = first_index(counted)
        assert i0 is not None
        first = ctx.step_at(i0)
        count = int(counted.sum())
        lg = layer_grads(ctx)
        layers = _nonfinite_layers_at(lg, first)
        counts = self._exact_counts(ctx, first)
        if not layers and counts:
            layers = [k for k, v in counts.items() if v > 0]
        order = layer_forward_order(ctx)
        layers.sort(key=lambda n: order.get(n, 0.0))
        origin = layers[-1] if layers else None
        loss_finite = not bool(tl.loss[i0])
        ev: dict[str, Any] = {
            "nonfinite_steps": count,
            "fraction": round(count / max(ctx.n, 1), 4),
            "skipped_by_scaler_not_counted": int(tl.skipped_mask.sum()),
            "discarded_under_scaler_not_counted": int(tl.discarded_mask.sum()),
            "overflow_skips_not_counted": int(skips.sum()),
            "nonfinite_layers": layers[:20],
            "n_nonfinite_layers": len(layers),
            "loss_finite_at_first_step": loss_finite,
        }
        if counts:
            ev["nonfinite_entries"] = {k: int(v) for k, v in counts.items() if v > 0}
        caused_by: list[str] = []
        if tl.param_step is not None and tl.param_step < first:
            caused_by.append("nonfinite-parameters")
        grad_rise = risen_before(ctx.grad_norm, i0)
        if grad_rise:
            ev["grad_norm_rise"] = round(grad_rise[1], 2)
        if (grad_rise or too_early_to_rise(ctx.grad_norm, i0)) and not (tl.input_step is not None and tl.input_step <= first):
            caused_by += _divergence_causes(ctx, first)
        applied = bool((ctx.col("optimizer_steps")[counted] > 0).any())
        measured = np.flatnonzero(np.isfinite(ctx.grad_norm) | tl.grad_raw)  # rows that had gradients
        recovered = bool(measured.size) and not counted[measured[-1]] and tl.param_step is None
        ev["applied_by_optimizer"] = applied
        where = ""
        if origin:
            in_backward = loss_finite and "nonfinite-parameters" not in caused_by
            where = f" (first, in backward order, at {origin}" + (
                "; the loss was finite, so the NaN arose in the backward there" if in_backward else "") + ")"
        msg = (f"Gradients were NaN/Inf first at step {first}{where}: {count} step(s), {len(layers)} layer(s) at the "
               f"first one.")
        if tl.skipped_mask.any():
            msg += f" {int(tl.skipped_mask.sum())} step(s) the GradScaler skipped on purpose are not counted."
        if applied:
            msg += " The optimizer stepped on them."
        recs = [Recommendation.code("Never step on non-finite gradients; find the op", GRAD_GUARD_SNIPPET)]
        return [self.finding(
            confidence=self.confidence(count), message=msg, first_step=first, layer=origin, evidence=ev,
            severity="error" if (applied or not recovered) else "warning", may_follow=caused_by, recommendations=recs,
        )]

    @staticmethod
    def _overflow_skips(ctx: RunContext, tl: Any) -> np.ndarray:
        """Rows of a log that does not record a loss scaler (a saved log) whose gradient norm
        was non-finite while the loss was finite, after which every loss and the gradient norms
        stayed finite: steps nothing applied, float16 overflows a GradScaler skipped (a Hugging
        Face fp16 run logs grad_norm = inf at those steps; its readers keep any logged
        non-finite norm as +inf). An optimizer step on a non-finite gradient writes inf/NaN
        into the weights (SGD subtracts lr x inf; Adam's moments become inf and its update
        inf / inf = NaN), and every later loss with them; a run that went on finite did not
        step on it."""
        out = np.zeros(ctx.n, dtype=bool)
        if "scaler" in ctx.signals or tl.param_step is not None:
            return out  # the recorder knows what its scaler skipped (``skipped``)
        inf = tl.grad & ~np.isfinite(ctx.grad_norm) & ~np.isnan(ctx.grad_norm) & ~tl.loss
        if not inf.any():
            return out
        last = int(np.flatnonzero(inf)[-1])
        after = slice(last + 1, None)
        loss_after, norm_after = ctx.loss[after], ctx.grad_norm[after]
        went_on = (np.isfinite(loss_after[~np.isnan(loss_after)]).all() and not tl.loss[after].any()
                   and np.isfinite(norm_after).any() and not (tl.grad[after] & ~inf[after]).any())
        return inf if went_on else out

    @staticmethod
    def _exact_counts(ctx: RunContext, step: int) -> dict[str, float]:
        g = ctx.samples("grad", "nonfinite_count")
        if g.empty:
            return {}
        at = g[g["step"] == step]
        return {str(t): float(v) for t, v in zip(at["target"], at["value"])}


# ------------------------------------------------------------------------------------------
@register
class NonfiniteParameters(Rule):
    """Fires when parameters were NaN/Inf after an optimizer step (the recorder's
    ``param_nonfinite_layers`` > 0, from the weight norms it measures after every step). Zero
    tolerance: a non-finite weight never recovers by itself.

    It tells the mechanism from what the step consumed: non-finite gradients at that step
    (the optimizer applied them: ``caused_by`` nonfinite-gradients); finite gradients with an
    Adam-type optimizer and ``eps`` = 0 (m / (sqrt(v) + eps) is 0/0 = NaN for every entry
    whose gradient has always been 0, e.g. embedding rows never looked up); finite gradients
    otherwise (the update overflowed: linked to lr-too-high / exploding-gradients / input-scale when
    present).
    The named layer is the
    first, in forward order, that went non-finite with a finite gradient (else the first).

    Confidence: the observation is exact (0.6), and whole when the parameters never recovered
    (persistence: the fraction of measured steps from the first one on whose parameters stayed
    non-finite).
    """

    code = "GP403"
    slug = "nonfinite-parameters"
    severity = "error"
    title = "Parameters became NaN/Inf after an optimizer step"
    requires = ("weights",)
    confidence = Confidence(EXACT_COUNT_BASE, Ramp(0.4, "persistence"))
    causes = ("nonfinite-inputs", "nonfinite-loss", "nonfinite-gradients")
    causes_on_evidence = (*DIVERGENCE_CAUSES, THROUGH_TIME_CAUSE)
    final_when = ("the parameters stayed non-finite from that step on: NaN/Inf weights stay NaN/Inf under every "
                  "optimizer update, so the run cannot recover without reloading a checkpoint")
    evidence_fields = {
        "nonfinite_layers": Field("layers"),
        "nan_layers": Field("layers with NaN"),
        "n_nonfinite_layers": Field("non-finite layers"),
        "persistence": Field("steps that stayed non-finite afterwards", "%"),
        "gradients_nonfinite_at_step": Field("gradients non-finite at that step"),
        "optimizer": Field("optimizer"),
        "eps": Field("optimizer eps"),
        "lr": Field("lr", "lr"),
        "weight_norm_growth_before": Field("weight norm growth before it", "x"),
    }
    explanation = Explanation(
        what="Parameters that were NaN/Inf right after an optimizer step: the step, the layers, and whether the "
        "optimizer applied non-finite gradients or produced the NaN itself.",
        why="A NaN weight makes every later forward through it NaN; the run cannot recover without reloading a "
        "checkpoint.",
        causes="Stepping on NaN/Inf gradients; Adam/AdamW/RMSprop with eps=0 on parameters with entries whose "
        "gradient is always zero (unused embedding rows, masked weights): 0/0; an update so large the weights "
        "overflow (learning rate far too high).",
        fix="Never step on non-finite gradients (a GradScaler does this for float16; otherwise check the norm); keep "
        "eps > 0 in adaptive optimizers (PyTorch's default is 1e-8); lower the learning rate if the weights grew "
        "without bound before.",
        example="Adam(eps=0) on nn.Embedding(50, 8) whose batches only use ids 0-19: after the first step emb.weight "
        "is NaN in rows 20-49 while every gradient was finite.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        tl = nonfinite_timeline(ctx)
        if not tl.param.any():
            return []
        i0 = first_index(tl.param)
        assert i0 is not None
        first = ctx.step_at(i0)
        measured = ctx.col("param_nonfinite_layers")[i0:] >= 0
        persist = float(tl.param[i0:][measured].mean()) if measured.any() else 1.0
        layers = _nonfinite_layers_at(ctx.log.layer_weight, first)
        nan_layers = _nan_layers_at(ctx.log.layer_weight, first)
        lg = layer_grads(ctx)
        bad_grad = set(_nonfinite_layers_at(lg, first))
        order = layer_forward_order(ctx)
        layers.sort(key=lambda n: order.get(n, 0.0))
        made_here = [n for n in layers if n not in bad_grad]
        layer = made_here[0] if made_here else (layers[0] if layers else None)
        grads_bad = bool(tl.grad_raw[i0]) and not bool(ctx.skipped[i0])
        opt = ctx.optimizer_class
        eps = ctx.hparams.get("eps")
        ev: dict[str, Any] = {
            "nonfinite_layers": layers[:20],
            "nan_layers": [n for n in layers if n in nan_layers][:20],
            "n_nonfinite_layers": int(ctx.col("param_nonfinite_layers")[i0]),
            "persistence": round(persist, 3),
            "gradients_nonfinite_at_step": grads_bad,
            "optimizer": opt,
        }
        if eps is not None:
            ev["eps"] = eps
        lr = ctx.lr[i0] if i0 < len(ctx.lr) else math.nan
        if math.isfinite(lr):
            ev["lr"] = float(lr)
        caused_by: list[str] = []
        recs: list[Recommendation] = []
        if grads_bad:
            caused_by.append("nonfinite-gradients")
            mech = "the optimizer applied NaN/Inf gradients"
            recs.append(Recommendation.code("Never step on non-finite gradients", GRAD_GUARD_SNIPPET))
        elif ctx.adaptive and isinstance(eps, (int, float)) and eps == 0:
            mech = (f"{opt} with eps=0 divides m / sqrt(v): 0/0 = NaN for every entry whose gradient has always been 0 "
                    f"(rows of {layer} never used in a batch), while every gradient was finite")
            recs.append(Recommendation.code(
                f"Keep eps > 0 in {opt}",
                f"optimizer = torch.optim.{opt}(model.parameters(), lr={ctx.lr0 if ctx.lr0 is not None else SNIPPET_LR:g}, "
                f"eps=1e-8)  # PyTorch's default; any eps > 0 removes the 0/0",
            ))
        else:
            wn = ctx.col("weight_norm")[:i0]
            wn = wn[np.isfinite(wn)]
            if wn.size >= 2 and wn[0] > 0:
                ev["weight_norm_growth_before"] = float(wn[-1] / wn[0])
            mech = "the gradients were finite, so the update itself overflowed (look at the learning rate)"
            caused_by += _divergence_causes(ctx, first)
        n_layers = len(layers) or ev["n_nonfinite_layers"]
        what = "NaN/Inf"
        if layers and not any(n in nan_layers for n in layers):
            # an infinite weight norm is an Inf entry or finite weights beyond ~1e19 whose norm
            # overflows float32: diverged either way
            what = "Inf (or so large their float32 norm overflows)"
        msg = (f"Parameters were {what} after the optimizer step of step {first} ({n_layers} layer(s): "
               f"{', '.join(layers[:4])}): {mech}." + (" They never recovered." if persist >= 1.0 else ""))
        if not recs:
            recs.append(Recommendation.code("Stop at the first non-finite parameter",
                                            "optimizer.step()\nassert all(torch.isfinite(p).all() for p in "
                                            "model.parameters()), f'non-finite parameters after step {step}'"))
        return [self.finding(
            confidence=self.confidence(persist), message=msg, first_step=first, layer=layer, evidence=ev,
            final=persist >= 1.0,
            may_follow=caused_by, recommendations=recs,
        )]

