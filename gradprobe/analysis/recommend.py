"""Recommendations that are sane by construction.

Rules compute hyperparameter values from the healthy part of a run (:func:`healthy_rows`) and
hand the engine a :class:`Computed`; the engine then checks every suggested value against what
the run shows (:func:`implausible`). A value that fails is not printed: the recommendation says
why none is suggested, never a guess."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradprobe.analysis.context import RunContext
from gradprobe.analysis.loss import healthy_rows

#: An lr suggestion more than this many decades from the lr the run used is not computed from
#: the run: the update-to-weight ratio it is scaled from is then not the lr's doing (a gradient
#: that is exactly zero, or exploded), and extrapolating it that far is a guess.
MAX_LR_DECADES = 4.0
#: float16's range as a loss scale: no gradient can use a scale above 2**24 (a gradient entry
#: of 2**-24, float16's smallest subnormal, already reaches 1 there).
MAX_INIT_SCALE = 2.0**24
#: Decoupled weight decay shrinks the weights by lr x weight_decay per step; beyond 1% per step
#: it erases what they learn faster than the gradient can teach it.
MAX_DECAY_PER_STEP = 0.01
AMP_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Computed:
    """A number computed from the run for a recommendation, or why it could not be."""

    value: Any = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.value is not None


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def implausible(ctx: RunContext, name: str, current: Any, suggested: Any) -> str | None:
    """Why ``suggested`` for hyperparameter ``name`` cannot be right for this run (None when
    it is plausible): not a finite number of the right kind, no change from ``current``, or
    outside what the healthy part of the run shows."""
    if name == "amp_dtype":
        if suggested not in AMP_DTYPES:
            return f"{suggested!r} is not a dtype autocast runs in"
        return "it is the dtype in use" if suggested == current else None
    v = _number(suggested)
    if v is None:
        return "the computed value is not a finite number"
    cur = _number(current)
    if cur is not None and v == cur:
        return "it equals the current value"
    if name in ("lr", "max_norm", "init_scale", "growth_factor", "weight_decay") and v <= 0:
        return f"a {name} must be positive (computed {v:g})"
    if name in ("lookback", "warmup_steps", "growth_interval", "hidden_size", "batch_size"):
        if v < 1 or v != int(v):
            return f"a {name} is a positive whole number (computed {v:g})"
    if name == "lr" and cur is not None and cur > 0 and abs(math.log10(v / cur)) > MAX_LR_DECADES:
        return (f"{v:.3g} is {abs(math.log10(v / cur)):.1f} decades from the lr in use ({cur:.3g}): the measured "
                "steps are not the learning rate's doing alone")
    if name == "max_norm":
        norms = ctx.grad_norm[healthy_rows(ctx) & np.isfinite(ctx.grad_norm) & ~ctx.skipped]
        if norms.size and v > float(norms.max()):
            return (f"{v:.3g} is above every gradient norm of the healthy part of the run (largest "
                    f"{float(norms.max()):.3g})")
    if name == "init_scale" and v > MAX_INIT_SCALE:
        return f"{v:g} is above 2**24, a scale no float16 gradient can use"
    if name == "lookback" and cur is not None and v > cur:
        return f"{v:g} is longer than the current window ({cur:g})"
    if name == "warmup_steps" and ctx.n and v > int(ctx.step[-1]) + 1:
        return f"{v:g} steps is longer than the run ({int(ctx.step[-1]) + 1} steps)"
    if name == "weight_decay":
        lr = ctx.lr0
        if lr and lr > 0 and v * lr > MAX_DECAY_PER_STEP:
            return (f"{v:g} x lr {lr:.3g} decays the weights by more than {MAX_DECAY_PER_STEP:.0%} per step, "
                    "which erases what they learn")
    return None
