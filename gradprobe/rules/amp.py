"""GP3xx: mixed precision (high-init-scale, fp16-overflow, amp-without-scaler, mixed-precision-active, scaler-misuse).

The mechanics these rules reason from. float16 holds magnitudes from 2**-24 (smallest
subnormal; below it a value is 0) to 65504 (about 2**16; above it a value is inf), normal
precision only from 2**-14 up. A GradScaler multiplies the loss by ``scale`` before backward
so that small gradients stay representable, checks the unscaled gradients for inf/NaN,
skips the optimizer step when it finds one, and in ``update()`` multiplies the scale by
``backoff_factor`` (0.5) after a skip or by ``growth_factor`` (2) after ``growth_interval``
(2000) clean steps in a row. A skipped step therefore means: some float16 value of that
backward (or forward) exceeded 65504 at that scale. The scaler's default ``init_scale`` of
2**16 is float16's own range: it starts as high as can make sense and backs off, one skipped
step per halving, until the gradients fit; that search is the calibration, not a fault.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    AUTOCAST_COMPUTE_CLASSES,
    FP16_MAX,
    FP16_MIN_NORMAL,
    RunContext,
    ScalerHistory,
    autocast_dtypes,
    autocast_modules,
    fp16_compute_modules,
    fp16_trained_modules,
    layer_forward_order,
    nonfinite_timeline,
    scaler_history,
    scaler_rows,
)
from gradprobe.report import Finding, Recommendation
from gradprobe.rules.base import Explanation, Rule, register
from gradprobe.rules.nonfinite import cause_present

#: Halvings (factor 2**8 = 256) between the initial scale and the scale the run settles at
#: from which the start is a "long burst" rather than the scaler calibrating (see GP301).
LONG_BURST_HALVINGS = 8
#: float16's range as a scale: 2**16 (~65504) is PyTorch's default init_scale, the largest
#: scale at which a gradient entry of 1 still fits.
FP16_MAX_SCALE = 2.0**16
#: Late skip rate (net of growth probes) above which skipping is sustained (see GP302).
LATE_SKIP_RATE = 0.01
LATE_SKIP_MIN = 3
#: Skipped steps whose unscaled loss was already inf/NaN: the forward itself overflowed.
FORWARD_OVERFLOW_MIN = 2

AMP_SNIPPET_BF16 = """\
# bfloat16 has float32's exponent range (max ~3.4e38): nothing overflows at 65504,
# and no GradScaler is needed.
with torch.autocast(device_type=device, dtype=torch.bfloat16):
    loss = loss_fn(model(x), y)
loss.backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)"""

SCALER_LOOP = """\
scaler = torch.amp.GradScaler(device){args}
for x, y in loader:
    with torch.autocast(device_type=device, dtype=torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)            # once per step, before clipping or inspecting grads
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)                # skips the step by itself on inf/NaN gradients
    scaler.update()                       # every iteration: this is what backs the scale off
    optimizer.zero_grad(set_to_none=True)"""


def _pow2_floor(x: float) -> float:
    return float(2.0 ** math.floor(math.log2(x))) if x > 0 and math.isfinite(x) else x


def _steps_list(h: ScalerHistory, positions: np.ndarray, limit: int = 12) -> list[int]:
    return [h.step_of(int(p)) for p in positions[:limit]]


def _uses_fp16_or_unknown(ctx: RunContext) -> bool:
    """Scale-driven overflow is a float16 phenomenon; with only bfloat16/float32 autocast a
    skipped step is a genuine inf/NaN (GP4xx), not float16's range."""
    dtypes = autocast_dtypes(ctx)
    return not dtypes or "float16" in dtypes


def _has_scale(ctx: RunContext) -> bool:
    return ("scaler" in ctx.signals or "loss_scale" in ctx.signals) and bool(scaler_rows(ctx).any())


def fp16_activation_overflow_steps(ctx: RunContext) -> list[tuple[int, str]]:
    """Sampled steps where the forward itself overflowed float16: the first module (in call
    order) whose output was non-finite is a module that computed in float16, while the
    model's input was finite and the parameters were still finite. A matmul/conv of finite
    numbers can only produce inf by exceeding 65504. Returns (step, module) pairs."""
    fp16 = set(fp16_trained_modules(ctx))
    act = ctx.samples("activation", "nonfinite")
    if not fp16 or act.empty:
        return []
    tl = nonfinite_timeline(ctx)
    inp = ctx.samples("input", "nonfinite")
    clean_input_steps = set(inp.loc[inp["value"] == 0, "step"].astype(int)) - set(
        inp.loc[inp["value"] > 0, "step"].astype(int))
    out = []
    for step, grp in act.groupby("step"):
        step = int(step)
        if step not in clean_input_steps or (tl.param_step is not None and step > tl.param_step):
            continue
        bad = grp[grp["value"] > 0]
        if bad.empty:
            continue
        first = str(bad.sort_values("index")["target"].iloc[0])
        if first in fp16:
            out.append((step, first))
    return out


def overflow_triggers(ctx: RunContext) -> dict[str, Any]:
    """The ways float16 overflow shows (GP302), shared with GP301 (a collapsing scale is not
    a high initial scale) and GP304 (nor calibration): in the scaler's history
    (``collapsed_below_1``, ``late_skipping``, ``forward_overflow``: skipped steps whose
    unscaled loss was inf/NaN) and in the sampled activations (``activation_overflow``: a
    float16 module produced the first inf of the forward; seen with or without a scaler,
    e.g. when the loop skips non-finite losses before the scaler sees them).

    Returns a dict with the triggered conditions, each mapped to (first_step, confidence).
    """
    store = ctx.__dict__.setdefault("_amp_cache", {})
    if "triggers" in store:
        return store["triggers"]
    out: dict[str, tuple[int, float]] = {}
    h = scaler_history(ctx)
    act = fp16_activation_overflow_steps(ctx)
    if act:
        store["activation_overflow"] = act
        out["activation_overflow"] = (act[0][0], min(1.0, 0.7 + 0.1 * len(act)))
    if h.n and _has_scale(ctx) and _uses_fp16_or_unknown(ctx):
        low = np.flatnonzero((h.scale_after <= 1.0) | (h.scale_before <= 1.0))
        if low.size:
            c = min(1.0, 0.7 + 0.05 * math.log2(1.0 / max(h.min_scale, 1e-30)))
            out["collapsed_below_1"] = (h.step_of(int(low[0])), c)
        if h.first_success is None and h.skipped.sum() >= LONG_BURST_HALVINGS and h.min_scale > 1.0:
            # not one step has succeeded: the scale is still falling. Below float16's own range
            # (2**16) by 8+ halvings, it is past any calibration: the unscaled values overflow
            below = math.log2(FP16_MAX_SCALE / h.min_scale) if h.min_scale > 0 else math.inf
            if below >= LONG_BURST_HALVINGS:
                c = 0.5 + 0.5 * min(1.0, (below - (LONG_BURST_HALVINGS - 1)) / 8.0)
                out["no_step_succeeded"] = (h.step_of(0), c)
        if h.late_excess_skips >= LATE_SKIP_MIN and h.late_rate >= LATE_SKIP_RATE and h.tail_excess_skips >= 1:
            late_skips = h.late[h.skipped[h.late]]
            c = 0.5 + 0.25 * min(1.0, h.late_excess_skips / 10.0) + 0.25 * min(1.0, h.late_rate / 0.1)
            out["late_skipping"] = (h.step_of(int(late_skips[0])), c)
        if h.forward_overflow.size >= FORWARD_OVERFLOW_MIN:
            tl = nonfinite_timeline(ctx)
            fo = h.forward_overflow
            if tl.input_observed_step is not None:  # NaN data, not float16's range
                fo = fo[h.steps[fo] < tl.input_observed_step]
            if fo.size >= FORWARD_OVERFLOW_MIN:
                c = min(1.0, 0.6 + 0.1 * fo.size)
                out["forward_overflow"] = (h.step_of(int(fo[0])), c)
                store["forward_overflow"] = fo
    store["triggers"] = out
    return out


def _collapsing(ctx: RunContext) -> bool:
    t = overflow_triggers(ctx)
    return any(k in t for k in ("collapsed_below_1", "late_skipping", "no_step_succeeded"))


def high_init(ctx: RunContext) -> dict[str, Any] | None:
    """GP301's condition, shared with GP304: the initial scale at least 2**8 above the settled
    scale, skips on the way down, and the scale held afterwards (not collapsing)."""
    if not _has_scale(ctx):
        return None
    h = scaler_history(ctx)
    if h.settled_scale is None or h.init_scale is None or h.settled_scale <= 0 or not h.calibration_skips.size:
        return None
    halvings = math.log2(h.init_scale / h.settled_scale)
    if halvings < LONG_BURST_HALVINGS - 1e-9 or _collapsing(ctx):
        return None
    return {"halvings": halvings}


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

    Confidence: 0.5 at the threshold, rising linearly to 1.0 at 16 halvings
    (0.5 + 0.5 * min(1, (halvings - 7) / 8)).
    """

    code = "GP301"
    slug = "high-init-scale"
    severity = "warning"
    title = "GradScaler starts far above the scale the run settles at"
    requires = ("scaler|loss_scale",)
    causes = ()
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
        conf = 0.5 + 0.5 * min(1.0, (halvings2 - (LONG_BURST_HALVINGS - 1)) / 8.0)
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
            nxt = h.skipped[g + 1 : g + 3]
            futile += int(nxt.any())
        p = futile / growth.size
        if p < 0.5:
            return None
        suggested = int(math.ceil(p / 1e-3)) - 1
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
    causes = ()
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
        trig = overflow_triggers(ctx)
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
        fo = ctx.__dict__["_amp_cache"].get("forward_overflow", h.forward_overflow[:0])
        if "forward_overflow" in trig:
            ev["forward_overflow_steps"] = _steps_list(h, fo)
        where = _overflowing_modules(ctx)
        layer = None
        if where:
            ev["modules_near_fp16_max"] = where
            layer = next(iter(where))
        xmax = _input_absmax(ctx)
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
        act = ctx.__dict__["_amp_cache"].get("activation_overflow", [])
        if act:
            ev["activation_overflow"] = [{"step": s_, "module": m_} for s_, m_ in act[:12]]
            parts.append(f"the forward's first inf came out of the float16 module {act[0][1]} at step {act[0][0]}, "
                         f"with finite inputs and parameters")
            layer = act[0][1]  # where the first inf was made: more precise than "near the maximum"
        caused_by: list[str] = []
        if xmax is not None and xmax >= FP16_MAX / 8:
            parts.append(f"the input itself reaches {xmax:.3g}, "
                         + ("beyond float16's 65504" if xmax >= FP16_MAX else "within 8x of float16's 65504")
                         + " (normalise it)")
            if cause_present(ctx, "input-scale", first):
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
                             recommendations=recs, caused_by=caused_by)]


def _overflowing_modules(ctx: RunContext, limit: int = 3) -> dict[str, dict[str, Any]]:
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
    near = [(k, v) for k, v in info.items() if v["overflowed"] or v["absmax"] >= FP16_MAX / 8]
    near.sort(key=lambda kv: kv[1]["order"])
    return {k: {"absmax": v["absmax"], "overflowed": v["overflowed"]} for k, v in near[:limit]}


def _input_absmax(ctx: RunContext) -> float | None:
    """Largest finite magnitude of the float features sampled where they enter the model: the
    first parametric layer's input, else the model's input (integer token ids excluded)."""
    for probe in ("first_layer", "input"):
        s = ctx.samples(probe)
        if s.empty:
            continue
        piv = s[s["stat"].isin(["absmax", "integer"])].pivot_table(
            index=["step", "target"], columns="stat", values="value", aggfunc="max")
        if "absmax" not in piv.columns:
            continue
        if "integer" in piv.columns:
            piv = piv[piv["integer"].fillna(0) == 0]
        v = piv["absmax"].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            return float(v.max())
    return None


# ------------------------------------------------------------------------------------------
@register
class AmpWithoutScaler(Rule):
    """Fires when matmul/conv/recurrent modules computed in float16 under autocast in the
    training forwards (their output was float16, and their sampled grad-enabled outputs are
    float16 numbers: float16 autocast used only for evaluation does not count) and no
    GradScaler scaled any step.

    Without a scale, every gradient value below 2**-24 (float16's smallest subnormal) becomes
    0 and values below 2**-14 (smallest normal) keep only a few bits. Evidence, per parameter
    of those float16 modules (an embedding or a module that never ran has no float16
    backward), over the steps with a finite non-zero loss (the gradient can only be 0
    legitimately when the loss is):

    * underflowed: the gradient norm was exactly 0 on at least half the steps the layer had
      a gradient (the whole tensor flushed to zero);
    * subnormal: the median per-entry RMS (norm / sqrt(numel)) is below 2**-14, float16's
      smallest normal value.

    Severity error with such evidence (confidence 0.6 + 0.4 * fraction of layers affected);
    otherwise warning, the configuration alone, with confidence from the measured headroom h
    (binades between the smallest layer's median RMS and 2**-14):
    0.5 + 0.4 * max(0, 1 - h / 10), i.e. near-certain when the gradients sit at the edge.
    """

    code = "GP303"
    slug = "amp-without-scaler"
    severity = "error"
    title = "float16 autocast without a GradScaler: gradients underflow to zero"
    requires = ("autocast",)
    causes = ()
    computes = {
        "init_scale": "largest power of two with max_layer_grad_norm * scale <= 65504 (the largest recorded "
        "gradient norm bounds every entry), capped at 2**16 (float16's range: a gradient entry of 1 overflows above)",
    }
    explanation = Explanation(
        what="Modules ran in float16 under autocast but no GradScaler scaled the loss, so small gradients "
        "underflow: below 6e-8 they become exactly zero, below 6.1e-5 they lose precision.",
        why="Layers whose gradients underflow stop learning (their gradient is zero) while the loss still looks "
        "finite, so the run silently trains only its last layers. It gets worse as the loss falls.",
        causes="torch.autocast(dtype=torch.float16) used without torch.amp.GradScaler; a scaler created with "
        "enabled=False; small losses (targets ~1e-4, a mean over many elements) under float16.",
        fix="Use a GradScaler with float16 (scaler.scale(loss).backward(); scaler.step(opt); scaler.update()), or "
        "autocast in bfloat16, which has float32's range and needs no scaler.",
        example="float16 autocast on targets of ~1e-4 without a scaler: the first two Linear layers get exactly zero "
        "gradients on every step; with GradScaler(init_scale=65536) they train.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        fp16 = fp16_trained_modules(ctx)  # float16 autocast used only for evaluation is no risk
        if not fp16 or scaler_rows(ctx).any():
            return []
        scalers = ctx.meta.get("scalers") or []
        if any(s.get("enabled", True) for s in scalers) and not (ctx.col("n_backward") > 0).any():
            return []  # a scaler exists; the loop never reached a backward it could have scaled
        stats = self._layer_stats(ctx)
        note = ""
        if scalers:
            enabled = any(s.get("enabled", True) for s in scalers)
            note = (" A GradScaler was created but never scaled a loss." if enabled
                    else " A GradScaler exists but is disabled (enabled=False).")
        ev: dict[str, Any] = {"fp16_modules": fp16[:20], "n_fp16_modules": len(fp16)}
        recs: list[Recommendation] = []
        gmax = max((s["max_norm"] for s in stats.values() if math.isfinite(s["max_norm"])), default=math.nan)
        if math.isfinite(gmax) and gmax > 0:
            init = min(2.0**16, _pow2_floor(FP16_MAX / gmax))
            ev["max_layer_grad_norm"] = gmax
            recs.append(Recommendation.hyperparameter(
                "init_scale", None, init,
                f"largest power of two keeping the largest recorded gradient norm ({gmax:.3g}) below float16's 65504, "
                f"capped at 2**16",
            ))
            snippet = SCALER_LOOP.format(args=f", init_scale={init:g}")
        else:
            snippet = SCALER_LOOP.format(args="")
        recs.insert(0, Recommendation.code("Scale the loss with a GradScaler", snippet))
        recs.append(Recommendation.code("Or autocast in bfloat16 (no scaler needed)", AMP_SNIPPET_BF16))
        underflow = {k: s for k, s in stats.items() if s["zero_frac"] >= 0.5}
        subnormal = {k: s for k, s in stats.items() if k not in underflow and 0 < s["rms"] < FP16_MIN_NORMAL}
        order = layer_forward_order(ctx)
        if underflow or subnormal:
            affected = list(underflow) + list(subnormal)
            frac = len(affected) / max(len(stats), 1)
            # backward runs output -> input: the most downstream affected layer is where it starts
            layer = max(affected, key=lambda n: order.get(n, 0.0))
            ev["underflowed_layers"] = {k: round(s["zero_frac"], 3) for k, s in list(underflow.items())[:20]}
            ev["subnormal_layers"] = {k: s["rms"] for k, s in list(subnormal.items())[:20]}
            ev["affected_fraction"] = round(frac, 3)
            firsts = [s["first_step"] for k, s in stats.items() if k in affected and s["first_step"] is not None]
            first = min(firsts) if firsts else None
            parts = []
            if underflow:
                parts.append(f"{len(underflow)} layer(s) got exactly zero gradients ({', '.join(list(underflow)[:4])})")
            if subnormal:
                parts.append(f"{len(subnormal)} layer(s) have gradients in float16's subnormal range "
                             f"(< {FP16_MIN_NORMAL:.2g} per entry: {', '.join(list(subnormal)[:4])})")
            msg = (f"{len(fp16)} module(s) computed in float16 without a GradScaler: " + "; ".join(parts)
                   + ". Those gradients underflowed: the layers do not learn." + note)
            return [self.finding(confidence=min(1.0, 0.6 + 0.4 * frac), message=msg, first_step=first, layer=layer,
                                 evidence=ev, recommendations=recs)]
        rms = [s["rms"] for s in stats.values() if s["rms"] > 0]
        first_step = min((m["first_step"] for n, m in autocast_modules(ctx).items() if n in fp16
                          and m["first_step"] is not None), default=None)
        if rms:
            headroom = math.log2(min(rms) / FP16_MIN_NORMAL)
            ev["headroom_binades"] = round(headroom, 2)
            conf = 0.5 + 0.4 * max(0.0, 1.0 - headroom / 10.0)
            tail = (f" The smallest layer gradient sits {headroom:.1f} binades above float16's normal range; as the "
                    f"loss falls it will underflow.")
        else:
            conf = 0.5
            tail = ""
        msg = f"{len(fp16)} module(s) computed in float16 under autocast without a GradScaler." + tail + note
        return [self.finding(confidence=conf, message=msg, first_step=first_step, evidence=ev, recommendations=recs,
                             severity="warning")]

    @staticmethod
    def _layer_stats(ctx: RunContext) -> dict[str, dict[str, Any]]:
        """Per-parameter underflow statistics, for the parameters of modules that computed
        in float16 (an embedding or a module never called has no float16 backward)."""
        lg = ctx.layer_grads()
        out: dict[str, dict[str, Any]] = {}
        if lg.empty or not len(lg.columns):
            return out
        fp16 = set(fp16_trained_modules(ctx))
        cols = [c for c in lg.columns
                if str(ctx.layer_info.get(str(c), {}).get("module") or str(c).rsplit(".", 1)[0]) in fp16]
        lg = lg[cols]
        if not cols:
            return out
        loss = _loss_at_steps(ctx, lg.index)
        use = np.isfinite(loss) & (loss != 0) if np.isfinite(loss).any() else np.ones(len(lg), bool)
        arr = lg.to_numpy(dtype=np.float64)[use]
        steps = lg.index.to_numpy()[use]
        for j, name in enumerate(lg.columns):
            v = arr[:, j]
            present = np.isfinite(v)
            if not present.any():
                continue
            vals = v[present]
            numel = ctx.layer_info.get(name, {}).get("numel") or 1
            zero = vals == 0
            nz = vals[vals > 0]
            rms = float(np.median(nz / math.sqrt(numel))) if nz.size else 0.0
            hit = present & ((v == 0) | (v / math.sqrt(numel) < FP16_MIN_NORMAL))
            first = int(steps[np.flatnonzero(hit)[0]]) if hit.any() else None
            out[str(name)] = {"zero_frac": float(zero.mean()), "rms": rms, "max_norm": float(vals.max()),
                              "first_step": first}
        return out


def _loss_at_steps(ctx: RunContext, index: Any) -> np.ndarray:
    """The loss aligned to a per-layer frame's step index (NaN where unknown)."""
    m = dict(zip(ctx.step.tolist(), ctx.loss.tolist()))
    return np.array([m.get(int(s), math.nan) for s in index], dtype=np.float64)


# ------------------------------------------------------------------------------------------
@register
class MixedPrecisionActive(Rule):
    """Info, whenever autocast was on in any module or an enabled GradScaler was configured
    (a disabled scaler alone is nothing in force): which dtype each module actually computed
    in, the scaler settings in force, and the skipped steps of the scaler's calibration.

    Not honoured: a matmul/conv/recurrent module (Linear, Conv*, RNN/GRU/LSTM and cells,
    MultiheadAttention) under float16/bfloat16 autocast whose output stayed float32 (on CPU,
    float16 autocast leaves GRU and the cells in float32), or whose forward raised (nn.LSTM
    under CPU float16 autocast); float16 autocast seen only in forwards without grad
    (evaluation; see ``fp16_trained_modules``); a GradScaler with autocast never on (it only
    costs); a scaler with bfloat16 (not needed). Calibration: the skips of the initial
    descent to the settled scale (fewer than GP301's 8 halvings, and the scale held: GP302's
    conditions not met).

    Confidence: 0.5 + 0.5 * coverage, where coverage is the fraction of autocast modules
    whose output dtype was observed (or, with no autocast, the fraction of steps that
    recorded a scale): how completely the configuration in force was seen.
    """

    code = "GP304"
    slug = "mixed-precision-active"
    severity = "info"
    title = "Mixed precision in force"
    requires = ("autocast",)
    causes = ()
    computes = {}
    explanation = Explanation(
        what="Which autocast dtype each module actually ran in, the GradScaler settings in force, and whether the "
        "skipped steps at the start are the scaler calibrating. Flags configurations that were not honoured.",
        why="Mixed-precision settings are easy to get silently wrong: a config flag that turns AMP off while a "
        "scaler is still created, a module autocast does not cover on this device, a scaler with bfloat16. A few "
        "skipped steps at the start are the scaler finding its scale, not instability.",
        causes="torch.autocast and torch.amp.GradScaler in the training loop.",
        fix="Nothing to fix unless a module is listed as not honoured: then run it in the dtype you meant "
        "explicitly, or accept float32 for it. Do not disable mixed precision because of the first skipped steps.",
        example="autocast(float16) on CPU: the Linear layers ran in float16, the GRU stayed float32; the scaler "
        "(init_scale 65536) skipped steps 2 and 18 while settling at 16384.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        mods = autocast_modules(ctx)
        scalers = ctx.meta.get("scalers") or []
        srows = scaler_rows(ctx)
        if not mods and not any(s.get("enabled", True) for s in scalers) and not srows.any():
            return []  # nothing in force (at most a disabled scaler)
        ev: dict[str, Any] = {}
        parts: list[str] = []
        notes: list[str] = []
        by_dtype: dict[str, list[str]] = {}
        not_honoured: list[str] = []
        failed: list[str] = []
        observed = 0
        compute = {n: m for n, m in mods.items() if m.get("class") in AUTOCAST_COMPUTE_CLASSES}
        for name, m in mods.items():
            outs = [o for o in m["output_dtypes"] if o is not None]
            if outs or (None in m["output_dtypes"] and ctx.events("exception")):
                observed += 1
            req = next((d for d in m["dtypes"] if d and d != "none"), None)
            if name in compute:
                by_dtype.setdefault(outs[-1] if outs else "failed", []).append(f"{name} ({m['class']})")
                if None in m["output_dtypes"] and not outs:
                    failed.append(f"{name} ({m['class']}): the forward raised under {req} autocast")
                elif req in ("float16", "bfloat16") and outs and req not in outs:
                    not_honoured.append(f"{name} ({m['class']}): {req} requested, output {', '.join(outs)}")
        if mods:
            ev["modules"] = {k: v[:20] for k, v in by_dtype.items()}
            ev["autocast_dtypes"] = sorted(autocast_dtypes(ctx))
            dt = ", ".join(f"{d}: {len(v)} module(s)" for d, v in by_dtype.items())
            parts.append(f"autocast {'/'.join(ev['autocast_dtypes'])} in force ({dt or 'no compute modules'})")
        if failed:
            excs = [e for e in ctx.events("exception")]
            if excs:
                failed = [f"{f} ({excs[0].get('type')}: {str(excs[0].get('message'))[:120]})" for f in failed]
            ev["failed"] = failed
            notes.append("Failed under autocast: " + "; ".join(failed) + ".")
        if not_honoured:
            ev["not_honoured"] = not_honoured
            notes.append("Not honoured: " + "; ".join(not_honoured)
                         + " (autocast does not cover this module on this device; it ran in float32).")
        if scalers:
            sc = scalers[0]
            ev["scaler"] = {k: sc.get(k) for k in ("enabled", "init_scale", "growth_factor", "backoff_factor",
                                                    "growth_interval")}
            enabled = any(s.get("enabled", True) for s in scalers)
            settings = ", ".join(f"{k}={sc.get(k):g}" for k in ("init_scale", "growth_factor", "backoff_factor",
                                                              "growth_interval") if isinstance(sc.get(k), (int, float)))
            parts.append(f"GradScaler({settings})" + ("" if enabled else " disabled (enabled=False)"))
            if enabled and not mods:
                notes.append("A GradScaler is enabled but no module ran under autocast: every tensor is float32, so "
                             "the scaler only multiplies and divides the gradients.")
            if enabled and mods and autocast_dtypes(ctx) == {"bfloat16"}:
                notes.append("bfloat16 has float32's range: the GradScaler is not needed.")
        calib = self._calibration(ctx)
        if calib:
            ev["calibration"] = calib
            if calib.get("see") == "high-init-scale":
                parts.append(f"the {calib['skipped_steps']} skipped steps at the start are more than calibration: "
                             f"see high-init-scale")
            elif calib.get("see") == "fp16-overflow":
                parts.append("the skipped steps are not calibration: see fp16-overflow")
            else:
                parts.append(
                    f"the {len(calib['skipped_steps'])} skipped step(s) at the start (steps "
                    f"{', '.join(map(str, calib['skipped_steps']))}) are the scaler calibrating: it backed off from "
                    f"{calib['from_scale']:g} to {calib['settled_scale']:g}, where the gradients fit in float16; "
                    f"not a fault")
        eval_only = sorted(set(fp16_compute_modules(ctx)) - set(fp16_trained_modules(ctx)))
        if eval_only:
            ev["fp16_eval_only"] = eval_only[:20]
            notes.append(f"float16 autocast covered only forwards without grad (evaluation) in "
                         f"{', '.join(eval_only[:4])}: training ran in float32 there.")
        if not scalers and not srows.any() and fp16_trained_modules(ctx):
            parts.append("no GradScaler (see amp-without-scaler)")
        if mods:
            coverage = observed / max(len(mods), 1)
        else:
            coverage = float(srows.mean()) if len(srows) else 0.0
        msg = "Mixed precision: " + "; ".join(parts) + "." + ("" if not notes else " " + " ".join(notes))
        first = min((m["first_step"] for m in mods.values() if m["first_step"] is not None), default=None)
        if first is None and srows.any():
            first = ctx.first_step_where(srows)
        return [self.finding(confidence=0.5 + 0.5 * coverage, message=msg, first_step=first, evidence=ev)]

    @staticmethod
    def _calibration(ctx: RunContext) -> dict[str, Any] | None:
        if not _has_scale(ctx):
            return None
        h = scaler_history(ctx)
        if high_init(ctx) is not None:
            return {"see": "high-init-scale", "skipped_steps": int(h.calibration_skips.size)}
        if _collapsing(ctx):
            return {"see": "fp16-overflow"}
        if h.settled_scale is None or h.init_scale is None or not h.calibration_skips.size:
            return None
        return {"skipped_steps": _steps_list(h, h.calibration_skips), "from_scale": h.init_scale,
                "settled_scale": h.settled_scale}


# ------------------------------------------------------------------------------------------
@register
class ScalerMisuse(Rule):
    """Fires on a GradScaler used against its protocol. Three findings, each from a direct
    recorder observation (no statistical threshold):

    * update() skipped after an overflow: scaled steps whose gradients were inf/NaN and that
      were discarded without ``scaler.update()`` (the recorder's ``abandoned`` rows, e.g. a
      ``continue`` on an inf norm), steps where the optimizer stepped without ``update()``, or
      the RuntimeError PyTorch raises on the next iteration ("unscale_() has already been
      called ..." / "step() has already been called ... since the last update()"). The
      scale only backs off in update(), so it stays too high and the overflow repeats.
      Error. Confidence 0.6 + 0.4 * (discarded overflows / all overflowing scaled steps): 1.0
      when the scaler never got to see any of them.
    * clipping on still-scaled gradients: ``clip_grad_norm_`` ran while the gradients were
      still multiplied by the scale (no ``unscale_`` first), so max_norm is effectively
      max_norm / scale. Error with a finite max_norm (warning with max_norm=inf, where only a
      logged norm is wrong). Confidence 0.7 + 0.3 * (scaled clips / all clips).
    * the scale set by hand: ``scaler._scale`` replaced or changed outside update(), or
      ``update(new_scale=...)``. Warning. Confidence 0.6 + 0.4 * min(1, steps affected / 3).
    """

    code = "GP305"
    slug = "scaler-misuse"
    severity = "error"
    title = "GradScaler used wrongly"
    requires = ("scaler",)
    causes = ()
    computes = {}
    explanation = Explanation(
        what="The GradScaler protocol broken: scaler.update() skipped after an overflow (a `continue` on an inf "
        "gradient norm), clip_grad_norm_ applied to gradients still multiplied by the scale (no scaler.unscale_ "
        "first), or the scale set by hand.",
        why="The scale only backs off inside update(): skip it on the overflowing steps and the scale never comes "
        "down, so every following step overflows and is thrown away. Clipping scaled gradients clips at "
        "max_norm / scale (65536x too hard at the default scale). A hand-set scale fights the scaler's own "
        "calibration and can leave it with a Python float.",
        causes="A NaN guard written for fp32 loops (`if not isfinite(norm): continue`) kept in an AMP loop; "
        "clipping copied from an fp32 loop; forcing the scale down by hand after an inf.",
        fix="Call scaler.unscale_(optimizer) before clipping, then scaler.step(optimizer) (it skips inf/NaN steps "
        "by itself) and scaler.update() on every iteration. Never assign scaler._scale; pick init_scale instead.",
        example="`if not torch.isfinite(norm): continue` before scaler.update(): 19 steps in a row overflow at scale "
        "1e9 and no update is ever applied.",
    )

    def check(self, ctx: RunContext) -> list[Finding]:
        srows = scaler_rows(ctx)
        if not srows.any() and not ctx.scaler:
            return []
        out: list[Finding] = []
        f = self._update_skipped(ctx, srows)
        if f is not None:
            out.append(f)
        f = self._clip_on_scaled(ctx, srows)
        if f is not None:
            out.append(f)
        f = self._scale_by_hand(ctx)
        if f is not None:
            out.append(f)
        return out

    def _update_skipped(self, ctx: RunContext, srows: np.ndarray) -> Finding | None:
        st = ctx.steps
        tl = nonfinite_timeline(ctx)
        abandoned = st["abandoned"].to_numpy(dtype=bool) & srows
        no_update = srows & ~st["scaler_updated"].to_numpy(dtype=bool) & (st["optimizer_steps"].to_numpy() > 0)
        # the run's last row may just be where it ended (killed, crashed) before update()
        not_last = np.arange(ctx.n) < ctx.n - 1
        discarded_overflow = tl.discarded_mask & (abandoned | not_last)
        excs = [e for e in ctx.events("exception") if "since the last update()" in str(e.get("message", ""))]
        if not discarded_overflow.any() and not no_update.any() and not excs:
            return None
        n_overflow_total = int((discarded_overflow | (ctx.skipped & srows)).sum())
        ev: dict[str, Any] = {
            "discarded_overflow_steps": int(discarded_overflow.sum()),
            "abandoned_steps": int(abandoned.sum()),
            "steps_without_update": int(no_update.sum()),
            "scaler_skipped_steps": int((ctx.skipped & srows).sum()),
        }
        idx = np.flatnonzero(discarded_overflow)
        first_candidates = []
        if idx.size:
            sb = ctx.col("scale_before")[idx]
            ev["first_discarded_steps"] = [ctx.step_at(int(i)) for i in idx[:12]]
            ev["scale_during_discarded"] = {"min": float(np.nanmin(sb)), "max": float(np.nanmax(sb))}
            first_candidates.append(ctx.step_at(int(idx[0])))
        if no_update.any():
            first_candidates.append(ctx.first_step_where(no_update))
        if excs:
            ev["exception"] = str(excs[0].get("message"))[:200]
            if isinstance(excs[0].get("step"), (int, float)):
                first_candidates.append(int(excs[0]["step"]))
        if n_overflow_total:
            conf = 0.6 + 0.4 * (int(discarded_overflow.sum()) / n_overflow_total)
        else:
            conf = 0.8 if excs else 0.6 + 0.4 * min(1.0, int(no_update.sum()) / 3)
        parts = []
        if idx.size:
            lo, hi = ev["scale_during_discarded"]["min"], ev["scale_during_discarded"]["max"]
            stuck = "never backed off: it stayed at " + f"{hi:g}" if lo == hi else f"stayed between {lo:g} and {hi:g}"
            parts.append(f"{idx.size} step(s) with inf/NaN gradients were discarded without scaler.update(), so the "
                         f"scale {stuck}")
        if no_update.any():
            parts.append(f"{int(no_update.sum())} optimizer step(s) ran without scaler.update()")
        if excs:
            parts.append("the loop crashed with \"unscale_() has already been called on this optimizer since the "
                         "last update()\" (unscale_ ran, then the iteration was skipped without update())")
        msg = "; ".join(parts) + ". The scale only backs off inside update(); call it every iteration."
        return self.finding(
            confidence=conf, message=msg, first_step=min(first_candidates) if first_candidates else None, evidence=ev,
            title="scaler.update() skipped after an overflow",
            recommendations=[Recommendation.code(
                "Let the scaler handle inf/NaN steps: unscale_, clip, step, update every iteration",
                SCALER_LOOP.format(args=""),
            )],
        )

    def _clip_on_scaled(self, ctx: RunContext, srows: np.ndarray) -> Finding | None:
        st = ctx.steps
        cos = st["clip_on_scaled"].to_numpy(dtype=bool)
        if not cos.any():
            return None
        clips = (st["clip_calls"].to_numpy() > 0) | cos
        mn = ctx.col("clip_max_norm")[cos]
        mn = mn[np.isfinite(mn) | np.isinf(mn)]
        max_norm = float(np.median(mn)) if mn.size else math.nan
        sb = ctx.col("scale_before")[cos]
        sb = sb[np.isfinite(sb)]
        scale = float(np.median(sb)) if sb.size else math.nan
        frac = float(cos.sum() / max(int(clips.sum()), 1))
        ev: dict[str, Any] = {"scaled_clip_steps": int(cos.sum()), "fraction_of_clips": round(frac, 3),
                              "max_norm": max_norm, "median_scale": scale}
        infinite = math.isinf(max_norm)
        if math.isfinite(max_norm) and math.isfinite(scale) and scale > 0:
            ev["effective_max_norm"] = max_norm / scale
            eff = (f": with the scale at {scale:g}, max_norm={max_norm:g} clips the real gradient at "
                   f"{max_norm / scale:.3g}")
        else:
            eff = ""
        msg = (f"clip_grad_norm_ ran on gradients still multiplied by the GradScaler's scale on {int(cos.sum())} "
               f"step(s){eff}" + (" (max_norm=inf: only the norm you log is scaled)" if infinite else "")
               + ". Call scaler.unscale_(optimizer) before clipping.")
        return self.finding(
            confidence=0.7 + 0.3 * frac, message=msg, first_step=ctx.first_step_where(cos), evidence=ev,
            severity="warning" if infinite else "error", title="Gradients clipped while still scaled",
            recommendations=[Recommendation.code(
                "Unscale before clipping",
                "scaler.scale(loss).backward()\nscaler.unscale_(optimizer)\n"
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})\n"
                "scaler.step(optimizer)\nscaler.update()",
            )],
        )

    def _scale_by_hand(self, ctx: RunContext) -> Finding | None:
        tam = ctx.steps["scale_tampered"].to_numpy(dtype=bool)
        evs = ctx.events("scaler_misuse")
        if not tam.any() and not evs:
            return None
        whats = sorted({str(e.get("what")) for e in evs})
        n = max(int(tam.sum()), len(evs))
        first = ctx.first_step_where(tam)
        ev_steps = [int(e["step"]) for e in evs if isinstance(e.get("step"), (int, float))]
        if ev_steps:
            first = min([first] + ev_steps) if first is not None else min(ev_steps)
        ev = {"tampered_steps": int(tam.sum()), "events": whats,
              "details": sorted({str(e.get("detail")) for e in evs if e.get("detail")})[:5]}
        msg = (f"The GradScaler's scale was set by hand on {n} step(s) ({', '.join(whats) or 'scale_tampered'}). "
               "update() already backs the scale off after every overflow and grows it back; a hand-set scale "
               "fights that and can leave _scale as a Python float.")
        return self.finding(
            confidence=0.6 + 0.4 * min(1.0, n / 3), message=msg, first_step=first, evidence=ev, severity="warning",
            title="GradScaler scale set by hand",
            recommendations=[Recommendation.code(
                "Do not touch scaler._scale; choose the start and let update() adapt",
                "scaler = torch.amp.GradScaler(device, init_scale=...)  # instead of scaler._scale = ...\n"
                "...\nscaler.step(optimizer)\nscaler.update()  # backs off by itself after an inf",
            )],
        )
