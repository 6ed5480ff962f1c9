"""The few global patches gradprobe needs, installed once and shared by all active probes.

PyTorch has hooks for optimizer steps and module forwards, but none for the autograd entry
point (where the loss and ``retain_graph`` are seen, and the gradients as a backward left
them), for ``clip_grad_norm_``'s internals (where the configured ``max_norm`` is seen, also
when the script imported ``clip_grad_norm_`` by name, because the public function looks its
helper up in its module at call time), for ``GradScaler`` (scale, unscale, found-inf, update)
or for functional losses. Those are patched here: each wrapper calls the original exactly as
the user called it, so behaviour is unchanged, and hands what it saw to every active probe
(its :class:`~gradprobe.probe.boundary.StepBoundary`, or its forward hooks for losses). The patches are installed when the
first probe starts and the originals are put back when the last probe closes
(:func:`installed_patches` lists what is patched, for the leak tests).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from gradprobe.probe.core import Probe

LOSS_FUNCTIONS = (
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cross_entropy",
    "ctc_loss",
    "gaussian_nll_loss",
    "hinge_embedding_loss",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
)

_lock = threading.RLock()
_active: list["Probe"] = []
_originals: dict[tuple[Any, str], Any] = {}
_local = threading.local()


def active_probes() -> list["Probe"]:
    return _active


def installed_patches() -> dict[tuple[Any, str], Any]:
    """(owner, attribute) -> original, for everything currently patched."""
    return dict(_originals)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # noqa: BLE001 - very old torch
        return False


def _patch(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    key = (owner, name)
    if key in _originals:
        return
    if not hasattr(owner, name):
        return
    _originals[key] = owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)
    setattr(owner, name, wrapper)


def _restore_all() -> None:
    for (owner, name), orig in list(_originals.items()):
        setattr(owner, name, orig)
    _originals.clear()


def activate(probe: "Probe") -> None:
    with _lock:
        if probe in _active:
            return
        if not _active:
            _install()
        _active.append(probe)


def deactivate(probe: "Probe") -> None:
    with _lock:
        if probe in _active:
            _active.remove(probe)
        if not _active:
            _restore_all()


def _install() -> None:
    # --- autograd entry point: torch.Tensor.backward calls torch.autograd.backward ---------
    orig_backward = torch.autograd.backward

    @functools.wraps(orig_backward)
    def backward(*args: Any, **kwargs: Any) -> Any:
        probes = _active
        if not probes or getattr(_local, "inside", False) or _is_compiling():
            return orig_backward(*args, **kwargs)
        tensors = args[0] if args else kwargs.get("tensors")
        retain_graph = args[2] if len(args) > 2 else kwargs.get("retain_graph")
        create_graph = args[3] if len(args) > 3 else kwargs.get("create_graph", False)
        if retain_graph is None:
            retain_graph = bool(create_graph)
        for p in probes:
            p.boundary.on_backward_start(tensors, bool(retain_graph))
        t0 = time.perf_counter()
        _local.inside = True
        try:
            result = orig_backward(*args, **kwargs)
        except BaseException as exc:
            _local.inside = False
            dt = time.perf_counter() - t0
            for p in probes:
                p.boundary.on_backward_error(exc)
                p.boundary.backward_end(dt)
            raise
        _local.inside = False
        dt = time.perf_counter() - t0
        for p in probes:
            p.boundary.on_backward_end(dt)  # may raise MemoryError under --memory-limit, by design
        return result

    _patch(torch.autograd, "backward", backward)

    # --- clipping: clip_grad_norm_ calls this module-level helper at call time -------------
    clip_mod = torch.nn.utils.clip_grad
    if hasattr(clip_mod, "_clip_grads_with_norm_"):
        orig_clip = clip_mod._clip_grads_with_norm_
        clip_wrapper = _clip_with_norm_wrapper(orig_clip)
        _patch(clip_mod, "_clip_grads_with_norm_", clip_wrapper)
        # The public name (torch >= 2.6: ``torch.nn.utils.clip_grads_with_norm_``) is an
        # import-time alias of the same function object, so patching the module-level helper
        # does not reach callers that look the public name up (accelerate >= 1.16 does, at
        # call time, for every clip of a Hugging Face run). An alias gets the helper's
        # wrapper; a distinct function gets its own.
        target = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
        if target is not None:
            _patch(torch.nn.utils, "clip_grads_with_norm_", clip_wrapper if target is orig_clip else _clip_with_norm_wrapper(target))
    else:  # torch < 2.6: only calls through the module attributes are seen
        orig_cgn = clip_mod.clip_grad_norm_

        @functools.wraps(orig_cgn)
        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            for p in _active:
                p.boundary.clip_begin(params)
            total = orig_cgn(params, max_norm, *args, **kwargs)
            for p in _active:
                p.boundary.clip_seen(max_norm, total)
                p.boundary.clip_end()
            return total

        _patch(clip_mod, "clip_grad_norm_", clip_grad_norm_)
        _patch(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)

    # --- GradScaler --------------------------------------------------------------------------
    GS = torch.amp.GradScaler
    orig_scale, orig_unscale, orig_step, orig_update = GS.scale, GS.unscale_, GS.step, GS.update
    orig_gs_init = GS.__init__

    @functools.wraps(orig_gs_init)
    def gs_init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_gs_init(self, *args, **kwargs)
        for p in _active:
            p.boundary.on_scaler_created(self)

    @functools.wraps(orig_scale)
    def scale(self: Any, outputs: Any) -> Any:
        result = orig_scale(self, outputs)
        for p in _active:
            p.boundary.on_scale(self, outputs, result)
        return result

    @functools.wraps(orig_unscale)
    def unscale_(self: Any, optimizer: Any) -> Any:
        for p in _active:
            p.boundary.unscale_begin(self, optimizer)
        result = orig_unscale(self, optimizer)
        for p in _active:
            p.boundary.on_unscale(self, optimizer)
        return result

    @functools.wraps(orig_step)
    def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        for p in _active:
            p.boundary.on_scaler_step(self, optimizer)
        return orig_step(self, optimizer, *args, **kwargs)

    @functools.wraps(orig_update)
    def update(self: Any, new_scale: Any = None) -> Any:
        for p in _active:
            p.boundary.on_update_start(self, new_scale)
        result = orig_update(self, new_scale)
        for p in _active:
            p.boundary.on_update_end(self)
        return result

    _patch(GS, "__init__", gs_init)
    _patch(GS, "scale", scale)
    _patch(GS, "unscale_", unscale_)
    _patch(GS, "step", step)
    _patch(GS, "update", update)

    # --- optimizers created while a probe is active (gradprobe run) --------------------------
    orig_opt_init = torch.optim.Optimizer.__init__

    @functools.wraps(orig_opt_init)
    def opt_init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_opt_init(self, *args, **kwargs)
        for p in _active:
            p.boundary.on_optimizer_created(self)

    _patch(torch.optim.Optimizer, "__init__", opt_init)

    # --- functional losses (nn loss modules call these through the module attribute) ---------
    for name in LOSS_FUNCTIONS:
        orig = getattr(F, name, None)
        if orig is None:
            continue
        _patch(F, name, _loss_wrapper(name, orig))


def _clip_with_norm_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``clip_grads_with_norm_(parameters, max_norm, total_norm)``: where the configured
    ``max_norm`` and the total norm the gradients are rescaled by are seen, whoever computed
    the norm (``clip_grad_norm_``, accelerate's per-mesh norms, a user's own). The probe
    notes which gradients it rescales (their versions before and after), so that the
    gradients the optimizer then steps with need no second pass when nothing else changed
    them (:mod:`gradprobe.probe.gradients`)."""

    @functools.wraps(orig)
    def clip_grads_with_norm_(parameters: Any, max_norm: Any, total_norm: Any, *args: Any, **kwargs: Any) -> Any:
        if not _active or _is_compiling():
            return orig(parameters, max_norm, total_norm, *args, **kwargs)
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        probes = list(_active)
        for p in probes:
            p.boundary.clip_begin(params)
            p.boundary.clip_seen(max_norm, total_norm)
        result = orig(params, max_norm, total_norm, *args, **kwargs)
        for p in probes:
            p.boundary.clip_end()
        return result

    return clip_grads_with_norm_


def _loss_wrapper(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def loss_fn(*args: Any, **kwargs: Any) -> Any:
        if not _active or _is_compiling() or getattr(_local, "in_loss", False):
            return orig(*args, **kwargs)
        _local.in_loss = True
        try:
            out = orig(*args, **kwargs)
        finally:
            _local.in_loss = False
        for p in _active:
            p.forward.on_loss_fn(name, args, kwargs, out)
        return out

    return loss_fn
