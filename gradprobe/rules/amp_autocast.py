"""GP303-GP304: autocast (amp-without-scaler, mixed-precision-active).

float16 holds magnitudes from 2**-24 (smallest subnormal; below it a value is 0) to 65504;
normal precision only from 2**-14 up. Without a GradScaler small gradients fall below that
range; with autocast, which module actually computed in which dtype depends on the module and
the device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import (
    AUTOCAST_COMPUTE_CLASSES,
    FP16_MAX,
    FP16_MAX_SCALE,
    FP16_MIN_NORMAL,
    RunContext,
    ScalerHistory,
    autocast_dtypes,
    autocast_modules,
    fp16_compute_modules,
    fp16_trained_modules,
    has_scale,
    high_init,
    layer_forward_order,
    layer_grads,
    overflow_triggers,
    scaler_history,
    scaler_rows,
)
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register
from gradprobe.rules.snippets import AMP_SNIPPET_BF16, SCALER_LOOP

#: How many skipped steps the evidence lists.
SHOWN_STEPS = 12
#: GP303: binades of headroom above float16's normal range at which a run without a scaler is
#: no more likely to underflow than any other: the loss falls by orders of magnitude over a run
#: and the gradients with it, so within 10 binades (1000x) of the edge underflow is a matter of time.
HEADROOM_BINADES = 10.0


def _pow2_floor(x: float) -> float:
    return float(2.0 ** math.floor(math.log2(x))) if x > 0 and math.isfinite(x) else x


def _steps_list(h: ScalerHistory, positions: np.ndarray, limit: int = SHOWN_STEPS) -> list[int]:
    return [h.step_of(int(p)) for p in positions[:limit]]


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

    Severity error with such evidence (underflow is measured: confidence from 0.6, whole when
    every layer is affected); otherwise warning, the configuration alone, with confidence from
    the measured headroom (binades between the smallest layer's median RMS and 2**-14): 0.5
    (the configuration is a risk, not yet a fault), near-certain when the gradients sit at the
    edge.
    """

    code = "GP303"
    slug = "amp-without-scaler"
    severity = "error"
    title = "float16 autocast without a GradScaler: gradients underflow to zero"
    severities = {
        "error": "gradients of float16 layers underflowed (exactly zero, or below float16's normal range)",
        "warning": "float16 layers without a scaler whose gradients still fit (the configuration alone)",
    }
    requires = ("autocast",)
    confidence = {
        "underflow": Confidence(0.6, Ramp(0.4, "fraction of layers affected")),
        "configuration": Confidence(0.5, Ramp(0.4, "headroom", span=HEADROOM_BINADES, falling=True)),
        "configuration, no gradient measured": Confidence(0.5),
    }
    evidence_fields = {
        "fp16_modules": Field("float16 modules"),
        "n_fp16_modules": Field("float16 modules"),
        "max_layer_grad_norm": Field("largest layer gradient norm", "norm"),
        "underflowed_layers": Field("layers with zero gradients (fraction of steps)"),
        "subnormal_layers": Field("layers in the subnormal range (gradient RMS)"),
        "affected_fraction": Field("layers affected", "%"),
        "headroom_binades": Field("headroom above float16's normal range", "binades"),
    }
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
            init = min(FP16_MAX_SCALE, _pow2_floor(FP16_MAX / gmax))
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
            return [self.finding(confidence=self.confidence["underflow"](frac), message=msg, first_step=first, layer=layer,
                                 evidence=ev, recommendations=recs)]
        rms = [s["rms"] for s in stats.values() if s["rms"] > 0]
        first_step = min((m["first_step"] for n, m in autocast_modules(ctx).items() if n in fp16
                          and m["first_step"] is not None), default=None)
        if rms:
            headroom = math.log2(min(rms) / FP16_MIN_NORMAL)
            ev["headroom_binades"] = round(headroom, 2)
            conf = self.confidence["configuration"](headroom)
            tail = (f" The smallest layer gradient sits {headroom:.1f} binades above float16's normal range; as the "
                    f"loss falls it will underflow.")
        else:
            conf = self.confidence["configuration, no gradient measured"]()
            tail = ""
        msg = f"{len(fp16)} module(s) computed in float16 under autocast without a GradScaler." + tail + note
        return [self.finding(confidence=conf, message=msg, first_step=first_step, evidence=ev, recommendations=recs,
                             severity="warning")]

    @staticmethod
    def _layer_stats(ctx: RunContext) -> dict[str, dict[str, Any]]:
        """Per-parameter underflow statistics, for the parameters of modules that computed
        in float16 (an embedding or a module never called has no float16 backward)."""
        lg = layer_grads(ctx)
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

    Confidence: how completely the configuration in force was seen. Coverage: the fraction of
    autocast modules whose output dtype was observed (or, with no autocast, the fraction of
    steps that recorded a scale).
    """

    code = "GP304"
    slug = "mixed-precision-active"
    severity = "info"
    title = "Mixed precision in force"
    requires = ("autocast",)
    confidence = Confidence(0.5, Ramp(0.5, "coverage"))
    evidence_fields = {
        "modules": Field("modules by dtype"),
        "autocast_dtypes": Field("autocast dtypes"),
        "failed": Field("failed under autocast"),
        "not_honoured": Field("not honoured"),
        "scaler": Field("GradScaler"),
        "calibration": Field("scaler calibration"),
        "fp16_eval_only": Field("float16 in evaluation only"),
    }
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
        return [self.finding(confidence=self.confidence(coverage), message=msg, first_step=first, evidence=ev)]

    @staticmethod
    def _calibration(ctx: RunContext) -> dict[str, Any] | None:
        if not has_scale(ctx):
            return None
        h = scaler_history(ctx)
        if high_init(ctx) is not None:
            return {"see": "high-init-scale", "skipped_steps": int(h.calibration_skips.size)}
        if overflow_triggers(ctx).collapsing:
            return {"see": "fp16-overflow"}
        if h.settled_scale is None or h.init_scale is None or not h.calibration_skips.size:
            return None
        return {"skipped_steps": _steps_list(h, h.calibration_skips), "from_scale": h.init_scale,
                "settled_scale": h.settled_scale}
