"""GP305: the GradScaler protocol broken (scaler-misuse)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis import RunContext, nonfinite_timeline, scaler_rows
from gradprobe.rules.base import Confidence, Explanation, Field, Finding, Ramp, Recommendation, Rule, register
from gradprobe.rules.snippets import SCALER_LOOP


#: GP305 is final when the last this-many scaled steps were all discarded overflows at a scale
#: that never moved: the loop's skip path has taken over and nothing in it can lower the scale.
FINAL_DISCARDED_TAIL = 3
#: Each misuse is a direct observation (0.6); a count of them is a pattern from this many steps.
PATTERN_STEPS = 3
#: How many discarded steps, details and characters of an error message the evidence keeps.
SHOWN_STEPS = 12
SHOWN_DETAILS = 5
MESSAGE_CHARS = 200


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
      Error. Confidence: whole when the scaler never got to see any of the overflowing steps
      (the share it did not see, from 0.6); without overflows, from the crash message or from
      how many steps ran without update() (a pattern from ``PATTERN_STEPS``).
    * clipping on still-scaled gradients: ``clip_grad_norm_`` ran while the gradients were
      still multiplied by the scale (no ``unscale_`` first), so max_norm is effectively
      max_norm / scale. Error with a finite max_norm (warning with max_norm=inf, where only a
      logged norm is wrong). Confidence: from 0.7 (the recorder saw the scale on the clipped
      gradients), whole when every clip was on scaled gradients.
    * the scale set by hand: ``scaler._scale`` replaced or changed outside update(), or
      ``update(new_scale=...)``. Warning. Confidence: a pattern from ``PATTERN_STEPS`` steps.
    """

    code = "GP305"
    slug = "scaler-misuse"
    severity = "error"
    title = "GradScaler used wrongly"
    severities = {
        "error": "update() skipped after an overflow, or clipping at a finite max_norm on still-scaled gradients",
        "warning": "clipping with max_norm=inf on still-scaled gradients (only a logged norm is wrong), or the "
                   "scale set by hand",
    }
    requires = ("scaler",)
    confidence = {
        "update() skipped, overflows": Confidence(0.6, Ramp(0.4, "discarded overflows / all overflowing scaled steps")),
        "update() skipped, the crash": Confidence(0.8),
        "update() skipped, steps without it": Confidence(0.6, Ramp(0.4, "steps without update()", span=PATTERN_STEPS)),
        "clipping on scaled gradients": Confidence(0.7, Ramp(0.3, "scaled clips / all clips")),
        "scale set by hand": Confidence(0.6, Ramp(0.4, "steps affected", span=PATTERN_STEPS)),
    }
    final_when = ("update() is skipped on every overflowing step through the end at a scale that never backed off: "
                  "the scale only backs off inside update(), so every following step overflows too")
    evidence_fields = {
        "discarded_overflow_steps": Field("overflowing steps discarded without update()", "steps"),
        "abandoned_steps": Field("abandoned steps", "steps"),
        "steps_without_update": Field("optimizer steps without update()", "steps"),
        "scaler_skipped_steps": Field("skipped by the scaler", "steps"),
        "first_discarded_steps": Field("first discarded", "step"),
        "scale_during_discarded": Field("scale while discarding", "scale"),
        "exception": Field("error"),
        "scaled_clip_steps": Field("clips on scaled gradients", "steps"),
        "fraction_of_clips": Field("of the clips", "%"),
        "max_norm": Field("max_norm", "norm"),
        "median_scale": Field("median scale", "scale"),
        "effective_max_norm": Field("effective max_norm", "norm"),
        "tampered_steps": Field("steps with a hand-set scale", "steps"),
        "events": Field("what was done"),
        "details": Field("details"),
    }
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
            ev["first_discarded_steps"] = [ctx.step_at(int(i)) for i in idx[:SHOWN_STEPS]]
            ev["scale_during_discarded"] = {"min": float(np.nanmin(sb)), "max": float(np.nanmax(sb))}
            first_candidates.append(ctx.step_at(int(idx[0])))
        if no_update.any():
            first_candidates.append(ctx.first_step_where(no_update))
        if excs:
            ev["exception"] = str(excs[0].get("message"))[:MESSAGE_CHARS]
            if isinstance(excs[0].get("step"), (int, float)):
                first_candidates.append(int(excs[0]["step"]))
        if n_overflow_total:
            conf = self.confidence["update() skipped, overflows"](int(discarded_overflow.sum()) / n_overflow_total)
        elif excs:
            conf = self.confidence["update() skipped, the crash"]()
        else:
            conf = self.confidence["update() skipped, steps without it"](int(no_update.sum()))
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
        # final: the overflowing steps keep being discarded through the end at a scale that never moved
        scaled = np.flatnonzero(srows)
        tail = scaled[-FINAL_DISCARDED_TAIL:]
        final = bool(idx.size >= FINAL_DISCARDED_TAIL and tail.size == FINAL_DISCARDED_TAIL
                     and discarded_overflow[tail].all()
                     and ev["scale_during_discarded"]["min"] == ev["scale_during_discarded"]["max"])
        return self.finding(final=final, 
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
            confidence=self.confidence["clipping on scaled gradients"](frac), message=msg,
            first_step=ctx.first_step_where(cos), evidence=ev,
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
              "details": sorted({str(e.get("detail")) for e in evs if e.get("detail")})[:SHOWN_DETAILS]}
        msg = (f"The GradScaler's scale was set by hand on {n} step(s) ({', '.join(whats) or 'scale_tampered'}). "
               "update() already backs the scale off after every overflow and grows it back; a hand-set scale "
               "fights that and can leave _scale as a Python float.")
        return self.finding(
            confidence=self.confidence["scale set by hand"](n), message=msg, first_step=first, evidence=ev,
            severity="warning",
            title="GradScaler scale set by hand",
            recommendations=[Recommendation.code(
                "Do not touch scaler._scale; choose the start and let update() adapt",
                "scaler = torch.amp.GradScaler(device, init_scale=...)  # instead of scaler._scale = ...\n"
                "...\nscaler.step(optimizer)\nscaler.update()  # backs off by itself after an inf",
            )],
        )
