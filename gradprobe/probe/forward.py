"""What the probe sees of the forward: module hooks and functional loss calls.

On every training forward: the data entering the watched models (one 0-d check per batch,
GP404), the state age of what enters each module and the date of what it outputs
(:mod:`~gradprobe.probe.state_age`), the autocast state module by module, and the loss
functions' values and targets. On sampled steps the deep probes get the same calls.

Hooks: per module under ``watch`` (roots and modules with parameters on every step; the
forward-pre side of non-root modules and parameter-free activation modules only while a
sampled step is open), global under ``gradprobe run`` (models are found at their first
forward). A module call is also where a forward after gradients were examined without a
step shows an abandoned iteration.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from gradprobe._guard import guarded
from gradprobe.probe import patches
from gradprobe.probe.state_age import date, iter_tensors
from gradprobe.runlog.schema import eval_stream_name

if TYPE_CHECKING:
    from gradprobe.probe.boundary import StepBoundary
    from gradprobe.probe.context import Context
    from gradprobe.probe.discovery import Discovery, ModuleInfo
    from gradprobe.probe.memory import MemoryMonitor
    from gradprobe.probe.state_age import StateAges

_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


#: No-grad loss streams kept apart by call site; the calls of any further site join the last
#: stream. A loop evaluates on a few datasets (training, validation, test), each from its own
#: line; a script with more sites than this computes no-grad losses all over (a metric in
#: every helper), and each stream is a series of the run log.
MAX_EVAL_STREAMS = 16
#: the site recorded for the stream that collects the calls beyond ``MAX_EVAL_STREAMS`` sites
FURTHER_SITES = "(further call sites)"


def _prefixes(dirs: list[str]) -> tuple[str, ...]:
    out = []
    for d in dirs:
        for p in (d, os.path.realpath(d)):
            p = os.path.join(p, "")
            if p not in out:
                out.append(p)
    return tuple(out)


_PATHS = sysconfig.get_paths()
_GRADPROBE = _prefixes([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])
#: Files whose frames are not the user's call site: torch and gradprobe (their lines vary with
#: the hooks installed at the moment: ``Module._call_impl`` takes another path while a sampled
#: step's hooks are on), the standard library (runpy, contextlib) and installed packages (a
#: trainer's loops: Lightning reaches the same ``validation_step`` through one path for its
#: sanity check and another for the evaluation proper).
_LIBRARY = _prefixes([os.path.dirname(torch.__file__),
                      *(_PATHS[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if _PATHS.get(k)),
                      *(site.getsitepackages() if hasattr(site, "getsitepackages") else ())]) + _GRADPROBE


def _user_file(name: str) -> bool:
    return not name.startswith(("<frozen", *_LIBRARY))


def functorch_active() -> bool:
    f = _FUNCTORCH_ACTIVE
    try:
        return bool(f()) if f is not None else False
    except Exception:  # noqa: BLE001
        return False


class ForwardHooks:
    """The forward hooks' handlers and the functional losses' observer."""

    def __init__(self, ctx: "Context", discovery: "Discovery", ages: "StateAges", memory: "MemoryMonitor") -> None:
        self.ctx = ctx
        self.guard = ctx.guard
        self.disc = discovery
        self.ages = ages
        self.memory = memory
        self.boundary: "StepBoundary" = None  # type: ignore[assignment]  # wired by the probe
        self.auto = ctx.auto
        self.depth = 0  # nesting of module calls (gradprobe run: depth 0 is a model)
        self.loss_functions: set[str] = set()
        self.light_handles: list[Any] = []
        self.light_stale = False
        # no-grad loss streams: call chain -> stream index; code object -> is a user frame
        self.eval_sites: dict[tuple[tuple[Any, int], ...], int] = {}
        self.n_eval_streams = 0
        self._user_code: dict[Any, bool] = {}

    # ------------------------------------------------------------- sampled-step hooks ------
    def mark_new_modules(self) -> None:
        self.light_stale = True
        self.sync_light_hooks()

    def sync_light_hooks(self) -> None:
        """Hooks the parameter-free activation modules, and the forward-pre side of the
        other non-root modules, while a sampled step with deep probes is open, and unhooks
        them otherwise: on the other steps nothing is measured there (the root's pre hook
        counts the data; the post hooks date what modules output), and every hook call is
        Python on the training thread."""
        ctx = self.ctx
        want = ctx.deep is not None and ctx.open.sampled and not ctx.closed
        if self.light_handles and (not want or self.light_stale):
            for h in self.light_handles:
                h.remove()
            self.light_handles = []
        self.light_stale = False
        if want and not self.light_handles:
            for mod in self.disc.pre_modules:
                self.light_handles.append(mod.register_forward_pre_hook(self.on_pre))
            for mod in self.disc.light_modules:
                self.light_handles.append(mod.register_forward_pre_hook(self.on_pre))
                self.light_handles.append(mod.register_forward_hook(self.on_post, with_kwargs=True, always_call=True))

    def has_sampled_hooks(self) -> bool:
        return bool(self.disc.light_modules or self.disc.pre_modules)

    # ------------------------------------------------------------------- forward-pre -----
    def on_pre(self, module: nn.Module, args: Any) -> None:
        ctx = self.ctx
        if ctx.closed or ctx.forked:
            return None
        if patches._is_compiling():
            return None
        if self.memory.limit is not None:
            self.memory.gate_between_steps()  # may raise MemoryError, by design
        if not self.auto:
            info = self.disc.module_info.get(module)
            if info is not None and info.light and not ctx.open.sampled:
                return None  # hot path: an activation module on an unsampled step
        self._pre(module, args)
        return None

    @guarded("forward")
    def _pre(self, module: nn.Module, args: Any) -> None:
        ctx = self.ctx
        if functorch_active():
            if self.auto:
                self.depth += 1
            return
        boundary = self.boundary
        if boundary.consumed:
            boundary.maybe_abandon()
        elif ctx.open.current.loss_fn and not ctx.open.current.n_backward and boundary.stepping is None \
                and self.disc.is_root(module) and torch.is_grad_enabled():
            # a new training forward of the model after a training loss that was never
            # backpropagated: the loop skipped that iteration (``if not isfinite(loss): continue``)
            boundary.close_step(abandoned=True)
        info = self.disc.module_info.get(module)
        if self.auto:
            depth = self.depth
            self.depth += 1
            if info is None and depth == 0 and not functorch_active():
                self.disc.add_root(module)
                info = self.disc.module_info.get(module)
        deep = ctx.deep
        if self.disc.is_root(module) and args and torch.is_grad_enabled() \
                and not (deep is not None and deep.in_side_computation):
            # the data of every training forward, counted on every step: a NaN batch between
            # two sampled steps is still seen, and named, at its step (GP404). A tensor with a
            # grad_fn was computed from parameters in this step (a backbone's features fed to a
            # head called on its own, a generator's output fed to the critic): not data
            x = args[0]
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.grad_fn is None:
                ctx.open.current.count_data(x)
        if info is not None and deep is not None and ctx.open.sampled and torch.is_grad_enabled():
            deep.on_forward_pre(module, info, args)

    # ------------------------------------------------------------------ forward-post -----
    def on_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        ctx = self.ctx
        if ctx.closed or ctx.forked:
            return None
        if patches._is_compiling():
            return None
        if not self.auto:
            info = self.disc.module_info.get(module)
            if info is not None and not ctx.open.sampled:
                if info.light or info.passthrough:
                    return None
                if not kwargs and len(args) == 1 and self._post_fast(info, args[0], output):
                    return None
        self._post(module, args, kwargs, output)
        return None

    def _post_fast(self, info: "ModuleInfo", x: Any, out: Any) -> bool:
        """The hot path of :meth:`_post` (one call per module per step): a module of an
        unsampled training step that took one tensor and returned one, whose input reaches
        no earlier step, with autocast off as before. Everything it does is what
        ``StateAges.track`` and ``_track_autocast`` do in that case, in one frame (the general
        path costs ~4 Python frames per module, each paid with cold caches right after the
        module's own computation). Returns False, having changed nothing the general path
        would not also do, when the case is any other; the general path then handles it."""
        guard = self.guard
        if guard.inject or "forward" in guard.disabled or self.boundary.consumed:
            return False
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
            return False
        try:
            if not torch.is_grad_enabled() or functorch_active():
                return False
            prev = info.amp
            dev = info.device_type
            if prev is None or prev[0] or dev is None:
                return False
            try:
                if torch.is_autocast_enabled(dev):
                    return False
            except Exception:  # noqa: BLE001 - device types without autocast: as _track_autocast
                pass
            step = self.ctx.open.index
            fn = x.grad_fn
            if fn is not None:
                mr = self.ages.reach(x)
                if mr is None:  # made outside watched modules, nothing dated near: dated now
                    date(fn, step, step)
                elif mr[0] != step or mr[1] != step:
                    return False  # an input from an earlier step's graph: the general path
            ofn = out.grad_fn
            if ofn is not None:
                date(ofn, step, step)
        except Exception as exc:  # noqa: BLE001 - isolation, as @guarded
            guard.fail("forward", exc)
        return True

    @guarded("forward")
    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.auto:
            self.depth = max(0, self.depth - 1)
        elif self.boundary.consumed:  # a forward after clipping with no step: see _pre
            self.boundary.maybe_abandon()
        info = self.disc.module_info.get(module)
        if info is None or functorch_active():
            return
        if torch.is_grad_enabled():
            self.ages.track(info, args, kwargs, output)
        self._track_autocast(info, args, output)
        ctx = self.ctx
        if ctx.deep is not None and ctx.open.sampled and torch.is_grad_enabled():
            ctx.deep.on_forward(module, info, args, kwargs, output)

    def _track_autocast(self, info: "ModuleInfo", args: Any, output: Any) -> None:
        dev = info.device_type
        if dev is None:
            ts = iter_tensors(args)
            if not ts:
                return
            dev = info.device_type = ts[0].device.type
        grad = torch.is_grad_enabled()  # training forward vs evaluation (no_grad) forward
        prev = info.amp if grad else info.amp_eval
        try:
            enabled = torch.is_autocast_enabled(dev)
            if not enabled and prev is not None and not prev[0]:
                return  # hot path: autocast off, as before
            dtype = str(torch.get_autocast_dtype(dev)).replace("torch.", "") if enabled else "none"
        except Exception:  # noqa: BLE001 - device types without autocast
            info.amp = info.amp_eval = (False, "none", None)
            return
        out_dtype = None
        for t in iter_tensors(output):
            if t.is_floating_point():
                out_dtype = str(t.dtype).replace("torch.", "")
                break
        state = (enabled, dtype, out_dtype)
        if state != prev:
            if grad:
                info.amp = state
            else:
                info.amp_eval = state
            if enabled or prev is not None:
                ctx = self.ctx
                entry = {"enabled": enabled, "dtype": dtype, "output_dtype": out_dtype, "class": info.cls, "device": dev,
                         "grad_enabled": grad}
                known = ctx.meta["autocast"].get(info.name)
                if grad or known is None or not known.get("grad_enabled"):  # the training forward wins
                    ctx.meta["autocast"][info.name] = entry
                    ctx.meta_dirty = True
                ctx.event({"kind": "autocast", "module": info.name, "step": ctx.open.index, **entry})

    # ------------------------------------------------------------------------ losses -----
    def note_loss_function(self, name: str) -> None:
        if name not in self.loss_functions:
            self.loss_functions.add(name)
            self.ctx.meta["loss_functions"] = sorted(self.loss_functions)
            self.ctx.meta_dirty = True

    @guarded("loss")
    def on_loss_fn(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        ctx = self.ctx
        if not ctx.live() or not isinstance(out, torch.Tensor) or functorch_active():
            return
        if self.boundary.consumed:
            self.boundary.maybe_abandon()
        v = out.detach()
        if v.numel() != 1:
            with torch.no_grad():
                v = v.float().mean()
        self.note_loss_function(name)
        seg = ctx.open.current
        if torch.is_grad_enabled() and out.requires_grad:
            seg.loss_fn.append(v)
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(target, torch.Tensor) and target.is_floating_point() and not target.requires_grad:
                seg.count_data(target)
            if ctx.deep is not None and ctx.open.sampled:
                ctx.deep.on_loss_fn(name, args, kwargs, out)
        else:
            seg.eval_loss.append((self.eval_stream(), v))

    def eval_stream(self) -> int:
        """The no-grad loss stream of the current loss call: one per call site, the chain of
        the user's frames (file and line of each, innermost first) from the loss call out to
        the script (torch, gradprobe, the standard library and installed packages are
        skipped; ``gradprobe run``'s launcher below the script ends the chain). ``evaluate(loader)`` called from two lines (the training set, then the
        validation set) is two streams; a loop over validation batches at one line is one,
        averaged over its batches in each step. Only no-grad loss calls pay for this walk
        (about 2 us from a script's top level, 10 us thirty frames deep); the training path
        never does."""
        key = []
        user = self._user_code
        f: Any = sys._getframe(1)
        while f is not None:
            code = f.f_code
            u = user.get(code)
            if u is None:
                u = user[code] = _user_file(code.co_filename)
            if u:
                key.append((code, f.f_lineno))
            elif key and code.co_filename.startswith(_GRADPROBE):
                break  # below the script: ``gradprobe run``'s launcher
            f = f.f_back
        site = tuple(key)
        k = self.eval_sites.get(site)
        if k is None:
            k = self.eval_sites[site] = self._new_eval_stream(site)
        return k

    def _new_eval_stream(self, site: tuple[tuple[Any, int], ...]) -> int:
        ctx = self.ctx
        streams = list(ctx.meta.get("eval_streams") or ())  # replaced, never changed in place:
        # the writer thread may be serialising the list it holds
        if self.n_eval_streams >= MAX_EVAL_STREAMS:
            last = MAX_EVAL_STREAMS - 1
            entry = streams[last]
            if FURTHER_SITES not in entry["site"]:
                streams[last] = {**entry, "site": [*entry["site"], FURTHER_SITES]}
                ctx.meta["eval_streams"] = streams
                ctx.meta_dirty = True
            return last
        k = self.n_eval_streams
        self.n_eval_streams += 1
        chain = [f"{code.co_filename}:{line}" for code, line in site]
        ctx.meta["eval_streams"] = [*streams, {"name": eval_stream_name(k), "site": chain, "first_step": ctx.open.index}]
        ctx.meta_dirty = True
        return k

    def close(self) -> None:
        for h in self.light_handles:
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self.light_handles = []
