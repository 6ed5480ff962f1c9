"""What the gradient rescalings recorded over a run were: a clip, a constant factor, or none seen.

Reads three step columns the recorder writes (:mod:`gradprobe.probe.gradients`):
``grad_norm`` (the gradient as the last backward of the step left it, unscaled),
``step_grad_norm`` (the gradient the optimizer stepped with) and ``grad_change`` (-1 not
compared, 0 unchanged, 1 rescaled uniformly, 2 changed otherwise). Whoever rescaled the
gradient (``clip_grad_norm_``, accelerate, Lightning, DeepSpeed, a hand-written
``p.grad.mul_(c)``), its shape over the run tells what it was:

* a **clip** leaves the gradient unchanged while its norm is below ``max_norm`` and brings
  it to ``max_norm`` otherwise: on the rescaled steps the post-rescaling norm is constant,
  and no unchanged step's norm is above it;
* a **constant factor** (``scaler.unscale_`` seen as a rescaling, a fused optimizer's
  in-place unscaling, a division by the accumulation count) scales every step by the same
  factor;
* anything else uniform (a clip whose ``max_norm`` changes, several optimizers clipping
  apart) is a **rescaling** of neither shape, and changes that are not uniform across the
  layers (``clip_grad_value_``, per-layer clipping) are **changed**.

A clip that never fires changes nothing: "none observed" means *unknown*, not "no clipping".
Torch-free (numpy only): the analysis can use it on any run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: relative tolerance of "constant": a clip's post-clip norm is ``max_norm * n / (n + 1e-6)``
#: (``clip_grad_norm_``'s epsilon: 0.1% off for a pre-clip norm n of 1e-3) and float32
#: norms; half-precision gradients widen it to their own tolerance (see classify_log)
RTOL = 2e-3

CLIP = "clip"
FACTOR = "factor"
RESCALED = "rescaled"
CHANGED = "changed"
NONE_OBSERVED = "none observed"
NOT_COMPARED = "not compared"


@dataclass
class Rescaling:
    """The rescalings of a run.

    Attributes:
        kind: ``clip``, ``factor``, ``rescaled``, ``changed``, ``none observed`` (steps were
            compared and none changed: clipping is unknown), or ``not compared`` (no step
            could be: a foreign log, manual updates without an optimizer).
        max_norm: the clip's ``max_norm`` as its effect shows it (median post-clip norm).
        factor: the constant factor.
        compared: steps compared (finite norms).
        rescaled: steps rescaled uniformly; ``changed``: steps changed otherwise.
        mask: per row of the input, the step was rescaled uniformly.
    """

    kind: str
    max_norm: float | None = None
    factor: float | None = None
    compared: int = 0
    rescaled: int = 0
    changed: int = 0
    mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def clipping_known(self) -> bool:
        """Whether the run's clipping is known: seen firing, or known absent from a changed
        gradient (never from a run where nothing changed)."""
        return self.kind in (CLIP, FACTOR, RESCALED, CHANGED)


def _spread(x: np.ndarray) -> float:
    hi = float(np.max(np.abs(x)))
    return float(np.max(x) - np.min(x)) / hi if hi > 0 else 0.0


def classify(grad_norm: Any, step_grad_norm: Any, grad_change: Any, *, rtol: float = RTOL) -> Rescaling:
    """The :class:`Rescaling` of a run from its per-step columns (array-likes, one per step)."""
    pre = np.asarray(grad_norm, dtype=np.float64)
    post = np.asarray(step_grad_norm, dtype=np.float64)
    change = np.asarray(grad_change, dtype=np.int64)
    with np.errstate(all="ignore"):
        compared = (change >= 0) & np.isfinite(pre) & np.isfinite(post) & (pre > 0)
    rescaled = compared & (change == 1)
    other = compared & (change == 2)
    out = Rescaling(kind=NOT_COMPARED, compared=int(compared.sum()), rescaled=int(rescaled.sum()),
                    changed=int(other.sum()), mask=rescaled)
    if not compared.any():
        return out
    if not rescaled.any() and not other.any():
        out.kind = NONE_OBSERVED
        return out
    if other.sum() > rescaled.sum():
        out.kind = CHANGED
        return out
    p = post[rescaled]
    f = p / pre[rescaled]
    level = float(np.median(p))
    unchanged = compared & ~rescaled & ~other
    clip = _spread(p) <= rtol and bool(np.all(pre[unchanged] <= level * (1 + rtol)))
    factor = _spread(f) <= rtol and not unchanged.any()
    if clip and factor:
        # one post-clip norm and one factor: the pre-rescaling norm was constant too, which
        # tells them apart only if some step was left unchanged below that level
        clip = False
        factor = False
    if clip:
        out.kind, out.max_norm = CLIP, level
    elif factor:
        out.kind, out.factor = FACTOR, float(np.median(f))
    else:
        out.kind = RESCALED
    return out


def classify_log(log: Any) -> Rescaling:
    """:func:`classify` on a :class:`gradprobe.RunLog` (a recorder run directory), with the
    tolerance widened to its widest gradient dtype's."""
    steps = log.steps
    if "grad_change" not in steps:
        return Rescaling(kind=NOT_COMPARED)
    return classify(steps["grad_norm"], steps["step_grad_norm"], steps["grad_change"], rtol=_log_rtol(log.meta))


#: relative tolerance of a rescaled norm per gradient dtype: 8 units of roundoff (see
#: gradprobe.probe.discovery.grad_tolerance)
_DTYPE_RTOL = {"float16": 8 * 2.0**-11, "bfloat16": 8 * 2.0**-8}


def _log_rtol(meta: dict[str, Any]) -> float:
    rtol = RTOL
    for seg in meta.get("layer_segments") or []:
        layers = seg.get("layers") if isinstance(seg, dict) else None
        for layer in layers if isinstance(layers, list) else []:
            if isinstance(layer, dict):
                rtol = max(rtol, _DTYPE_RTOL.get(str(layer.get("dtype")), RTOL))
    return rtol
