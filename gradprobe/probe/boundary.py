"""The step boundary: where a step begins and ends, and the record of a closed step.

A *step* is one ``scaler.update()`` when a GradScaler is in use, else one
``optimizer.step()`` of every watched optimizer; see :mod:`gradprobe.probe.step` for how
several optimizers, LBFGS closures, gradient accumulation and abandoned iterations (a
``continue`` after looking at the gradients) are delimited. Without any optimizer (manual
``p.data`` updates) each backward is a step.

The handlers here receive the patched autograd entry point, ``clip_grad_norm_``, the
GradScaler's methods and the optimizers' step hooks (:mod:`gradprobe.probe.patches`), hand
the gradients to :mod:`gradprobe.probe.gradients` at the right moments, and turn a closed
step into a :class:`~gradprobe.probe.buffer.StepRecord` of device tensors (no host sync).
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from gradprobe._guard import guarded
from gradprobe.probe.buffer import StepRecord
from gradprobe.probe.step import OpenStep, Segment

if TYPE_CHECKING:
    from gradprobe.probe.context import Context
    from gradprobe.probe.discovery import Discovery, ScalerInfo
    from gradprobe.probe.forward import ForwardHooks
    from gradprobe.probe.gradients import Gradients
    from gradprobe.probe.memory import MemoryMonitor
    from gradprobe.probe.state_age import StateAges


class StepBoundary:
    """Delimits steps and records each one.

    ``emit(record)`` (set by the probe) takes a closed step's record; ``pending_scalars`` are
    the values ``probe.log`` gave for the open step.
    """

    def __init__(self, ctx: "Context", discovery: "Discovery", grads: "Gradients", ages: "StateAges",
                 memory: "MemoryMonitor", forward: "ForwardHooks") -> None:
        self.ctx = ctx
        self.guard = ctx.guard
        self.disc = discovery
        self.grads = grads
        self.ages = ages
        self.memory = memory
        self.forward = forward
        self.emit: Callable[[StepRecord], None] = lambda rec: None
        #: the probe's :class:`gradprobe.live.Stopper` (``stop_on``): its gate runs once a step
        #: closed, outside every guard, like the memory limit's; None when the run never stops
        self.stopper: Any = None
        self.scaler_mode = False  # a GradScaler scaled a loss: steps end at its update()
        self.active_scaler: Any = None  # the scaler between its scale() and update()
        self.scaled_outputs: list[tuple[Any, Any]] = []  # (weakref to scale()'s result, its input)
        self.consumed = False  # gradients were examined (clip, unscale_, scaler.step) since the last step
        self.stepping: Any = None  # the optimizer inside its step()
        self.stepping_epoch = 0  # gradients' backward count when it entered step()
        self.deferred: set[int] = set()  # optimizers whose comparison waits for their post-step hook
        self.pending_scalars: list[tuple[str, Any]] = []
        self.recorded_exceptions: list[BaseException] = []
        self.last_close = time.perf_counter()
        self._clip: tuple[list[int], list[int], int] | None = None  # (scope, unchanged layers, ordinal)
        self._unscale: list[int] | None = None

    def live(self) -> bool:
        return self.ctx.live()

    # ------------------------------------------------------------------ scaling -------
    def scale_for(self, opt: Any) -> torch.Tensor | None:
        """The scale the current gradients are still multiplied by, or None."""
        sc = self.active_scaler
        if sc is None or not getattr(sc, "_enabled", False) or getattr(sc, "_scale", None) is None:
            return None
        if opt is not None:
            state = sc._per_optimizer_states.get(id(opt)) if hasattr(sc._per_optimizer_states, "get") else None
            if state is not None:
                stage = getattr(state.get("stage"), "name", "")
                if stage in ("UNSCALED", "STEPPED"):
                    return None
        return sc._scale

    # ----------------------------------------------------------------- backward -------
    @guarded("backward")
    def on_backward_start(self, tensors: Any, retain_graph: bool) -> None:
        ctx = self.ctx
        if not ctx.live():
            return
        self.maybe_abandon()
        if ctx.open.current.n_backward and self.stepping is None and self._grads_cleared():
            # the previous iteration's gradients were cleared (zero_grad(set_to_none=True),
            # p.grad = None) without an optimizer step: a manual-update loop; it was a step
            self.close_step()
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors) if isinstance(tensors, (list, tuple)) else []
        seg = ctx.open.current
        scaled = self.scaled_outputs
        deep = ctx.deep
        for r in roots:
            if not isinstance(r, torch.Tensor):
                continue
            value = None
            for ref, orig in scaled:
                if ref() is r and isinstance(orig, torch.Tensor):
                    value = orig
                    break
            if value is None:
                value = r
            v = value.detach()
            if v.numel() != 1:
                with torch.no_grad():
                    v = v.float().sum()
            (seg.inner_roots if self.stepping is not None else seg.roots).append(v)
            if deep is not None and ctx.open.sampled and r.grad_fn is not None:
                deep.on_backward_root(r)
            fn = r.grad_fn
            if fn is not None:
                self.ages.stamp(fn)
        self.scaled_outputs = []
        seg.n_backward += 1
        seg.retain_graph |= retain_graph

    def _grads_cleared(self) -> bool:
        """All watched gradients are None (checked only when a step already saw a backward:
        gradient accumulation keeps them, so it is never split)."""
        self.disc.ensure_layout()
        layers = self.disc.layers
        return bool(layers) and all(layer.param.grad is None for layer in layers)

    def maybe_abandon(self) -> None:
        """Gradients were examined (clip / unscale_ / scaler.step) and the next iteration
        starts without an optimizer step or update: the iteration was abandoned (a
        ``continue`` on an inf norm). Close it before recording the next one."""
        if self.consumed and self.stepping is None:
            self.close_step(abandoned=True)

    def on_backward_end(self, dt: float) -> None:
        index = self.ctx.open.index
        self.backward_end(dt)
        self.memory.gate()  # may raise MemoryError under --memory-limit, by design
        if self.stopper is not None and self.ctx.open.index != index:  # a step closed (no optimizer)
            self.stopper.gate()  # may raise RunStopped under stop_on, by design

    @guarded("backward")
    def backward_end(self, dt: float) -> None:
        ctx = self.ctx
        if not ctx.live():
            return
        ctx.open.current.backward_time += dt
        self.grads.after_backward(self.scale_for(None))
        if not self.disc.optimizers and not self.scaler_mode and self.stepping is None:
            # no optimizer at all (manual ``p.data`` updates): each backward is one step
            self.close_step()

    @guarded("backward")
    def on_backward_error(self, exc: BaseException) -> None:
        if self.ctx.live():
            self.record_exception(exc, where="backward")

    def record_exception(self, exc: BaseException, where: str) -> None:
        """Writes the exception a run ended with (once per exception object) and flushes."""
        if any(e is exc for e in self.recorded_exceptions):
            return
        self.recorded_exceptions = (self.recorded_exceptions + [exc])[-8:]
        st = self.ctx.open
        seg = st.current if st.current.state_age >= st.sealed.state_age else st.sealed
        self.ctx.event(
            {
                "kind": "exception",
                "where": where,
                "step": st.index,
                "type": type(exc).__name__,
                "message": str(exc)[:2000],
                "state_age": seg.state_age,
                "state_age_module": seg.state_age_module,
                "retain_graph": st.current.retain_graph or st.sealed.retain_graph,
                "wall_time": time.time(),
            }
        )
        self.ctx.flush(True)

    # --------------------------------------------------------------------- clipping -----
    @guarded("clip")
    def clip_begin(self, params: list[torch.Tensor]) -> None:
        """A norm clip is about to rescale ``params``' gradients."""
        self._clip = None
        if not self.live():
            return
        scope = self.disc.scope_of_params(params)
        if scope:
            self._clip = (scope, self.grads.before_change(scope), self.grads.next_clip())

    @guarded("clip")
    def clip_seen(self, max_norm: Any, total_norm: Any) -> None:
        """Its ``max_norm`` (the configured one: the clip's own source) and the total norm it
        rescales by; the coefficient is worked out when the record is read."""
        if not self.live() or self._clip is None:
            return
        scope, _, ordinal = self._clip
        info = self.disc.layers[scope[0]].optimizer
        opt = self.disc.optimizers[info].optimizer if info is not None else None
        seg = self.ctx.open.current
        if self.scale_for(opt) is not None:
            seg.clip_on_scaled = True
        if isinstance(total_norm, torch.Tensor):
            tn = total_norm.detach()
            seg.clip_total_norm = tn
            if isinstance(max_norm, torch.Tensor):  # rare: the coefficient on the device
                with torch.no_grad():
                    coef = torch.clamp(max_norm / (tn.float() + 1e-6), max=1.0)
                seg.clip_pieces.append((tuple(scope), coef, None, ordinal))
            else:  # the coefficient min(max_norm / (total + 1e-6), 1) is computed on the host
                seg.clip_pieces.append((tuple(scope), tn, float(max_norm), ordinal))
        if isinstance(max_norm, torch.Tensor):
            seg.clip_max_norm_tensor = max_norm.detach()
            seg.clip_max_norm = None
        else:
            seg.clip_max_norm = float(max_norm)
            seg.clip_max_norm_tensor = None
        seg.clip_calls += 1
        self.consumed = True

    @guarded("clip")
    def clip_end(self) -> None:
        clip, self._clip = self._clip, None
        if clip is not None and self.live():
            self.grads.after_change(clip[1], clip[2])

    # ---------------------------------------------------------------------- scaler -------
    @guarded("scaler")
    def on_scaler_created(self, scaler: Any) -> None:
        if self.live() and self.ctx.auto:
            self.disc.add_scaler(scaler)

    @guarded("scaler")
    def on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        if not self.live() or not getattr(scaler, "_enabled", False):
            return
        info = self.disc.scaler_info(scaler, adopt=True)
        if info is None:
            return
        self.maybe_abandon()
        self.scaler_mode = True
        self.active_scaler = scaler
        seg = self.ctx.open.current
        cur = scaler._scale
        if info.last_scale_obj is not None and cur is not info.last_scale_obj:
            seg.scale_tampered = True
            self._tamper_event(info, "the GradScaler's _scale was replaced outside update()")
        info.last_scale_obj = cur
        if seg.scale_before is None and isinstance(cur, torch.Tensor):
            seg.scale_before = cur.detach().clone()
        seg.scaled_by = scaler
        if isinstance(result, torch.Tensor):
            self.scaled_outputs.append((weakref.ref(result), outputs))

    def _tamper_event(self, info: "ScalerInfo", what: str) -> None:
        if not info.warned_tamper:
            info.warned_tamper = True
            self.ctx.event({"kind": "scaler_misuse", "what": "scale_set_by_hand", "detail": what, "step": self.ctx.open.index})

    @guarded("scaler")
    def unscale_begin(self, scaler: Any, opt: Any) -> None:
        self._unscale = None
        if not self.live() or self.disc.scaler_info(scaler, adopt=True) is None:
            return
        info = self.disc.opt_info(opt)
        if info is not None:
            self._unscale = self.grads.before_change(self.disc.scope(info))

    @guarded("scaler")
    def on_unscale(self, scaler: Any, opt: Any) -> None:
        """``scaler.unscale_`` divided the gradients by the scale A was already divided by."""
        unchanged, self._unscale = self._unscale, None
        if not self.live() or self.disc.scaler_info(scaler, adopt=True) is None:
            return
        if unchanged:
            self.grads.after_change(unchanged)
        self.consumed = True

    @guarded("scaler")
    def on_scaler_step(self, scaler: Any, opt: Any) -> None:
        if self.live() and self.disc.scaler_info(scaler, adopt=True) is not None:
            self.consumed = True

    @guarded("scaler")
    def on_update_start(self, scaler: Any, new_scale: Any) -> None:
        if not self.live() or not getattr(scaler, "_enabled", False):
            return
        info = self.disc.scaler_info(scaler, adopt=True)
        if info is None:
            return
        found = [
            t
            for st in scaler._per_optimizer_states.values()
            for t in st.get("found_inf_per_device", {}).values()
            if isinstance(t, torch.Tensor)
        ]
        device = self.ctx.device
        if found:
            with torch.no_grad():
                total = found[0].detach().to(device).float()
                for t in found[1:]:
                    total = total + t.detach().to(device).float()
                self.ctx.open.found_inf = total
        if info.last_scale_obj is not None and scaler._scale is not info.last_scale_obj:
            self.ctx.open.current.scale_tampered = True
            self._tamper_event(info, "the GradScaler's _scale was replaced between scale() and update()")
        if new_scale is not None:
            self.ctx.event({"kind": "scaler_misuse", "what": "update_new_scale", "detail": "update(new_scale=...) set the scale by hand", "step": self.ctx.open.index})

    def on_update_end(self, scaler: Any) -> None:
        index = self.ctx.open.index
        self._update_end(scaler)
        self.memory.gate()
        if self.stopper is not None and self.ctx.open.index != index:
            self.stopper.gate()

    @guarded("scaler")
    def _update_end(self, scaler: Any) -> None:
        if not self.live() or not getattr(scaler, "_enabled", False):
            return
        info = self.disc.scaler_info(scaler)
        if info is None:
            return
        if isinstance(scaler._scale, torch.Tensor):
            self.ctx.open.scale_after = scaler._scale.detach().clone()
        info.last_scale_obj = scaler._scale
        self.ctx.open.scaler_updated = True
        self.active_scaler = None
        self.consumed = False
        self.close_step()

    # ------------------------------------------------------------------- optimizers -----
    @guarded("optimizer")
    def on_optimizer_created(self, opt: Any) -> None:
        if not self.live():
            return
        if self.ctx.auto:
            self.disc.add_optimizer(opt)
        elif self.disc.global_optimizer_hooks:
            self.disc.opt_info(opt)  # adopts it if it updates the watched models

    @guarded("optimizer")
    def on_opt_pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        ctx = self.ctx
        if not ctx.live():
            return
        info = self.disc.opt_info(opt)
        if info is None:
            return
        if ctx.open.has_stepped(opt):
            self.close_step(split=True)
        self.stepping = opt
        self.stepping_epoch = self.grads.epoch
        scope = self.disc.scope(info)
        closure = bool(args) or kwargs.get("closure") is not None
        if self.grads.has_fresh(scope) or not closure:
            # a backward came before the step (or no closure will run one): compare now
            self.grads.compare(info, self.scale_for(opt))
        else:  # LBFGS, Lightning's automatic optimization: backward inside the closure
            self.deferred.add(info.index)
        if ctx.deep is not None and ctx.open.sampled:
            ctx.deep.on_pre_step(info)

    def on_opt_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        index = self.ctx.open.index
        self._opt_post(opt, args, kwargs)
        self.memory.gate()
        if self.stopper is not None and self.ctx.open.index != index:  # never between two optimizers' steps
            self.stopper.gate()

    @guarded("optimizer")
    def _opt_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        ctx = self.ctx
        if not ctx.live():
            return
        info = self.disc.opt_info(opt)
        if info is None:
            return
        self.stepping = None
        if self.grads.epoch != self.stepping_epoch or info.index in self.deferred:
            # after the last backward of the step: one ran inside step() (a closure)
            self.deferred.discard(info.index)
            self.grads.compare(info, self.scale_for(opt))
        scope = self.disc.scope(info)
        layers = self.disc.layers
        params = [layers[i].param for i in scope]
        weights = self.grads.norms(params) if params else []
        st = ctx.open
        if params:
            st.weight_pieces.append((tuple(scope), weights))
        st.optimizer_steps += 1
        st.stepped.append(opt)
        closing = not self.scaler_mode and all(st.has_stepped(o.optimizer) for o in self.disc.optimizers)
        if not closing:  # (closing seals it)
            st.seal()
        self.consumed = False
        if ctx.deep is not None and st.sampled:
            ctx.deep.on_post_step(info, weights)
        if closing:
            self.close_step()

    # ---------------------------------------------------------------- step closing -------
    @guarded("close")
    def close_step(self, abandoned: bool = False, split: bool = False) -> None:
        ctx = self.ctx
        st = ctx.open
        carry: Segment | None = None
        if split:
            carry = st.current
            st.current = Segment()
        else:
            self.grads.commit_rest()
        st.seal()
        seg = st.sealed
        if not st.active() and not abandoned:
            if carry is not None:
                st.current = carry
            return
        now = time.perf_counter()
        step = st.index
        rec = StepRecord(
            host={
                "step": step,
                "wall_time": time.time(),
                "step_time": now - self.last_close,
                "backward_time": seg.backward_time,
                "n_backward": seg.n_backward,
                "clip_calls": seg.clip_calls,
                "clip_on_scaled": seg.clip_on_scaled,
                "clip_max_norm": seg.clip_max_norm if seg.clip_max_norm is not None else float("nan"),
                "lr": float("nan"),
                "optimizer_steps": st.optimizer_steps,
                "scaler_updated": st.scaler_updated,
                "scale_tampered": seg.scale_tampered,
                "abandoned": abandoned,
                "state_age": seg.state_age,
                "state_age_module": seg.state_age_module,
                "graphs_alive": self.ages.graphs_alive(step),
                "retain_graph": seg.retain_graph,
                "memory": self.memory.read(),
                "sampled": st.sampled,
                "effect": tuple(st.effect.values()),
            }
        )
        self._add_lr(rec)
        self._add_values(rec, st, seg)
        if ctx.deep is not None and st.sampled:
            ctx.deep.on_close(st, rec)
        rec.compact(ctx.device)
        self.emit(rec)
        self.last_close = now
        self.consumed = False
        self.deferred.clear()
        nxt = step + 1
        # the next step's current segment: the split-off one, or the fresh one seal() left
        ctx.open = OpenStep(index=nxt, sampled=nxt in ctx.config.schedule,
                            current=carry if carry is not None else st.current)
        if self.forward.has_sampled_hooks():
            self.forward.sync_light_hooks()

    def _add_lr(self, rec: StepRecord) -> None:
        """The first optimizer's first group's lr; a device lr (capturable optimizers) is read
        with the record, not now."""
        opts = self.disc.optimizers
        if not opts or not opts[0].optimizer.param_groups:
            return
        v = opts[0].optimizer.param_groups[0].get("lr", float("nan"))
        if isinstance(v, torch.Tensor):
            if v.device.type == "cpu" and v.numel() == 1:
                v = float(v)
            else:
                if v.numel():
                    rec.add("lr_dev", v.detach().reshape(-1)[:1].clone())
                v = float("nan")
        rec.host["lr"] = float(v)

    def _add_values(self, rec: StepRecord, st: OpenStep, seg: Segment) -> None:
        for r in seg.roots or seg.inner_roots[:1]:
            rec.add("loss", r)
        for v in seg.loss_fn:
            rec.add("loss_fn", v)
        for k, v in seg.eval_loss:
            rec.add("eval_loss", v, k)
        if seg.data_checks:
            rec.add("data_check", seg.data_checks)
        for idx, norms in st.grad_pieces:
            rec.add("grad", norms, idx)
        for idx, norms in st.post.values():
            rec.add("post", norms, idx)
        for layer, norm in st.check.values():
            rec.add("check", norm, layer)
        for idx, value, max_norm, ordinal in seg.clip_pieces:
            if max_norm is None:
                rec.add("clip_coef", value, (idx, ordinal))
            else:
                rec.add("clip", value, (idx, max_norm, ordinal))
        if seg.clip_total_norm is not None:
            rec.add("clip_total", seg.clip_total_norm)
        if seg.clip_max_norm_tensor is not None:
            rec.add("clip_max", seg.clip_max_norm_tensor)
        for idx, norms in st.weight_pieces:
            rec.add("weight", norms, idx)
        if seg.scale_before is not None:
            rec.add("scale_before", seg.scale_before)
        if st.scale_after is not None:
            rec.add("scale_after", st.scale_after)
        if st.found_inf is not None:
            rec.add("found_inf", st.found_inf)
        for probe, target, stat, index, value in st.samples:
            if isinstance(value, torch.Tensor):
                rec.add("sample", value, (probe, target, stat, index))
            else:
                rec.host_sample((probe, target, stat, index, float(value)))
        if self.grads.local_norms:
            rec.add("local_grad", self.grads.take_local_norms())
        for name, value in self.pending_scalars:
            if isinstance(value, torch.Tensor):
                rec.add("scalar", value, name)
            else:
                rec.host_scalar((name, float(value)))
        self.pending_scalars = []

    def close(self) -> None:
        self.scaled_outputs = []
        self.active_scaler = None
        self.stepping = None
        self.deferred.clear()
