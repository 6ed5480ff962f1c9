"""GP301-GP302: the GradScaler's scale (high-init-scale, fp16-overflow).

The mechanics (see :mod:`gradprobe.analysis.amp`): a skipped step means some float16 value of
that backward (or forward) exceeded 65504 at that scale; the default ``init_scale`` of 2**16 is
float16's own range, and backing off from it one skipped step per halving is the calibration,
not a fault.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    FP16_MAX,
    FP16_MAX_SCALE,
    LONG_BURST_HALVINGS,
    ScalerHistory,
    RunContext,
    autocast_dtypes,
    feature_absmax,
    fp16_compute_modules,
    high_init,
    overflow_triggers,
    scaler_history,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register
from gradprobe.rules.snippets import AMP_SNIPPET_BF16

#: How many skipped steps, and modules near float16's maximum, the evidence lists.
SHOWN_STEPS = 12
SHOWN_MODULES = 3
#: GP301: a skip this many steps after the scale grew is the growth probe failing (futile).
FUTILE_WITHIN = 2
#: GP301: the recommended growth_interval keeps futile growth probes at this fraction of steps.
FUTILE_WASTE = 1e-3
#: GP302: a float16 value within this factor (3 binades) of 65504 overflows as soon as anything
#: downstream multiplies it by that much (a residual sum, a square, a loss scale of 8).
NEAR_FP16_MAX = 8


def _pow2_floor(x: float) -> float:
    return float(2.0 ** math.floor(math.log2(x))) if x > 0 and math.isfinite(x) else x


def _steps_list(h: ScalerHistory, positions: np.ndarray, limit: int = SHOWN_STEPS) -> list[int]:
    return [h.step_of(int(p)) for p in positions[:limit]]


# ------------------------------------------------------------------------------------------
@register
class HighInitScale(Rule):
    """Fires when the GradScaler's initial scale sat at least 2**8 = 256 times above the scale
    the run settled at (8 backoffs at the default ``backoff_factor`` 0.5), and the scale then
    held (the skipping stopped: GP302's conditions are not met).

    Settled scale: the median scale of the successful steps before the scaler first grew (the
    end of its calibration descent). Why 2**8: each halving costs one skipped step (a full
    forward and backward thrown away, and a scheduler step taken without an update), and
    PyTorch's default ``init_scale`` 2**16 is float16's own range, so a default scaler that
    needs up to 7 halvings is the designed calibration (GP304); 8 or more means the gradients
    live at least 2.4 decades below where the scaler started (or the configured init_scale is
    above float16's range, which no gradient can use), so the start is a burst of waste.

    ``growth_interval`` is recommended only when, after settling, most growth attempts were
    futile (a skip within 2 steps of the scale growing, at least 2 growth attempts, at least
    half of them futile): each futile probe costs one step per ``growth_interval``, and the
    suggestion keeps that waste at or below 0.1% of steps.

    Confidence: 0.5 at the threshold, whole at 15 halvings (a start 4.5 decades above where
    the gradients fit: no margin anyone would choose).
    """

    code = "GP301"
    slug = "high-init-scale"
    severity = "warning"
    title = "GradScaler starts far above the scale the run settles at"
    requires = ("scaler|loss_scale",)
    confidence = Confidence(0.5, Ramp(0.5, "halvings", start=LONG_BURST_HALVINGS - 1, span=8.0))
    evidence_fields = {
        "init_scale": Field("initial scale", "scale"),
        "settled_scale": Field("settled scale", "scale"),
        "halvings": Field("backoffs to settle", "halvings"),
        "skipped_at_start": Field("steps skipped at the start", "steps"),
        "first_skipped_step": Field("first skipped", "step"),
        "last_skipped_step": Field("last skipped", "step"),
        "skipped_steps": Field("skipped steps", "step"),
        "backoff_factor": Field("backoff factor"),
        "wasted_fraction": Field("steps wasted", "%"),
        "growth_attempts": Field("growth attempts after settling"),
        "futile_growth_fraction": Field("futile growth attempts", "%"),
    }
    computes = {
        "init_scale": "the settled scale: median scale of the successful steps before the scaler first grew "
        "(rounded down to a power of two)",
        "growth_interval": "ceil(futile_growth_fraction / 0.001) - 1, so that futile growth probes (a skip within 2 "
        "steps of the scale growing) cost at most 0.1% of steps; only when at least half of the growths were futile",
    }
    explanation = Explanation(
        what="A long burst of skipped steps at the start of a float16 run: the GradScaler began many halvings above "
        "the scale at which the run's gradients fit in float16 and had to back off one skipped step at a time.",
        why="Every skipped step throws away a forward and backward pass while the learning-rate schedule advances. "
        "An init_scale above float16's range (2**16) cannot be used by any gradient at all.",
        causes="init_scale set far above 2**16 (e.g. 2**24 or 2**32 copied from another setup); a model whose "
        "gradients are large (a large loss, a sum instead of a mean) started from the default 2**16.",
        fix="Start the scaler at the scale the run settled at (init_scale below). Keep backoff_factor and "
        "growth_factor at their defaults; raise growth_interval only if the scale keeps probing upward and skipping.",
        example="GradScaler(init_scale=2**40) skips 26 steps before settling at 16384: use "
        "GradScaler(init_scale=16384).",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        hi = high_init(ctx)
        if hi is None:
            return []
        h = scaler_history(ctx)
        halvings2 = hi["halvings"]
        burst = h.calibration_skips
        settled = h.settled_scale
        suggested = _pow2_floor(settled)
        first = h.step_of(int(burst[0]))
        last = h.step_of(int(burst[-1]))
        ev: dict[str, Any] = {
            "init_scale": h.init_scale,
            "settled_scale": settled,
            "halvings": round(halvings2, 2),
            "skipped_at_start": int(burst.size),
            "first_skipped_step": first,
            "last_skipped_step": last,
            "skipped_steps": _steps_list(h, burst),
            "backoff_factor": h.backoff_factor,
            "wasted_fraction": round(burst.size / max(h.n, 1), 4),
        }
        recs = [
            Recommendation.hyperparameter(
                "init_scale", h.init_scale, suggested,
                f"the scaler settled at {settled:g} after {burst.size} skipped steps (steps {first}-{last}); "
                + ("starting there" if suggested == settled else "starting at that scale rounded down to a power "
                   "of two") + " removes the burst",
            )
        ]
        gi = self._growth_interval(h)
        if gi is not None:
            suggested_gi, p, n_growth = gi
            ev["growth_attempts"] = n_growth
            ev["futile_growth_fraction"] = round(p, 3)
            recs.append(
                Recommendation.hyperparameter(
                    "growth_interval", h.growth_interval, suggested_gi,
                    f"{p:.0%} of the {n_growth} growth attempts after settling overflowed within 2 steps; "
                    f"{suggested_gi} keeps those futile probes below 0.1% of steps",
                )
            )
        recs.append(Recommendation.code("Start the GradScaler at the settled scale",
                                        f"scaler = torch.amp.GradScaler(device, init_scale={suggested:g})"))
        conf = self.confidence(halvings2)
        msg = (
            f"The GradScaler started at {h.init_scale:g} and skipped {burst.size} steps (steps {first}-{last}), "
            f"backing off {halvings2:.0f} halvings to {settled:g}, where the gradients fit in float16. "
            f"Those steps did no update."
        )
        return [self.finding(confidence=conf, message=msg, first_step=first, evidence=ev, recommendations=recs)]

    @staticmethod
    def _growth_interval(h: ScalerHistory) -> tuple[int, float, int] | None:
        growth = np.flatnonzero(h.growth)
        if growth.size < 2:
            return None
        futile = 0
        for g in growth:
            nxt = h.skipped[g + 1 : g + 1 + FUTILE_WITHIN]
            futile += int(nxt.any())
        p = futile / growth.size
        if p < 0.5:
            return None
        suggested = int(math.ceil(p / FUTILE_WASTE)) - 1
        if h.growth_interval is not None and suggested <= h.growth_interval:
            return None
        return suggested, p, int(growth.size)


# ------------------------------------------------------------------------------------------
@register
class Fp16Overflow(Rule):
    """Fires, on a float16 (or unknown-dtype) run, when any of:

    * the scale reached 1 or below. A scale is a multiplier chosen to keep small gradients
      representable; at scale <= 1 the overflow cannot come from scaling: the unscaled
      float16 forward or backward itself exceeds 65504. Confidence 0.7 at 1, +0.05 per halving
      below (1.0 at 2**-6).
    * steps keep being skipped late in the run: in the second half of the scaled steps (and
      after the calibration), skips net of growth probes (a skip right after the scale grew
      is the scaler probing, by design) number at least 3 and at least 1% of steps, and
      they have not stopped (at least one in the last quarter of the run). With backoff 0.5
      and a growth_interval G, a skip rate above ~1/G (1/2000 by default; 1% covers G >= 100)
      ratchets the scale down faster than it can grow back: the scale is collapsing even if
      it has not reached 1 yet. A calibration that is still finishing is a cluster that
      stops, which the last-quarter condition excludes. Confidence
      0.5 + 0.25 * min(1, excess / 10) + 0.25 * min(1, rate / 0.1).
    * not one scaled step succeeded, at least 8 were skipped, and the scale fell at least 8
      halvings below 2**16 (float16's range, PyTorch's default start): past any calibration
      from a sane start, the unscaled values themselves overflow. (From a start far above
      2**16 the first 8 halvings below it are still the search: GP301's territory once a
      step succeeds.) Confidence 0.5 + 0.5 * min(1, (halvings below 2**16 - 7) / 8).
    * at least 2 skipped steps whose unscaled loss was already inf/NaN, with no NaN/Inf seen
      in the inputs: the forward overflowed float16 before any scaling. Confidence
      min(1, 0.6 + 0.1 * count).
    * a sampled step (with or without a scaler) whose first non-finite activation came out
      of a module that computed in float16, with the model's input and the parameters
      finite: a matmul/conv of finite numbers only makes inf by exceeding 65504, so one such
      sample is direct evidence. Confidence min(1, 0.7 + 0.1 * sampled steps).

    The finding's confidence is the largest of the triggered ones. Runs whose autocast was
    only bfloat16 are excluded (bfloat16 has float32's range; their skips are GP4xx). When the
    sampled input itself reaches within 8x of 65504 (any scaling or sum overflows it), the
    finding names input-scale as its cause if that rule fires.
    """

    code = "GP302"
    slug = "fp16-overflow"
    severity = "error"
    title = "The forward or backward overflows float16 itself"
    requires = ("scaler|loss_scale",)
    #: inputs within 8x of 65504 overflow float16 as soon as anything multiplies them
    causes_on_evidence = ("input-scale",)
    final_when = (f"not one scaled step succeeded and the scale fell {LONG_BURST_HALVINGS}+ halvings below float16's "
                  "range: every step is thrown away and backing off further cannot make the unscaled values fit")
    evidence_fields = {
        "triggers": Field("seen as"),
        "min_scale": Field("lowest scale", "scale"),
        "init_scale": Field("initial scale", "scale"),
        "skipped_steps": Field("skipped steps", "steps"),
        "skipped_fraction": Field("steps skipped", "%"),
        "first_skipped_steps": Field("first skipped", "step"),
        "first_successful_scale": Field("first successful scale", "scale"),
        "net_halvings_after_first_success": Field("backoffs after the first success", "halvings"),
        "late_skip_rate": Field("late skip rate", "%"),
        "forward_overflow_steps": Field("inf loss before scaling at", "step"),
        "modules_near_fp16_max": Field("modules near 65504"),
        "input_absmax": Field("largest input magnitude"),
        "activation_overflow": Field("first inf of the forward"),
    }
    computes = {"amp_dtype": '"bfloat16": float32\'s exponent range (max ~3.4e38) holds the values that overflow '
                "float16's 65504, with no scaler needed"}
    explanation = Explanation(
        what="The GradScaler's scale keeps collapsing (towards or below 1), or steps keep being skipped long after "
        "the calibration, or the unscaled loss itself is inf: values in the forward or backward exceed float16's "
        "maximum of 65504 whatever the scale.",
        why="Every skipped step is a lost update; a scale below 1 also shrinks small gradients into float16's "
        "underflow range, so the steps that do run lose their small gradients. The run makes little or no progress.",
        causes="Activations or logits that grow past 65504 (large inputs, unnormalised features, attention scores, "
        "exp/pow in the model); a model pretrained in bfloat16; gradients that grow as training diverges.",
        fix="Run autocast in bfloat16 (same exponent range as float32; no GradScaler needed), or keep the "
        "offending module in float32 under autocast(enabled=False). Normalise the inputs if they are far from unit "
        "scale.",
        example="Inputs with |x| ~ 3e4 under float16 autocast: every loss is inf and the scale halves on every step, "
        "through 1 and far below; with autocast(dtype=torch.bfloat16) the run trains.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        over = overflow_triggers(ctx)
        trig = over.triggered
        if not trig:
            return []
        h = scaler_history(ctx)
        first = min(s for s, _ in trig.values())
        conf = max(c for _, c in trig.values())
        skipped = np.flatnonzero(h.skipped)
        ev: dict[str, Any] = {"triggers": sorted(trig)}
        if h.n:
            ev.update({
                "min_scale": h.min_scale,
                "init_scale": h.init_scale,
                "skipped_steps": int(skipped.size),
                "skipped_fraction": round(skipped.size / max(h.n, 1), 4),
                "first_skipped_steps": _steps_list(h, skipped),
            })
        if h.first_success is not None:
            ev["first_successful_scale"] = float(h.scale_before[h.first_success])
            ev["net_halvings_after_first_success"] = round(h.net_halvings, 2)
        if h.late.size:
            ev["late_skip_rate"] = round(h.late_rate, 4)
        fo = over.forward_overflow
        if "forward_overflow" in trig:
            ev["forward_overflow_steps"] = _steps_list(h, fo)
        where = _overflowing_modules(ctx)
        layer = None
        if where:
            ev["modules_near_fp16_max"] = where
            layer = next(iter(where))
        xmax = feature_absmax(ctx)
        if xmax is not None:
            ev["input_absmax"] = xmax
        parts = []
        if "collapsed_below_1" in trig:
            parts.append(f"the scale collapsed to {h.min_scale:g} (at or below 1, where scaling cannot be the cause)")
        if "late_skipping" in trig:
            parts.append(f"{h.late_excess_skips} steps were skipped late in the run ({h.late_rate:.1%} of late steps)")
        if "no_step_succeeded" in trig:
            parts.append(f"not one of the {h.n} scaled steps succeeded and the scale fell to {h.min_scale:g}, "
                         f"{math.log2(FP16_MAX_SCALE / h.min_scale):.0f} halvings below float16's range")
        if "forward_overflow" in trig:
            parts.append(f"{fo.size} skipped steps had an inf/NaN loss before any scaling")
        act = over.activation_overflow
        if act:
            ev["activation_overflow"] = [{"step": s_, "module": m_} for s_, m_ in act[:12]]
            parts.append(f"the forward's first inf came out of the float16 module {act[0][1]} at step {act[0][0]}, "
                         f"with finite inputs and parameters")
            layer = act[0][1]  # where the first inf was made: more precise than "near the maximum"
        caused_by: list[str] = []
        if xmax is not None and xmax >= FP16_MAX / NEAR_FP16_MAX:
            parts.append(f"the input itself reaches {xmax:.3g}, "
                         + ("beyond float16's 65504" if xmax >= FP16_MAX else "within 8x of float16's 65504")
                         + " (normalise it)")
            caused_by.append("input-scale")
        msg = "float16 overflows in this run's own forward/backward: " + "; ".join(parts)
        if h.n:
            msg += f". {skipped.size} of {h.n} scaled steps were skipped"
        if where:
            msg += f"; float16 outputs at or near 65504 first in {', '.join(where)}"
        msg += "."
        current = "float16" if "float16" in autocast_dtypes(ctx) else None
        recs = [
            Recommendation.hyperparameter(
                "amp_dtype", current, "bfloat16",
                (f"the scale fell to {h.min_scale:g} and {skipped.size} steps were skipped: " if h.n else "")
                + "values exceed float16's 65504 whatever the scale; bfloat16 reaches ~3.4e38 (needs bf16 support: "
                "CPU, or CUDA compute capability >= 8.0)",
            ),
            Recommendation.code("Autocast in bfloat16 and drop the GradScaler", AMP_SNIPPET_BF16),
        ]
        if where:
            mod = next(iter(where))
            recs.append(Recommendation.code(
                f"Or keep {mod} in float32",
                f"with torch.autocast(device_type=device, enabled=False):\n    out = model.{mod}(inp.float())",
            ))
        return [self.finding(confidence=conf, message=msg, first_step=first, layer=layer, evidence=ev,
                             final="no_step_succeeded" in trig,
                             recommendations=recs, may_follow=caused_by)]


def _overflowing_modules(ctx: RunContext, limit: int = SHOWN_MODULES) -> dict[str, dict[str, Any]]:
    """float16 modules whose sampled outputs overflowed or came within 8x (3 binades) of
    65504, in forward order: where the overflow starts. A value that close to the top
    overflows as soon as anything downstream multiplies it by 8 (a residual sum, a square, a
    loss scale of 8)."""
    fp16 = set(fp16_compute_modules(ctx))
    act = ctx.samples("activation")
    if not fp16 or act.empty:
        return {}
    act = act[act["target"].astype(str).isin(fp16) & act["stat"].isin(["absmax", "nonfinite"])]
    info: dict[str, dict[str, Any]] = {}
    for (target, stat), grp in act.groupby([act["target"].astype(str), act["stat"].astype(str)]):
        m = info.setdefault(target, {"absmax": 0.0, "overflowed": False, "order": float(grp["index"].min())})
        v = float(grp["value"].max())
        if stat == "absmax":
            m["absmax"] = max(m["absmax"], v)
        elif v > 0:
            m["overflowed"] = True
    near = [(k, v) for k, v in info.items() if v["overflowed"] or v["absmax"] >= FP16_MAX / NEAR_FP16_MAX]
    near.sort(key=lambda kv: kv[1]["order"])
    return {k: {"absmax": v["absmax"], "overflowed": v["overflowed"]} for k, v in near[:limit]}
