"""The few global patches gradprobe needs, installed once and shared by all active probes.

PyTorch has hooks for optimizer steps and module forwards, but none for the autograd entry
point (where the loss and ``retain_graph`` are seen), for ``clip_grad_norm_``'s internals
(where ``max_norm`` and the pre-clip norm are seen, also when the script imported
``clip_grad_norm_`` by name, because the public function looks its helpers up in its module
at call time), for ``GradScaler`` (scale, found-inf, update) or for functional losses. Those
are patched here: each wrapper calls the original exactly as the user called it, so behaviour
is unchanged, and hands what it saw to every active probe. The patches are installed when the
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
            p._on_backward_start(tensors, bool(retain_graph))
        t0 = time.perf_counter()
        _local.inside = True
        try:
            result = orig_backward(*args, **kwargs)
        except BaseException as exc:
            _local.inside = False
            dt = time.perf_counter() - t0
            for p in probes:
                p._on_backward_error(exc)
                p._backward_end(dt)
            raise
        _local.inside = False
        dt = time.perf_counter() - t0
        for p in probes:
            p._on_backward_end(dt)  # may raise MemoryError under --memory-limit, by design
        return result

    _patch(torch.autograd, "backward", backward)

    # --- clipping: clip_grad_norm_ calls these module-level helpers at call time -----------
    clip_mod = torch.nn.utils.clip_grad
    if hasattr(clip_mod, "_clip_grads_with_norm_"):
        orig_clip = clip_mod._clip_grads_with_norm_
        clip_wrapper = _clip_with_norm_wrapper(orig_clip)
        _patch(clip_mod, "_clip_grads_with_norm_", clip_wrapper)
        orig_total = getattr(clip_mod, "_get_total_norm", None)
        total_wrapper = _total_norm_wrapper(orig_total) if orig_total is not None else None
        if total_wrapper is not None:
            _patch(clip_mod, "_get_total_norm", total_wrapper)
        # The public names (torch >= 2.6: ``torch.nn.utils.get_total_norm`` and
        # ``clip_grads_with_norm_``) are import-time aliases of the same function objects, so
        # patching the module-level helpers does not reach callers that look the public names
        # up (accelerate >= 1.16 does, at call time, for every clip of a Hugging Face run).
        # An alias gets the helper's wrapper; a distinct function gets its own.
        for pub_name, orig_fn, wrapper, make in (
            ("clip_grads_with_norm_", orig_clip, clip_wrapper, _clip_with_norm_wrapper),
            ("get_total_norm", orig_total, total_wrapper, _total_norm_wrapper),
        ):
            target = getattr(torch.nn.utils, pub_name, None)
            if target is None:
                continue
            _patch(torch.nn.utils, pub_name, wrapper if target is orig_fn and wrapper is not None else make(target))
    else:  # torch < 2.6: only calls through the module attributes are seen
        orig_cgn = clip_mod.clip_grad_norm_

        @functools.wraps(orig_cgn)
        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            total = orig_cgn(params, max_norm, *args, **kwargs)
            for p in _active:
                p._on_clip(params, max_norm, total, after=True)
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
            p._on_scaler_created(self)

    @functools.wraps(orig_scale)
    def scale(self: Any, outputs: Any) -> Any:
        result = orig_scale(self, outputs)
        for p in _active:
            p._on_scale(self, outputs, result)
        return result

    @functools.wraps(orig_unscale)
    def unscale_(self: Any, optimizer: Any) -> Any:
        result = orig_unscale(self, optimizer)
        for p in _active:
            p._on_unscale(self, optimizer)
        return result

    @functools.wraps(orig_step)
    def step(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        for p in _active:
            p._on_scaler_step(self, optimizer)
        return orig_step(self, optimizer, *args, **kwargs)

    @functools.wraps(orig_update)
    def update(self: Any, new_scale: Any = None) -> Any:
        for p in _active:
            p._on_update_start(self, new_scale)
        result = orig_update(self, new_scale)
        for p in _active:
            p._on_update_end(self)
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
            p._on_optimizer_created(self)

    _patch(torch.optim.Optimizer, "__init__", opt_init)

    # --- functional losses (nn loss modules call these through the module attribute) ---------
    for name in LOSS_FUNCTIONS:
        orig = getattr(F, name, None)
        if orig is None:
            continue
        _patch(F, name, _loss_wrapper(name, orig))


def _clip_with_norm_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``clip_grads_with_norm_(parameters, max_norm, total_norm)``: where ``max_norm`` and the
    pre-clip ``total_norm`` are seen, whoever computed the norm (``clip_grad_norm_``,
    accelerate's per-mesh norms, a user's own)."""

    @functools.wraps(orig)
    def clip_grads_with_norm_(parameters: Any, max_norm: Any, total_norm: Any, *args: Any, **kwargs: Any) -> Any:
        seen = getattr(_local, "clip_norms", None)
        if seen is not None:
            _local.clip_norms = None
        if _active and not _is_compiling():
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            known = seen[1:] if seen is not None and seen[0] is total_norm else None
            for p in _active:
                p._on_clip(params, max_norm, total_norm, known=known)
            parameters = params
        return orig(parameters, max_norm, total_norm, *args, **kwargs)

    return clip_grads_with_norm_


def _total_norm_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``clip_grad_norm_`` computes every gradient's 2-norm (one ``torch._foreach_norm``)
    before it clips: keep those norms for the probe instead of a second pass over the
    gradients. The original function runs unchanged; while it runs, ``torch._foreach_norm``
    (looked up at call time) is a pass-through that also hands its result to this thread.
    The norms are kept only when that one call covered exactly the given tensors, in order.
    """

    @functools.wraps(orig)
    def get_total_norm(tensors: Any, norm_type: Any = 2.0, *args: Any, **kwargs: Any) -> Any:
        if not _active or _is_compiling() or getattr(_local, "capture", None) is not None:
            return orig(tensors, norm_type, *args, **kwargs)
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        try:
            two = float(norm_type) == 2.0
        except (TypeError, ValueError):
            two = False
        if not two or not tensors:
            return orig(tensors, norm_type, *args, **kwargs)
        prev = torch._foreach_norm
        calls: list[tuple[Any, Any]] = []

        def foreach_norm(ts: Any, *a: Any, **k: Any) -> Any:
            out = prev(ts, *a, **k)
            if getattr(_local, "capture", None) is calls:
                calls.append((ts, out))
            return out

        _local.capture = calls
        torch._foreach_norm = foreach_norm
        try:
            total = orig(tensors, norm_type, *args, **kwargs)
        finally:
            if torch._foreach_norm is foreach_norm:
                torch._foreach_norm = prev
            _local.capture = None
        if len(calls) == 1:
            ts, out = calls[0]
            if len(ts) == len(tensors) and len(out) == len(tensors) and all(a is b for a, b in zip(ts, tensors)):
                # ids, not the gradients: nothing here may keep a gradient alive
                _local.clip_norms = (total, [id(t) for t in tensors], list(out))
        return total

    return get_total_norm


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
            p._on_loss_fn(name, args, kwargs, out)
        return out

    return loss_fn
