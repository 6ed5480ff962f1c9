"""The gradient as the last backward of a step left it, and the gradient the optimizer steps with.

Clipping is seen by its effect, whoever clips (``clip_grad_norm_``, accelerate, Lightning,
DeepSpeed, a hand-written ``p.grad.mul_(c)``): the per-layer 2-norms of the gradients right
after each backward (*A*, unscaled when a GradScaler scaled the loss) are compared with those
the optimizer steps with (*B*). The comparison point is after the last backward of the step:
the optimizer's pre-step hook when a backward came before it, else its post-step hook (LBFGS
and Lightning's automatic optimization run backward and clip inside the closure, after the
pre-step hook). *B* costs no pass over the gradients when nothing changed them: every
gradient's tensor and ``_version`` are noted after the backward and moved on by the changes the
probe observes itself (a ``clip_grad_norm_`` call, whose coefficient the record keeps, and
``scaler.unscale_``, which *A* already accounts for); only a gradient changed otherwise is
measured again at the comparison point.

Per optimizer, the record keeps the layers compared, the observed clips of each, and whether
*B* was measured; the writer works out (:mod:`gradprobe.probe.buffer`) the step's
``step_grad_norm`` and ``grad_change``: unchanged, rescaled uniformly (every layer by one
factor, within a tolerance for the gradient's dtype), or changed otherwise. A clip yields a
constant post-clip norm, ``scaler.unscale_``, a fused optimizer's in-place unscaling or a
division by an accumulation count a constant factor (see :mod:`gradprobe.probe.rescaling`).
A clip that never fires changes nothing: a run where no rescaling is seen may or may not clip.

Nothing here reads a device value: norms stay 0-d device tensors; versions are host integers.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from gradprobe._guard import guarded

if TYPE_CHECKING:
    from gradprobe.probe.context import Context
    from gradprobe.probe.discovery import Discovery, LayerInfo, OptInfo

#: a gradient's state: (a weak reference to the tensor, its ``_version``). Not its ``id``:
#: ``zero_grad(set_to_none=True)`` frees a gradient and the next backward's often lands at
#: the same address, with the same version
_State = tuple[Any, int]


def state_of(g: torch.Tensor) -> _State:
    return weakref.ref(g), g._version


def same(s: _State | None, g: torch.Tensor) -> bool:
    """``g`` is the tensor of state ``s``, unchanged since."""
    return s is not None and s[0]() is g and s[1] == g._version


class Gradients:
    """Per-layer gradient norms after each backward (*A*), committed to the step at the
    comparison point with the gradient the optimizer steps with (*B*)."""

    def __init__(self, ctx: "Context", discovery: "Discovery") -> None:
        self.ctx = ctx
        self.guard = ctx.guard
        self.disc = discovery
        self.epoch = 0  # backward passes ended
        self.clip_count = 0  # ordinals of observed clip calls (unique in the probe's life)
        self.local_norms: dict[int, torch.Tensor] = {}  # DDP: this rank's gradient norms
        self.handles: list[Any] = []
        self.reset([])

    def reset(self, layers: list["LayerInfo"]) -> None:
        """A new layout: nothing measured yet."""
        n = len(layers)
        self.a: list[torch.Tensor | None] = [None] * n  # A's norm per layer (0-d float32, unscaled)
        self.a_state: list[_State | None] = [None] * n  # the gradient's state when A was measured
        # the state the gradient has if only observed changes touched it since A
        self.expected: list[_State | None] = [None] * n
        self.clips: list[tuple[int, ...]] = [()] * n  # observed clips applied since A (ordinals)
        self.fresh: list[bool] = [False] * n  # A measured and not committed to a step yet
        self.committed: list[int] = [-1] * n  # the step A was last committed to
        self.numel: list[int] = [int(layer.param.numel()) for layer in layers]
        self.checked: dict[tuple[int, ...], int] = {}  # a group's layer checked when B is derived

    # ----------------------------------------------------------------------- measuring -----
    def norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor 2-norms as 0-d float32 tensors on the probe's device, from one
        ``_foreach_norm`` pass when the tensors share a device (not stacked here: the closed
        step's record stacks all its 0-d values at once, see ``StepRecord.compact``)."""
        device = self.ctx.device
        with torch.no_grad():
            if not any(t.is_sparse for t in tensors):
                dev = tensors[0].device
                if all(t.device == dev for t in tensors):
                    try:
                        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
                    except (TypeError, RuntimeError):
                        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
                    return norms if dev == device else [n.to(device, non_blocking=True) for n in norms]
            norms = []
            for t in tensors:
                v = t.coalesce().values() if t.is_sparse else t
                norms.append(torch.linalg.vector_norm(v, dtype=torch.float32).to(device, non_blocking=True))
            return norms

    def _measured(self, grads: list[torch.Tensor], scale: torch.Tensor | None) -> list[torch.Tensor]:
        norms = self.norms(grads)
        if scale is not None:
            with torch.no_grad():
                norms = list(torch._foreach_div(norms, scale.to(norms[0].device)))
        return norms

    def after_backward(self, scale: torch.Tensor | None) -> None:
        """A: the norm of every gradient this backward changed (``scale``: the GradScaler
        scale its loss was multiplied by, or None). A gradient the backward did not touch
        keeps its A (another model's, or one only observed changes touched since)."""
        self.disc.ensure_layout()
        todo: list[int] = []
        grads: list[torch.Tensor] = []
        a_state, expected = self.a_state, self.expected
        for i, layer in enumerate(self.disc.layers):
            g = layer.param.grad
            if g is None:
                continue
            if same(a_state[i], g) or same(expected[i], g):
                continue
            todo.append(i)
            grads.append(g)
            a_state[i] = expected[i] = state_of(g)
        self.epoch += 1
        if not grads:
            return
        norms = self._measured(grads, scale)
        a, clips, fresh = self.a, self.clips, self.fresh
        for i, n in zip(todo, norms):
            a[i] = n
            clips[i] = ()
            fresh[i] = True

    # ------------------------------------------------------------ observed changes ------
    def before_change(self, scope: list[int]) -> list[int]:
        """Entering an observed change of ``scope``'s gradients (a clip, ``unscale_``): the
        layers still as A saw them (or as observed changes left them)."""
        layers, expected = self.disc.layers, self.expected
        out = []
        for i in scope:
            g = layers[i].param.grad
            if g is not None and same(expected[i], g):
                out.append(i)
        return out

    def after_change(self, unchanged: list[int], clip: int | None = None) -> None:
        """Leaving it: those layers' gradients are as expected again, changed by the clip of
        ordinal ``clip`` (its coefficient is in the record) or by nothing A does not already
        account for (``unscale_``). A layer changed otherwise before the call stays
        unexpected, and is measured at the comparison point."""
        layers, expected, clips = self.disc.layers, self.expected, self.clips
        for i in unchanged:
            g = layers[i].param.grad
            expected[i] = state_of(g) if g is not None else None
            if clip is not None:
                clips[i] = clips[i] + (clip,)

    def next_clip(self) -> int:
        self.clip_count += 1
        return self.clip_count

    # ------------------------------------------------------------------- comparison -----
    def has_fresh(self, scope: list[int]) -> bool:
        """A backward changed a gradient of ``scope`` since it was last committed."""
        fresh = self.fresh
        return any(fresh[i] for i in scope)

    def compare(self, info: "OptInfo", scale: torch.Tensor | None) -> None:
        """The comparison point of ``info``'s optimizer: commits A of its layers to the open
        step and, where a gradient changed in a way not observed, measures B (``scale``: the
        scale the gradients are still multiplied by, or None). Done again for the same
        optimizer in the same step (a backward inside its ``step``), it replaces the first."""
        scope = self.disc.scope(info)
        layers = self.disc.layers
        st = self.ctx.open
        idx: list[int] = []
        grads: list[torch.Tensor] = []
        compared = True
        measure = False
        a, fresh, expected = self.a, self.fresh, self.expected
        stale: list[int] = []
        for i in scope:
            g = layers[i].param.grad
            if g is None:
                continue
            idx.append(i)
            grads.append(g)
            if not fresh[i]:
                stale.append(i)  # no backward since its last commit (gradients set by hand)
            elif not same(expected[i], g):
                measure = True
        if not idx:
            return
        if stale:
            # no A to compare with: the gradient as the step sees it is both A and B
            compared = False
            norms = self._measured([layers[i].param.grad for i in stale], scale)  # type: ignore[misc]
            for i, n in zip(stale, norms):
                g = layers[i].param.grad
                a[i] = n
                self.a_state[i] = expected[i] = state_of(g)  # type: ignore[arg-type]
                self.clips[i] = ()
        key = tuple(idx)
        measure = measure or st.sampled  # sampled steps verify every layer
        if measure:
            st.post[info.index] = (key, self._measured(grads, scale))
            st.check.pop(info.index, None)
        else:
            # versions miss changes made through ``.data`` (``p.grad.data.mul_(c)``, as
            # DeepSpeed unscales and clips): the smallest layer's norm is taken again, and a
            # factor the observed changes do not explain shows when the record is read
            st.post.pop(info.index, None)
            c = self.checked.get(key)
            if c is None:
                c = self.checked[key] = min(idx, key=self.numel.__getitem__)
            g = layers[c].param.grad
            st.check[info.index] = (c, self._measured([g], scale)[0])  # type: ignore[list-item]
        st.effect[info.index] = (key, tuple(self.clips[i] for i in idx), measure, compared)
        st.grad_pieces.append((key, [a[i] for i in idx]))  # type: ignore[misc]
        step = st.index
        committed = self.committed
        for i in idx:
            fresh[i] = False
            committed[i] = step

    def commit_rest(self) -> None:
        """Closing the step: A of layers no optimizer compared in it (no optimizer, an
        abandoned iteration, parameters outside every optimizer) goes into the step as is,
        changed only by the observed clips (without a comparison)."""
        st = self.ctx.open
        step = st.index
        fresh, committed, a = self.fresh, self.committed, self.a
        idx = [i for i in range(len(fresh)) if fresh[i] and committed[i] != step]
        if not idx:
            return
        key = tuple(idx)
        st.effect[-1] = (key, tuple(self.clips[i] for i in idx), False, False)
        st.grad_pieces.append((key, [a[i] for i in idx]))  # type: ignore[misc]
        for i in idx:
            fresh[i] = False
            committed[i] = step

    # ---------------------------------------------------------------- distributed -------
    def watch_local(self, model: nn.Module) -> None:
        """Under DistributedDataParallel the gradient in ``.grad`` after backward is the
        all-reduced one. A post-accumulate-grad hook runs inside AccumulateGrad, before the
        reducer's own hook copies the gradient into its bucket, so it sees this rank's
        local gradient: its norm is recorded as ``local_grad_norm``."""
        for p in model.parameters():
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self.handles.append(p.register_post_accumulate_grad_hook(self._local_grad_hook(id(p))))

    def _local_grad_hook(self, key: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if not self.ctx.live() or p.grad is None:
                return
            self._local_norm(key, p.grad)

        return hook

    @guarded("local_grad")
    def _local_norm(self, key: int, g: torch.Tensor) -> None:
        with torch.no_grad():
            self.local_norms[key] = torch.linalg.vector_norm(g.detach(), dtype=torch.float32)

    def take_local_norms(self) -> list[torch.Tensor]:
        out = list(self.local_norms.values())
        self.local_norms = {}
        return out

    def close(self) -> None:
        for h in self.handles:
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self.handles = []
        self.reset([])
