"""The recorder: ``gradprobe.watch(...)`` returns a :class:`Probe`.

The probe watches models, optimizers and GradScalers through PyTorch's public hooks
(per-module or global forward hooks, per-optimizer or global step hooks) and the few
patches of :mod:`gradprobe.probe.patches`, and records one row per step (SPEC §4).

A *step* is one ``scaler.update()`` when a GradScaler is in use, else one
``optimizer.step()`` of every watched optimizer; see :mod:`gradprobe.probe.step` for how
several optimizers, LBFGS closures, gradient accumulation and abandoned iterations (a
``continue`` after looking at the gradients) are delimited.

Nothing here reads a device value: measurements are device tensors buffered by
:mod:`gradprobe.probe.buffer` and copied to the host in batches off the training thread.
"""

from __future__ import annotations

import atexit
import collections
import datetime as _dt
import math
import os
import platform
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from gradprobe._guard import Guard, guarded
from gradprobe._version import __version__
from gradprobe.config import ProbeConfig
from gradprobe.probe import patches
from gradprobe.probe.buffer import PendingBatch, StepRecord
from gradprobe.probe.step import OpenStep, Segment
from gradprobe.runlog import schema as S
from gradprobe.runlog.writer import RunWriter

_AGE_KEY = "gradprobe.reach"  # oldest step whose graph this node reaches
_MADE_KEY = "gradprobe.made"  # step in which this node was made
_SENTINEL_KEY = "gradprobe.sentinel"
#: seconds between two readings of the process RSS (CPU runs; see Probe._memory)
RSS_EVERY = 0.05

RECURRENT_TYPES: tuple[type, ...] = (nn.RNNBase, nn.RNNCellBase)
SATURATING_TYPES: tuple[type, ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)
RELU_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish)


class _Sentinel:
    """Stored in a step's graph (``grad_fn.metadata``); alive exactly as long as that graph."""

    __slots__ = ("step", "__weakref__")

    def __init__(self, step: int) -> None:
        self.step = step


@dataclass
class ModuleInfo:
    name: str
    cls: str
    root: str
    recurrent: bool = False
    is_loss: bool = False
    saturating: bool = False
    relu_like: bool = False
    amp: tuple[bool, str, str | None] | None = None  # (enabled, dtype, output dtype) in training forwards
    amp_eval: tuple[bool, str, str | None] | None = None  # the same in no-grad (evaluation) forwards
    device_type: str | None = None
    aged: bool = False
    # no parameters of its own, not a root, recurrent or loss module: what enters it reaches
    # the next module that has parameters (whose age walk goes through this one's node), so
    # its hooks only serve the sampled activation probes and skip every other step
    light: bool = False
    # a root ``nn.Sequential`` (its own forward, not a subclass's): it hands its input to its
    # first child and returns its last child's output, so on unsampled steps its children's
    # post hooks see every tensor its post hook would (through at most the light modules'
    # nodes, which the age walk crosses); its pre hook still counts the data
    passthrough: bool = False


@dataclass
class LayerInfo:
    name: str
    param: torch.Tensor
    module: str
    optimizer: int | None = None


@dataclass
class OptInfo:
    index: int
    optimizer: torch.optim.Optimizer
    scope: list[int] = field(default_factory=list)
    config: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ScalerInfo:
    index: int
    scaler: Any
    last_scale_obj: Any = None
    warned_tamper: bool = False


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (nn.Module, torch.optim.Optimizer)) or not isinstance(x, Iterable):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    return list(x)


def _iter_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in a (nested, up to 3 levels) tuple/list/dict, in order (hot path: no generators)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    out: list[torch.Tensor] = []
    if depth < 3:
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
        for o in items:
            if isinstance(o, torch.Tensor):
                out.append(o)
            elif isinstance(o, (tuple, list, dict)):
                out.extend(_iter_tensors(o, depth + 1))
    return out


def _json_hparam(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and v.device.type == "cpu":
            return float(v)
        return f"tensor(device={v.device.type})"
    if isinstance(v, (tuple, list)):
        return [_json_hparam(x) for x in v]
    return str(v)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _functorch_active() -> bool:
    f = _FUNCTORCH_ACTIVE
    try:
        return bool(f()) if f is not None else False
    except Exception:  # noqa: BLE001
        return False


def _date(fn: Any, made: int, reach: int) -> None:
    """Dates an autograd node: the oldest step its graph reaches (kept if already older) and
    the step that made it (kept if already dated)."""
    meta = fn.metadata
    old = meta.get(_AGE_KEY)
    meta[_AGE_KEY] = reach if old is None or old > reach else old
    if _MADE_KEY not in meta:
        meta[_MADE_KEY] = made


class Probe:
    """Records gradient health of a training run into a run directory.

    Use :func:`gradprobe.watch` to create one. A probe is a context manager; ``close()``
    removes every hook it installed and restores everything it patched.
    """

    def __init__(
        self,
        models: Any,
        optimizers: Any = None,
        *,
        scalers: Any = None,
        logdir: str | os.PathLike[str] | None = None,
        config: ProbeConfig | None = None,
        auto: bool = False,
        run_info: dict[str, Any] | None = None,
        layout: Any = None,
    ) -> None:
        self.config = config or ProbeConfig()
        self.guard = Guard()
        self.guard.on_failure = self._on_part_failure
        self.auto = auto
        self.logdir = os.fspath(logdir) if logdir is not None else default_logdir()
        self._pid = os.getpid()
        self._closed = False
        self._forked = False
        self._handles: list[Any] = []
        self._module_info: "weakref.WeakKeyDictionary[nn.Module, ModuleInfo]" = weakref.WeakKeyDictionary()
        self._roots: list[tuple[str, nn.Module]] = []
        self._root_ids: set[int] = set()
        self._optimizers: list[OptInfo] = []
        self._scalers: list[ScalerInfo] = []
        self._layers: list[LayerInfo] = []
        self._param_index: dict[int, int] = {}
        self._layout_version = 0
        self._layout_built = -1
        self._segment_id = -1
        self._layer_epoch: list[int] = []
        self._all_scope: list[int] = []
        self._grad_epoch = 0
        self._device = torch.device("cpu")
        self._scaler_mode = False
        self._active_scaler: Any = None
        self._scaled_outputs: list[tuple[Any, Any]] = []
        self._consumed = False
        self._in_step: Any = None
        self._in_step_epoch = 0
        self._depth = 0
        self._reach_stack: list[tuple[int, int]] = []
        self._sentinels: collections.deque[tuple[int, Any]] = collections.deque()
        self._records: list[StepRecord] = []
        self._flush_lock = threading.Lock()  # guards _records between the training thread and the flusher
        self._stop = threading.Event()
        self._recorded_exceptions: list[BaseException] = []
        self._last_memory = 0
        self._rss_read_at = -math.inf  # perf_counter of the last RSS reading (see _memory)
        self._t_start = time.perf_counter()
        self._last_close = self._t_start
        self._last_flush = self._t_start
        self._open = OpenStep(index=0, sampled=0 in self.config.schedule)
        # activation modules without parameters: hooked only while a sampled step is open
        self._light_modules: list[nn.Module] = []
        # non-root modules with parameters: their forward-pre hook only serves the sampled
        # probes (the post hook, which dates what they output, stays on every step)
        self._pre_modules: list[nn.Module] = []
        self._light_handles: list[Any] = []
        self._light_handles_stale = False
        self._pending_scalars: list[tuple[str, Any]] = []
        self._loss_functions: set[str] = set()
        self._meta_dirty = False
        self._after_close: list[Any] = []  # called once closed (the findings logged to MLflow)
        self._memory_kind = "rss"
        self._proc: Any = None
        self._user_exception: BaseException | None = None
        self._mem_limit_hit = False
        self.deep: Any = None

        rank, world = _rank_and_world()
        self.rank, self.world_size = rank, world
        # a process-tree layout (gradprobe run) names the run directory at the first recorded
        # step, from the rank then known (see gradprobe.tree); a process that records no step
        # writes nothing
        self._layout = layout
        self._unnamed = layout is not None
        if world > 1 and layout is None:  # one complete run directory per rank, no clobbering, no collectives
            self.logdir = os.path.join(self.logdir, f"rank{rank}")
        self._local_norms: dict[int, torch.Tensor] = {}
        self.meta: dict[str, Any] = {
            "schema": S.RUN_SCHEMA,
            "gradprobe_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "pid": self._pid,
            "argv": list(sys.argv),
            "mode": "run" if auto else "watch",
            "rank": rank,
            "world_size": world,
            "device": "cpu",
            "memory_kind": "rss",
            "config": {
                "schedule_every": self.config.schedule.every,
                "schedule_early_until": self.config.schedule.early_until,
                "deep": self.config.deep,
                "flush_seconds": self.config.flush_seconds,
            },
            "models": [],
            "recurrent": [],
            "optimizers": [],
            "scalers": [],
            "layer_segments": [],
            "loss_functions": [],
            "autocast": {},
            "probe_failures": {},
        }
        if run_info:
            self.meta.update(run_info)

        def make_writer(logdir: str, meta: dict[str, Any]) -> RunWriter:
            return RunWriter(
                logdir,
                meta,
                tensorboard=self.config.tensorboard,
                tb_layers_every=self.config.tb_layers_every,
                on_error=lambda exc: self.guard.fail("writer", exc),
            )

        self.writer: Any = make_writer(self.logdir, self.meta) if layout is None else layout.writer(make_writer)
        # process RSS: /proc/self/statm read with one pread (psutil reopens it), at most
        # every RSS_EVERY seconds (see _memory)
        self._statm: int | None = None
        self._page = 4096
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            self._statm = None
        try:
            import psutil

            self._proc = psutil.Process()
        except Exception:  # noqa: BLE001
            self._proc = None

        opts = _as_list(optimizers)
        # global optimizer hooks when optimizers are discovered (gradprobe run, optimizer=None)
        self._global_opt_hooks = auto or not opts
        models_list = _as_list(models)
        self._prefix_all = len(models_list) > 1
        for m in models_list:
            self._add_root(m)
        for o in opts:
            self._add_optimizer(o)
        if not opts and not auto and self._roots:
            self._adopt_existing_optimizers()
        for sc in _as_list(scalers):
            self._add_scaler(sc)
        if self.config.deep:
            from gradprobe.probe.deep import DeepProbes

            self.deep = DeepProbes(self)
            self._sync_light_hooks()

        patches.activate(self)
        _LIVE.add(self)
        # hands closed steps to the writer even when the script hangs between steps, so a kill
        # loses at most ~flush_seconds of records
        self._flusher = threading.Thread(target=self._flush_loop, name="gradprobe-flusher", daemon=True)
        self._flusher.start()
        if auto:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._handles.append(register_module_forward_pre_hook(self._on_forward_pre))
            self._handles.append(register_module_forward_hook(self._on_forward_post, with_kwargs=True, always_call=True))
        if self._global_opt_hooks:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            self._handles.append(register_optimizer_step_pre_hook(self._on_opt_pre))
            self._handles.append(register_optimizer_step_post_hook(self._on_opt_post))
        self._write_meta()

    # ------------------------------------------------------------------ registration ----
    def _add_root(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradprobe.watch: expected an nn.Module, got {type(model).__name__}")
        base = _unwrap(model)  # torch.compile'd / DistributedDataParallel-wrapped modules
        cls = type(base).__name__
        if self.auto and not any(True for _ in model.parameters()):
            # parameterless module called on its own (a loss module): known, not a model
            self._module_info[model] = ModuleInfo(
                name=cls[:1].lower() + cls[1:], cls=cls, root="", is_loss=isinstance(model, nn.modules.loss._Loss)
            )
            return
        if not self._roots and not self._prefix_all:
            root_name = ""
        else:
            root_name = cls[:1].lower() + cls[1:]
            taken = {n for n, _ in self._roots}
            k = 1
            while root_name in taken:
                k += 1
                root_name = f"{cls[:1].lower() + cls[1:]}{k}"
        self._roots.append((root_name, model))
        self._root_ids.add(id(model))
        prefix = f"{root_name}." if root_name else ""
        for name, mod in model.named_modules():
            clean = _clean_name(name)
            full = (prefix + clean).rstrip(".") or (root_name or cls.lower())
            info = ModuleInfo(
                name=full,
                cls=type(mod).__name__,
                root=root_name,
                recurrent=isinstance(mod, RECURRENT_TYPES),
                is_loss=isinstance(mod, nn.modules.loss._Loss),
                saturating=isinstance(mod, SATURATING_TYPES),
                relu_like=isinstance(mod, RELU_TYPES),
            )
            info.light = (mod is not model and not info.recurrent and not info.is_loss
                          and next(mod.parameters(recurse=False), None) is None)
            info.passthrough = mod is model and type(mod) is nn.Sequential and len(mod) > 0
            self._module_info[mod] = info
            self.meta.setdefault("modules", {})[full] = info.cls
            if info.light and not (info.saturating or info.relu_like):
                continue  # nothing to measure on it: no hooks (containers, dropout, reshapes)
            if info.light and not self.auto:
                self._light_modules.append(mod)  # the activation probes' hooks, on sampled steps
                continue
            if not self.auto:
                if mod is model:
                    self._handles.append(mod.register_forward_pre_hook(self._on_forward_pre))
                else:
                    self._pre_modules.append(mod)
                self._handles.append(
                    mod.register_forward_hook(self._on_forward_post, with_kwargs=True, always_call=True)
                )
        self._light_handles_stale = True
        self._sync_light_hooks()
        ddp = _is_ddp(model)
        if ddp:
            self._watch_local_grads(model)
        entry: dict[str, Any] = {
            "name": root_name or cls,
            "class": cls,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "compiled": hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod"),
            "ddp": ddp,
        }
        self.meta["models"].append(entry)
        for name, mod in model.named_modules():
            if isinstance(mod, RECURRENT_TYPES):
                info = self._module_info.get(mod)
                rec = {
                    "module": info.name if info else name,
                    "class": type(mod).__name__,
                    "hidden_size": int(getattr(mod, "hidden_size", 0) or 0),
                    "num_layers": int(getattr(mod, "num_layers", 1) or 1),
                    "input_size": int(getattr(mod, "input_size", 0) or 0),
                    "lookback": None,
                }
                self.meta["recurrent"].append(rec)
        self._layout_version += 1
        self._meta_dirty = True

    def _watch_local_grads(self, model: nn.Module) -> None:
        """Under DistributedDataParallel the gradient in ``.grad`` after backward is the
        all-reduced one. A post-accumulate-grad hook runs inside AccumulateGrad, before the
        reducer's own hook copies the gradient into its bucket, so it sees this rank's
        local gradient: its norm is recorded as ``local_grad_norm``."""
        for i, p in enumerate(model.parameters()):
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self._handles.append(p.register_post_accumulate_grad_hook(self._local_grad_hook(id(p))))

    def _local_grad_hook(self, key: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if self._closed or self._forked or p.grad is None:
                return
            try:
                with torch.no_grad():
                    self._local_norms[key] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
            except Exception as exc:  # noqa: BLE001
                self.guard.fail("local_grad", exc)

        return hook

    def _add_optimizer(self, opt: torch.optim.Optimizer) -> OptInfo | None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"gradprobe.watch: expected a torch.optim.Optimizer, got {type(opt).__name__}")
        for info in self._optimizers:
            if info.optimizer is opt:
                return info
        info = OptInfo(index=len(self._optimizers), optimizer=opt)
        self._optimizers.append(info)
        if not self._global_opt_hooks:
            self._handles.append(opt.register_step_pre_hook(self._on_opt_pre))
            self._handles.append(opt.register_step_post_hook(self._on_opt_post))
        self.meta["optimizers"].append(self._opt_meta(info))
        self._layout_version += 1
        self._meta_dirty = True
        return info

    def _opt_meta(self, info: OptInfo) -> dict[str, Any]:
        opt = info.optimizer
        groups = []
        for g in opt.param_groups:
            groups.append({k: _json_hparam(v) for k, v in g.items() if k != "params"})
        info.config = groups
        return {
            "index": info.index,
            "class": type(opt).__name__,
            "fused": bool(opt.param_groups[0].get("fused")) if opt.param_groups else False,
            "param_groups": groups,
        }

    def _add_scaler(self, scaler: Any) -> ScalerInfo:
        for info in self._scalers:
            if info.scaler is scaler:
                return info
        info = ScalerInfo(index=len(self._scalers), scaler=scaler)
        self._scalers.append(info)
        self.meta["scalers"].append(
            {
                "index": info.index,
                "class": type(scaler).__name__,
                "device": str(getattr(scaler, "_device", "?")),
                "enabled": bool(getattr(scaler, "_enabled", True)),
                "init_scale": float(getattr(scaler, "_init_scale", float("nan")) or float("nan")),
                "growth_factor": float(getattr(scaler, "_growth_factor", float("nan")) or float("nan")),
                "backoff_factor": float(getattr(scaler, "_backoff_factor", float("nan")) or float("nan")),
                "growth_interval": int(getattr(scaler, "_growth_interval", 0) or 0),
            }
        )
        self._meta_dirty = True
        return info

    def _scaler_info(self, scaler: Any, adopt: bool = False) -> ScalerInfo | None:
        for info in self._scalers:
            if info.scaler is scaler:
                return info
        if self.auto or (adopt and not self._scalers):
            return self._add_scaler(scaler)
        return None

    def _opt_info(self, opt: Any) -> OptInfo | None:
        for info in self._optimizers:
            if info.optimizer is opt:
                return info
        if self.auto:
            return self._add_optimizer(opt)
        # optimizer=None: adopt optimizers that update the watched models' parameters
        if self._global_opt_hooks and self._roots:
            own = {id(p) for _, m in self._roots for p in m.parameters()}
            if any(id(p) in own for g in opt.param_groups for p in g["params"]):
                return self._add_optimizer(opt)
        return None

    # ----------------------------------------------------------------------- layout -----
    def _ensure_layout(self) -> None:
        if self._layout_built == self._layout_version:
            return
        layers: list[LayerInfo] = []
        index: dict[int, int] = {}
        for root_name, model in self._roots:
            prefix = f"{root_name}." if root_name else ""
            for name, p in model.named_parameters():
                if id(p) in index or not p.requires_grad:
                    continue
                clean = _clean_name(name)
                index[id(p)] = len(layers)
                layers.append(LayerInfo(name=prefix + clean, param=p, module=(prefix + clean).rsplit(".", 1)[0]))
        for info in self._optimizers:
            k = 0
            for g in info.optimizer.param_groups:
                for p in g["params"]:
                    if not isinstance(p, torch.Tensor) or not p.requires_grad:
                        continue
                    if id(p) not in index:
                        index[id(p)] = len(layers)
                        layers.append(LayerInfo(name=f"optimizer{info.index}.param{k}", param=p, module=f"optimizer{info.index}"))
                    k += 1
        for info in self._optimizers:
            info.scope = []
            seen: set[int] = set()
            for g in info.optimizer.param_groups:
                for p in g["params"]:
                    i = index.get(id(p)) if isinstance(p, torch.Tensor) else None
                    if i is not None and i not in seen:
                        seen.add(i)
                        info.scope.append(i)
                        if layers[i].optimizer is None:
                            layers[i].optimizer = info.index
        names_old = [layer.name for layer in self._layers]
        names_new = [layer.name for layer in layers]
        same = names_old == names_new and all(a.param is b.param for a, b in zip(self._layers, layers))
        self._layout_built = self._layout_version
        if same and self._segment_id >= 0:
            return
        self._flush(force=True)
        self._layers = layers
        self._param_index = index
        self._layer_epoch = [-1] * len(layers)
        self._all_scope = list(range(len(layers)))
        if layers:
            self._device = layers[0].param.device
            self.meta["device"] = str(self._device)
            if self._device.type == "cuda":
                self._memory_kind = "cuda_allocated"
                self.meta["memory_kind"] = self._memory_kind
        self._segment_id += 1
        self.meta["layer_segments"].append(
            {
                "id": self._segment_id,
                "first_step": self._open.index,
                "layers": [
                    {
                        "name": layer.name,
                        "shape": list(layer.param.shape),
                        "numel": int(layer.param.numel()),
                        "dtype": str(layer.param.dtype).replace("torch.", ""),
                        "module": layer.module,
                        "optimizer": layer.optimizer,
                    }
                    for layer in layers
                ],
            }
        )
        self._meta_dirty = True

    # ------------------------------------------------------------------ measurements ----
    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor 2-norms as 0-d float32 tensors on the probe's device, from one
        ``_foreach_norm`` pass when the tensors share a device (not stacked here: the closed
        step's record stacks all its 0-d values at once, see ``StepRecord.compact``)."""
        with torch.no_grad():
            if not any(t.is_sparse for t in tensors):
                dev = tensors[0].device
                if all(t.device == dev for t in tensors):
                    try:
                        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
                    except (TypeError, RuntimeError):
                        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
                    return norms if dev == self._device else [n.to(self._device, non_blocking=True) for n in norms]
            norms = []
            for t in tensors:
                v = t.coalesce().values() if t.is_sparse else t
                norms.append(torch.linalg.vector_norm(v, dtype=torch.float32).to(self._device, non_blocking=True))
            return norms

    def _measure(self, scope: list[int], scale: torch.Tensor | None = None,
                 known: tuple[list[int], list[torch.Tensor]] | None = None) -> None:
        """Per-layer gradient norms for ``scope`` unless measured since the last backward.

        ``known``: (ids of gradients, their 2-norms) that ``clip_grad_norm_`` has just
        computed itself; used instead of a second pass over the gradients when they cover
        every gradient to measure."""
        self._ensure_layout()
        epoch = self._grad_epoch
        todo: list[int] = []
        grads: list[torch.Tensor] = []
        le = self._layer_epoch
        for i in scope:
            if le[i] == epoch:
                continue
            le[i] = epoch
            g = self._layers[i].param.grad
            if g is not None:
                todo.append(i)
                grads.append(g)
        if not grads:
            return
        norms: list[torch.Tensor] | None = None
        if known is not None:
            where = {i: k for k, i in enumerate(known[0])}
            ks = [where.get(id(g)) for g in grads]
            if None not in ks:
                norms = [known[1][k] for k in ks]
        if norms is None:
            norms = self._norms(grads)
        if scale is not None:
            with torch.no_grad():
                norms = list(torch._foreach_div(norms, scale.to(norms[0].device)))
        self._open.current.grad_pieces.append((tuple(todo), norms))  # tuples of ints: never tracked by the GC

    def _usable_norms(self, known: tuple[list[int], list[torch.Tensor]]) -> bool:
        """Norms ``clip_grad_norm_`` computed are used as recorded ones when they are what
        the probe's own pass would give: float32 on the probe's device (half-precision norms
        overflow at 65504). They come from one ``torch._foreach_norm`` call, whose results
        share the inputs' device (foreach ops take one device): the first tells it."""
        norms = known[1]
        f32 = torch.float32
        return bool(norms) and norms[0].device == self._device and all(n.dtype is f32 for n in norms)

    def _scale_for(self, opt: Any) -> torch.Tensor | None:
        """The scale the current gradients are still multiplied by, or None."""
        sc = self._active_scaler
        if sc is None or not getattr(sc, "_enabled", False) or getattr(sc, "_scale", None) is None:
            return None
        if opt is not None:
            state = sc._per_optimizer_states.get(id(opt)) if hasattr(sc._per_optimizer_states, "get") else None
            if state is not None:
                stage = getattr(state.get("stage"), "name", "")
                if stage in ("UNSCALED", "STEPPED"):
                    return None
        return sc._scale

    def _scope(self, info: OptInfo) -> list[int]:
        self._ensure_layout()
        return info.scope

    def _scope_of_params(self, params: list[torch.Tensor]) -> list[int]:
        self._ensure_layout()
        idx = self._param_index
        out = []
        for p in params:
            i = idx.get(id(p))
            if i is not None:
                out.append(i)
        return out

    # ----------------------------------------------------------------- hook handlers ----
    def _live(self) -> bool:
        return not self._closed and not self._forked

    @guarded("backward")
    def _on_backward_start(self, tensors: Any, retain_graph: bool) -> None:
        if not self._live():
            return
        self._maybe_abandon()
        if self._open.current.n_backward and self._in_step is None and self._grads_cleared():
            # the previous iteration's gradients were cleared (zero_grad(set_to_none=True),
            # p.grad = None) without an optimizer step: a manual-update loop; it was a step
            self._close_step()
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors) if isinstance(tensors, (list, tuple)) else []
        seg = self._open.current
        scaled = self._scaled_outputs
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
            (seg.inner_roots if self._in_step is not None else seg.roots).append(v)
            if self.deep is not None and self._open.sampled and r.grad_fn is not None:
                self.deep.on_backward_root(r)
            fn = r.grad_fn
            if fn is not None:
                s = _Sentinel(self._open.index)
                fn.metadata[_SENTINEL_KEY] = s
                self._sentinels.append((self._open.index, weakref.ref(s)))
        self._scaled_outputs = []
        seg.n_backward += 1
        seg.retain_graph |= retain_graph

    def _grads_cleared(self) -> bool:
        """All watched gradients are None (checked only when a step already saw a backward:
        gradient accumulation keeps them, so it is never split)."""
        self._ensure_layout()
        return bool(self._layers) and all(layer.param.grad is None for layer in self._layers)

    def _maybe_abandon(self) -> None:
        """Gradients were examined (clip / unscale_ / scaler.step) and the next iteration
        starts without an optimizer step or update: the iteration was abandoned (a
        ``continue`` on an inf norm). Close it before recording the next one."""
        if self._consumed and self._in_step is None:
            self._close_step(abandoned=True)

    def _on_backward_end(self, dt: float) -> None:
        self._backward_end(dt)
        self._memory_gate()

    @guarded("backward")
    def _backward_end(self, dt: float) -> None:
        if not self._live():
            return
        self._open.current.backward_time += dt
        self._grad_epoch += 1
        if self._backward_is_step():
            # no optimizer at all (manual ``p.data`` updates): each backward is one step
            self._measure(self._all_scope_now())
            self._close_step()

    def _all_scope_now(self) -> list[int]:
        self._ensure_layout()
        return self._all_scope

    def _backward_is_step(self) -> bool:
        return not self._optimizers and not self._scaler_mode and self._in_step is None

    @guarded("backward")
    def _on_backward_error(self, exc: BaseException) -> None:
        if not self._live():
            return
        self._record_exception(exc, where="backward")

    def record_exception(self, exc: BaseException, where: str = "script") -> None:
        """Records an exception the run ended with (once per exception object) and flushes."""
        if self._closed or self._forked:
            return
        self.guard.call("exception", self._record_exception, exc, where)

    def _record_exception(self, exc: BaseException, where: str) -> None:
        if any(e is exc for e in self._recorded_exceptions):
            return
        self._recorded_exceptions = (self._recorded_exceptions + [exc])[-8:]
        msg = str(exc)
        seg = self._open.current if self._open.current.state_age >= self._open.sealed.state_age else self._open.sealed
        self.writer.put_event(
            {
                "kind": "exception",
                "where": where,
                "step": self._open.index,
                "type": type(exc).__name__,
                "message": msg[:2000],
                "state_age": seg.state_age,
                "state_age_module": seg.state_age_module,
                "retain_graph": self._open.current.retain_graph or self._open.sealed.retain_graph,
                "wall_time": time.time(),
            }
        )
        self._flush(force=True)

    @guarded("clip")
    def _on_clip(self, params: list[torch.Tensor], max_norm: Any, total_norm: Any, after: bool = False,
                 known: tuple[list[int], list[torch.Tensor]] | None = None) -> None:
        if not self._live():
            return
        scope = self._scope_of_params(params)
        if not scope:
            return
        opt_index = self._layers[scope[0]].optimizer
        opt = self._optimizers[opt_index].optimizer if opt_index is not None else None
        scale = self._scale_for(opt)
        seg = self._open.current
        if not after:
            self._measure(scope, scale, known if known is not None and self._usable_norms(known) else None)
        if scale is not None:
            seg.clip_on_scaled = True
        if isinstance(total_norm, torch.Tensor):
            tn = total_norm.detach()
            seg.clip_total_norm = tn
            if isinstance(max_norm, torch.Tensor):  # rare: the coefficient on the device
                with torch.no_grad():
                    seg.clip_pieces.append((tuple(scope), torch.clamp(max_norm / (tn.float() + 1e-6), max=1.0), None))
            else:  # the coefficient min(max_norm / (total + 1e-6), 1) is computed on the host
                seg.clip_pieces.append((tuple(scope), tn, float(max_norm)))
        if isinstance(max_norm, torch.Tensor):
            seg.clip_max_norm_tensor = max_norm.detach()
            seg.clip_max_norm = None
        else:
            seg.clip_max_norm = float(max_norm)
            seg.clip_max_norm_tensor = None
        seg.clip_calls += 1
        self._consumed = True

    @guarded("scaler")
    def _on_scaler_created(self, scaler: Any) -> None:
        if self._live() and self.auto:
            self._add_scaler(scaler)

    @guarded("optimizer")
    def _on_optimizer_created(self, opt: Any) -> None:
        if not self._live():
            return
        if self.auto:
            self._add_optimizer(opt)
        elif self._global_opt_hooks:
            self._opt_info(opt)  # adopts it if it updates the watched models

    def _adopt_existing_optimizers(self) -> None:
        """optimizer=None: adopt optimizers created before watch() that update the models
        (found once, through the garbage collector's object list)."""
        import gc
        import warnings

        own = {id(p) for _, m in self._roots for p in m.parameters()}
        found = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on deprecated lazy objects warns
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.optim.Optimizer) and any(
                        id(p) in own for g in obj.param_groups for p in g["params"]
                    ):
                        found.append(obj)
                except Exception:  # noqa: BLE001 - half-built or exotic objects
                    continue
        for obj in found:
            self._add_optimizer(obj)

    @guarded("scaler")
    def _on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        if not self._live() or not getattr(scaler, "_enabled", False):
            return
        info = self._scaler_info(scaler, adopt=True)
        if info is None:
            return
        self._maybe_abandon()
        self._scaler_mode = True
        self._active_scaler = scaler
        seg = self._open.current
        cur = scaler._scale
        if info.last_scale_obj is not None and cur is not info.last_scale_obj:
            seg.scale_tampered = True
            self._tamper_event(info, "the GradScaler's _scale was replaced outside update()")
        info.last_scale_obj = cur
        if seg.scale_before is None and isinstance(cur, torch.Tensor):
            seg.scale_before = cur.detach().clone()
        seg.scaled_by = scaler
        if isinstance(result, torch.Tensor):
            self._scaled_outputs.append((weakref.ref(result), outputs))

    def _tamper_event(self, info: ScalerInfo, what: str) -> None:
        if not info.warned_tamper:
            info.warned_tamper = True
            self.writer.put_event({"kind": "scaler_misuse", "what": "scale_set_by_hand", "detail": what, "step": self._open.index})

    @guarded("scaler")
    def _on_unscale(self, scaler: Any, opt: Any) -> None:
        if not self._live() or self._scaler_info(scaler, adopt=True) is None:
            return
        info = self._opt_info(opt)
        if info is not None:
            self._measure(self._scope(info), None)
        self._consumed = True

    @guarded("scaler")
    def _on_scaler_step(self, scaler: Any, opt: Any) -> None:
        if not self._live() or self._scaler_info(scaler, adopt=True) is None:
            return
        self._consumed = True

    @guarded("scaler")
    def _on_update_start(self, scaler: Any, new_scale: Any) -> None:
        if not self._live() or not getattr(scaler, "_enabled", False):
            return
        info = self._scaler_info(scaler, adopt=True)
        if info is None:
            return
        found = [
            t
            for st in scaler._per_optimizer_states.values()
            for t in st.get("found_inf_per_device", {}).values()
            if isinstance(t, torch.Tensor)
        ]
        if found:
            with torch.no_grad():
                total = found[0].detach().to(self._device).float()
                for t in found[1:]:
                    total = total + t.detach().to(self._device).float()
                self._open.found_inf = total
        if info.last_scale_obj is not None and scaler._scale is not info.last_scale_obj:
            self._open.current.scale_tampered = True
            self._tamper_event(info, "the GradScaler's _scale was replaced between scale() and update()")
        if new_scale is not None:
            self.writer.put_event({"kind": "scaler_misuse", "what": "update_new_scale", "detail": "update(new_scale=...) set the scale by hand", "step": self._open.index})

    def _on_update_end(self, scaler: Any) -> None:
        self._update_end(scaler)
        self._memory_gate()

    @guarded("scaler")
    def _update_end(self, scaler: Any) -> None:
        if not self._live() or not getattr(scaler, "_enabled", False):
            return
        info = self._scaler_info(scaler)
        if info is None:
            return
        if isinstance(scaler._scale, torch.Tensor):
            self._open.scale_after = scaler._scale.detach().clone()
        info.last_scale_obj = scaler._scale
        self._open.scaler_updated = True
        self._active_scaler = None
        self._consumed = False
        self._close_step()

    @guarded("optimizer")
    def _on_opt_pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        if not self._live():
            return
        info = self._opt_info(opt)
        if info is None:
            return
        if self._open.has_stepped(opt):
            self._close_step(split=True)
        self._in_step = opt
        self._in_step_epoch = self._grad_epoch
        self._measure(self._scope(info), self._scale_for(opt))
        if self.deep is not None and self._open.sampled:
            self.deep.on_pre_step(info)

    def _on_opt_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._opt_post(opt, args, kwargs)
        self._memory_gate()

    @guarded("optimizer")
    def _opt_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        if not self._live():
            return
        info = self._opt_info(opt)
        if info is None:
            return
        self._in_step = None
        if self._grad_epoch != self._in_step_epoch:  # closure backward inside step (LBFGS)
            self._measure(self._scope(info), None)
        scope = self._scope(info)
        params = [self._layers[i].param for i in scope]
        weights = self._norms(params) if params else []
        if params:
            self._open.weight_pieces.append((tuple(scope), weights))
        st = self._open
        st.optimizer_steps += 1
        st.stepped.append(opt)
        closing = not self._scaler_mode and all(st.has_stepped(o.optimizer) for o in self._optimizers)
        if not closing:  # (closing seals it)
            st.seal()
        self._consumed = False
        if self.deep is not None and st.sampled:
            self.deep.on_post_step(info, weights)
        if closing:
            self._close_step()

    def _sync_light_hooks(self) -> None:
        """Hooks the parameter-free activation modules, and the forward-pre side of the
        other non-root modules, while a sampled step with deep probes is open, and unhooks
        them otherwise: on the other steps nothing is measured there (the root's pre hook
        counts the data; the post hooks date what modules output), and every hook call is
        Python on the training thread."""
        want = self.deep is not None and self._open.sampled and not self._closed
        if self._light_handles and (not want or self._light_handles_stale):
            for h in self._light_handles:
                h.remove()
            self._light_handles = []
        self._light_handles_stale = False
        if want and not self._light_handles:
            for mod in self._pre_modules:
                self._light_handles.append(mod.register_forward_pre_hook(self._on_forward_pre))
            for mod in self._light_modules:
                self._light_handles.append(mod.register_forward_pre_hook(self._on_forward_pre))
                self._light_handles.append(
                    mod.register_forward_hook(self._on_forward_post, with_kwargs=True, always_call=True))

    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        if self._closed or self._forked:
            return None
        if patches._is_compiling():
            return None
        if not self.auto:
            info = self._module_info.get(module)
            if info is not None and info.light and not self._open.sampled:
                return None  # hot path: an activation module on an unsampled step
        self._forward_pre(module, args)
        return None

    @guarded("forward")
    def _forward_pre(self, module: nn.Module, args: Any) -> None:
        if _functorch_active():
            if self.auto:
                self._depth += 1
            return
        if self._consumed:
            self._maybe_abandon()
        elif self._open.current.loss_fn and not self._open.current.n_backward and self._in_step is None \
                and id(module) in self._root_ids and torch.is_grad_enabled():
            # a new training forward of the model after a training loss that was never
            # backpropagated: the loop skipped that iteration (``if not isfinite(loss): continue``)
            self._close_step(abandoned=True)
        info = self._module_info.get(module)
        if self.auto:
            depth = self._depth
            self._depth += 1
            if info is None and depth == 0 and not _functorch_active():
                self._add_root(module)
                info = self._module_info.get(module)
        if id(module) in self._root_ids and args and torch.is_grad_enabled() \
                and not (self.deep is not None and self.deep._side):
            # the data of every training forward, counted on every step: a NaN batch between
            # two sampled steps is still seen, and named, at its step (GP404)
            x = args[0]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                self._open.current.count_data(x)
        if info is not None and self.deep is not None and self._open.sampled and torch.is_grad_enabled():
            self.deep.on_forward_pre(module, info, args)

    def _on_forward_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._closed or self._forked:
            return None
        if patches._is_compiling():
            return None
        if not self.auto:
            info = self._module_info.get(module)
            if info is not None and not self._open.sampled:
                if info.light or info.passthrough:
                    return None
                if not kwargs and len(args) == 1 and self._forward_post_fast(info, args[0], output):
                    return None
        self._forward_post(module, args, kwargs, output)
        return None

    def _forward_post_fast(self, info: ModuleInfo, x: Any, out: Any) -> bool:
        """The hot path of :meth:`_forward_post` (one call per module per step): a module of
        an unsampled training step that took one tensor and returned one, whose input
        reaches no earlier step, with autocast off as before. Everything it does is what
        ``_track_age`` and ``_track_autocast`` do in that case, in one frame (the general
        path costs ~4 Python frames per module, each paid with cold caches right after the
        module's own computation). Returns False, having changed nothing the general path
        would not also do, when the case is any other; the general path then handles it."""
        guard = self.guard
        if guard.inject or "forward" in guard.disabled or self._consumed:
            return False
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
            return False
        try:
            if not torch.is_grad_enabled() or _functorch_active():
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
            step = self._open.index
            fn = x.grad_fn
            if fn is not None:
                mr = self._reach(x)
                if mr is None:  # made outside watched modules, nothing dated near: dated now
                    _date(fn, step, step)
                elif mr[0] != step or mr[1] != step:
                    return False  # an input from an earlier step's graph: the general path
            ofn = out.grad_fn
            if ofn is not None:
                _date(ofn, step, step)
        except Exception as exc:  # noqa: BLE001 - isolation, as @guarded
            guard.fail("forward", exc)
        return True

    @guarded("forward")
    def _forward_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.auto:
            self._depth = max(0, self._depth - 1)
        elif self._consumed:  # a forward after clipping with no step: see _forward_pre
            self._maybe_abandon()
        info = self._module_info.get(module)
        if info is None or _functorch_active():
            return
        if torch.is_grad_enabled():
            self._track_age(module, info, args, kwargs, output)
        self._track_autocast(info, args, output)
        if self.deep is not None and self._open.sampled and torch.is_grad_enabled():
            self.deep.on_forward(module, info, args, kwargs, output)

    def _reach(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(made, reach) of ``t``'s graph: the step that made it and the oldest step its
        graph reaches; None if unknown (made outside watched modules and more than
        ``age_walk_nodes`` nodes away from a stamped one, or from leaves only)."""
        fn = t.grad_fn
        if fn is None:
            return None
        meta = fn.metadata
        r = meta.get(_AGE_KEY)
        if r is not None:
            return meta.get(_MADE_KEY, r), r
        reach: int | None = None
        made: int | None = None
        frontier = [fn]
        budget = self.config.age_walk_nodes
        while frontier and budget > 0:
            node = frontier.pop()
            budget -= 1
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                m = nxt.metadata
                r = m.get(_AGE_KEY)
                if r is not None:
                    reach = r if reach is None else min(reach, r)
                    mk = m.get(_MADE_KEY, r)
                    made = mk if made is None else max(made, mk)
                else:
                    frontier.append(nxt)
        if reach is None or made is None:
            return None
        meta[_AGE_KEY] = reach
        meta[_MADE_KEY] = made
        return made, reach

    def _track_age(self, module: nn.Module, info: ModuleInfo, args: Any, kwargs: Any, output: Any) -> None:
        step = self._open.index
        reach = step
        carried_reach = step  # oldest reach among inputs made in an earlier step
        oldest_pos = -1
        # hot path: one tensor argument, no keywords (a Linear, a conv...)
        inputs = args if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) else _iter_tensors((args, kwargs))
        for pos, t in enumerate(inputs):
            if t.grad_fn is None:
                continue
            mr = self._reach(t)
            if mr is None:
                # a graph made outside watched modules: date it now, so that if it is still
                # attached next step (an EMA, a running state), it is seen as carried
                _date(t.grad_fn, step, step)
                continue
            made, r = mr
            reach = min(reach, r)
            if made < step and r < carried_reach:
                carried_reach = r
                oldest_pos = pos
        for t in (output,) if isinstance(output, torch.Tensor) else _iter_tensors(output):
            fn = t.grad_fn
            if fn is not None:
                _date(fn, step, reach)
        age = step - carried_reach
        if age > 0:
            seg = self._open.current
            if age > seg.state_age:
                seg.state_age = age
                seg.state_age_module = info.name
            if not info.aged:
                info.aged = True
                self.writer.put_event(
                    {
                        "kind": "state_age",
                        "module": info.name,
                        "class": info.cls,
                        "step": step,
                        "age": age,
                        "input_position": oldest_pos,
                        "detail": "a tensor entering this module's forward is still attached to the graph of an earlier step",
                    }
                )

    def _track_autocast(self, info: ModuleInfo, args: Any, output: Any) -> None:
        dev = info.device_type
        if dev is None:
            ts = _iter_tensors(args)
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
        for t in _iter_tensors(output):
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
                entry = {"enabled": enabled, "dtype": dtype, "output_dtype": out_dtype, "class": info.cls, "device": dev,
                         "grad_enabled": grad}
                known = self.meta["autocast"].get(info.name)
                if grad or known is None or not known.get("grad_enabled"):  # the training forward wins
                    self.meta["autocast"][info.name] = entry
                    self._meta_dirty = True
                self.writer.put_event({"kind": "autocast", "module": info.name, "step": self._open.index, **entry})

    @guarded("loss")
    def _on_loss_fn(self, name: str, args: Any, kwargs: Any, out: Any) -> None:
        if not self._live() or not isinstance(out, torch.Tensor) or _functorch_active():
            return
        if self._consumed:
            self._maybe_abandon()
        v = out.detach()
        if v.numel() != 1:
            with torch.no_grad():
                v = v.float().mean()
        if name not in self._loss_functions:
            self._loss_functions.add(name)
            self.meta["loss_functions"] = sorted(self._loss_functions)
            self._meta_dirty = True
        if torch.is_grad_enabled() and out.requires_grad:
            self._open.current.loss_fn.append(v)
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(target, torch.Tensor) and target.is_floating_point() and not target.requires_grad:
                self._open.current.count_data(target)
            if self.deep is not None and self._open.sampled:
                self.deep.on_loss_fn(name, args, kwargs, out)
        else:
            self._open.current.eval_loss.append(v)

    # --------------------------------------------------------------- step closing -------
    @guarded("close")
    def _close_step(self, abandoned: bool = False, split: bool = False) -> None:
        st = self._open
        carry: Segment | None = None
        if split:
            carry = st.current
            st.current = Segment()
        st.seal()
        seg = st.sealed
        if not st.active() and not abandoned:
            if carry is not None:
                st.current = carry
            return
        now = time.perf_counter()
        step = st.index
        # graphs of steps at least two steps old that are still alive (retained)
        alive = 0
        sent = self._sentinels
        keep: collections.deque[tuple[int, Any]] = collections.deque()
        for s, ref in sent:
            if ref() is None:
                continue
            keep.append((s, ref))
            if s <= step - 2:
                alive += 1
        while len(keep) > 512:
            keep.popleft()
        self._sentinels = keep
        lr = float("nan")
        lr_dev = None
        if self._optimizers and self._optimizers[0].optimizer.param_groups:
            v = self._optimizers[0].optimizer.param_groups[0].get("lr", float("nan"))
            if isinstance(v, torch.Tensor):
                if v.device.type == "cpu" and v.numel() == 1:
                    v = float(v)
                else:  # a device lr (capturable optimizers): read with the record, no sync now
                    lr_dev = v.detach().reshape(-1)[:1].clone() if v.numel() else None
                    v = float("nan")
            lr = float(v)
        rec = StepRecord(
            host={
                "step": step,
                "wall_time": time.time(),
                "step_time": now - self._last_close,
                "backward_time": seg.backward_time,
                "n_backward": seg.n_backward,
                "clip_calls": seg.clip_calls,
                "clip_on_scaled": seg.clip_on_scaled,
                "clip_max_norm": seg.clip_max_norm if seg.clip_max_norm is not None else float("nan"),
                "lr": lr,
                "optimizer_steps": st.optimizer_steps,
                "scaler_updated": st.scaler_updated,
                "scale_tampered": seg.scale_tampered,
                "abandoned": abandoned,
                "state_age": seg.state_age,
                "state_age_module": seg.state_age_module,
                "graphs_alive": alive,
                "retain_graph": seg.retain_graph,
                "memory": self._memory(),
                "sampled": st.sampled,
            }
        )
        roots = seg.roots or seg.inner_roots[:1]
        for r in roots:
            rec.add("loss", r)
        for v in seg.loss_fn:
            rec.add("loss_fn", v)
        for v in seg.eval_loss:
            rec.add("eval_loss", v)
        if lr_dev is not None:
            rec.add("lr_dev", lr_dev)
        if seg.data_checks:
            rec.add("data_check", seg.data_checks)
        for idx, norms in seg.grad_pieces:
            rec.add("grad", norms, idx)
        for idx, value, max_norm in seg.clip_pieces:
            if max_norm is None:
                rec.add("clip_coef", value, idx)
            else:
                rec.add("clip", value, (idx, max_norm))
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
        if self._local_norms:
            rec.add("local_grad", list(self._local_norms.values()))
            self._local_norms = {}
        for name, value in self._pending_scalars:
            if isinstance(value, torch.Tensor):
                rec.add("scalar", value, name)
            else:
                rec.host_scalar((name, float(value)))
        self._pending_scalars = []
        if self.deep is not None and st.sampled:
            self.deep.on_close(st, rec)
        rec.compact(self._device)
        self._last_memory = rec.host["memory"]
        if self._unnamed:
            self._name_run_dir()
        with self._flush_lock:
            self._records.append(rec)
        self._last_close = now
        self._consumed = False
        nxt = step + 1
        # the next step's current segment: the split-off one, or the fresh one seal() left
        self._open = OpenStep(index=nxt, sampled=nxt in self.config.schedule,
                              current=carry if carry is not None else st.current)
        if self._light_modules or self._pre_modules:
            self._sync_light_hooks()
        if now - self._last_flush >= self.config.flush_seconds or len(self._records) >= self.config.flush_steps:
            self._flush()

    def _name_run_dir(self) -> None:
        """The first recorded step of a process-tree probe: its run directory is named from
        the rank known now (the process group usually exists by the first step, not at the
        start) and created."""
        self._unnamed = False
        rank, world = _rank_and_world()
        self.rank, self.world_size = rank, world
        self.meta["rank"], self.meta["world_size"] = rank, world
        try:
            self.logdir = self.writer.open(rank, world, {k: v for k, v in self.meta.items() if not k.startswith("_")})
        except Exception as exc:  # noqa: BLE001 - no run directory: the run goes on unrecorded
            self.guard.fail("writer", exc)

    def _records_or_steps(self) -> bool:
        return self._open.index > 0

    def _attach_trailing_eval(self) -> None:
        evals = self._open.sealed.eval_loss + self._open.current.eval_loss
        with self._flush_lock:
            if self._records:
                rec = self._records[-1]
                for v in evals:
                    rec.add("eval_loss", v)
                for name, value in self._pending_scalars:
                    if isinstance(value, torch.Tensor):
                        rec.add("scalar", value, name)
                    else:
                        rec.host_scalar((name, float(value)))
                self._pending_scalars = []
                return
        if evals:  # the last step is already on disk: keep the value as a scalar of that step
            vals = [float(v.float().mean().cpu()) for v in evals]
            self.writer.put_scalars([(self._open.index - 1, "eval_loss", sum(vals) / len(vals))])

    def _memory(self) -> int:
        """The step's memory: CUDA allocated bytes (read every step: no system call), or the
        process RSS, read at most every ``RSS_EVERY`` seconds; a step closing sooner repeats
        the last reading. The read is one system call, but the first one after a training
        step pays for the caches the step evicted: 21-29 us in the MLP loop of
        ``benchmarks/overhead.py`` (2.5 us when repeated at once; ~0.25% of that ~9 ms step).
        Rules read memory as a trend over many steps, for which a reading per 50 ms is
        plenty."""
        if self._memory_kind == "cuda_allocated":
            try:
                return int(torch.cuda.memory_allocated(self._device))
            except Exception:  # noqa: BLE001
                return 0
        now = time.perf_counter()
        if now - self._rss_read_at < RSS_EVERY:
            return self._last_memory
        self._rss_read_at = now
        if self._statm is not None:
            try:
                return int(os.pread(self._statm, 128, 0).split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                self._statm = None
        if self._proc is not None:
            try:
                return int(self._proc.memory_info().rss)
            except Exception:  # noqa: BLE001
                return 0
        return 0

    def _memory_gate(self) -> None:
        """``--memory-limit``: raised here, outside every guard, into the user's call (the
        step boundary), so the run ends with a report instead of the OOM killer's SIGKILL."""
        limit = self.config.memory_limit
        if limit is None or self._mem_limit_hit or self._closed or self._forked:
            return
        used = self._last_memory
        if used > limit:
            self._mem_limit_hit = True
            self.guard.call("memory", self.writer.put_event, {"kind": "memory_limit", "step": self._open.index, "memory": used, "limit": limit, "wall_time": time.time()})
            self.guard.call("memory", self._flush, True)
            raise MemoryError(
                f"gradprobe: process memory {used / 2**20:.0f} MiB exceeded --memory-limit "
                f"{limit / 2**20:.0f} MiB at step {self._open.index} (stopped before the kernel's OOM killer)"
            )

    def _flush(self, force: bool = False) -> None:
        # non-blocking: a signal handler (or the flusher) arriving while a flush or a step
        # close holds the lock skips, rather than handing the same records over twice
        if not self._flush_lock.acquire(blocking=False):
            return
        try:
            if self._meta_dirty:
                self._write_meta()
            if not self._records:
                return
            records, self._records = self._records, []
            self._last_flush = time.perf_counter()
            if "writer" in self.guard.disabled:
                return
            self.writer.put_batch(PendingBatch(records, len(self._layers), max(self._segment_id, 0), self._device))
        finally:
            self._flush_lock.release()

    def _flush_loop(self) -> None:
        interval = max(0.05, self.config.flush_seconds)
        while not self._stop.wait(interval):
            if self._closed or self._forked:
                return
            if self._records and time.perf_counter() - self._last_flush >= interval:
                self.guard.call("writer", self._flush)

    def _write_meta(self) -> None:
        self._meta_dirty = False
        self.meta["probe_failures"] = dict(self.guard.disabled)
        self.writer.put_meta({k: v for k, v in self.meta.items() if not k.startswith("_")})

    def _on_part_failure(self, part: str, exc: BaseException) -> None:
        self.meta["probe_failures"] = dict(self.guard.disabled)
        self._meta_dirty = True
        if part != "writer":
            self.writer.put_event({"kind": "probe_failure", "part": part, "error": f"{type(exc).__name__}: {exc}"[:500]})

    # ------------------------------------------------------------------- public API -----
    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Records extra scalars (e.g. ``val_loss``) against the current step.

        Tensors are kept on their device and copied back with the next batch. Values
        logged between steps (after the last step of an epoch) belong to the last closed
        step.
        """
        if not self._live():
            return
        self.guard.call("log", self._log, step, scalars)

    def _log(self, step: int | None, scalars: dict[str, Any]) -> None:
        target = step
        if target is None:
            st = self._open
            target = st.index if st.training_active() or st.index == 0 else st.index - 1
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().reshape(-1)[:1].float()
            else:
                value = float(value)
            if target == self._open.index:
                self._pending_scalars.append((str(name), value))
            else:
                self._late_scalar(target, str(name), value)

    def _late_scalar(self, step: int, name: str, value: Any) -> None:
        # A value for an already-closed step: attach it to that step's record if still
        # buffered, else write it directly.
        with self._flush_lock:
            for rec in reversed(self._records):
                if rec.host.get("step") == step:
                    if isinstance(value, torch.Tensor):
                        rec.add("scalar", value, name)
                    else:
                        rec.host_scalar((name, float(value)))
                    return
        if isinstance(value, torch.Tensor):
            value = float(value.cpu())  # rare path: the step already went to disk
        self.writer.put_scalars([(step, name, float(value))])

    @property
    def step(self) -> int:
        """Index of the step being recorded (= number of steps closed so far)."""
        return self._open.index

    def flush(self, timeout: float = 30.0) -> None:
        """Hands over everything recorded so far and waits until it is on disk."""
        if self._closed or self._forked:
            return
        self._flush(force=True)
        self.writer.sync(timeout)

    def close(self) -> None:
        """Closes the open step, writes everything, removes every hook and patch."""
        if self._closed:
            return
        if self._forked:
            self._closed = True
            return
        try:
            if self._open.training_active() or (self._open.active() and not self._records_or_steps()):
                self.guard.call("close", self._close_step, self._consumed and self._in_step is None)
            elif self._open.active():
                # only evaluation happened after the last step (a final validation pass): it
                # belongs to that step, not to a step of its own
                self.guard.call("close", self._attach_trailing_eval)
            self.guard.call("close", self._flush, True)
            if self.deep is not None:
                self.guard.call("deep", self.deep.close)
        finally:
            self._closed = True
            self._stop.set()
            for h in self._handles + self._light_handles:
                try:
                    h.remove()
                except Exception:  # noqa: BLE001
                    pass
            self._handles = []
            self._light_handles = []
            patches.deactivate(self)
            _LIVE.discard(self)
            self.meta["closed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            self.meta["steps"] = self._open.index
            self.meta["probe_failures"] = dict(self.guard.disabled)
            try:
                self.writer.put_meta({k: v for k, v in self.meta.items() if not k.startswith("_")})
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            if self._statm is not None:
                try:
                    os.close(self._statm)
                except OSError:
                    pass
                self._statm = None
            self._roots = []
            self._optimizers = []
            self._scalers = []
            self._layers = []
            self._param_index = {}
            self._module_info = weakref.WeakKeyDictionary()
            self._scaled_outputs = []
            self._sentinels.clear()
            self._active_scaler = None
            self._in_step = None
            self.deep = None
        for hook in self._after_close:
            self.guard.call("after close", hook)

    def runlog(self) -> Any:
        """The run recorded so far as a :class:`gradprobe.RunLog`."""
        from gradprobe.runlog import RunLog

        self.flush()
        return RunLog.load(self.logdir)

    def report(self) -> Any:
        """Analyzes the run recorded so far: a :class:`gradprobe.Report`."""
        from gradprobe.engine import analyze_runlog

        report = analyze_runlog(self.runlog())
        if not self._closed and not self._forked:
            try:
                self.writer.put_text(report_tb_tag(), report.to_markdown(), self._open.index)
                self.writer.sync()
            except Exception:  # noqa: BLE001
                pass
        else:
            write_findings_to_tensorboard(self.logdir, report)
        return report

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None and not self._closed and not self._forked:
            self.guard.call("close", self._record_exception, exc, "training loop")
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._open.index}"
        return f"<gradprobe.Probe {self.logdir!r} {state}>"


def report_tb_tag() -> str:
    from gradprobe.runlog.tensorboard import FINDINGS_TAG

    return FINDINGS_TAG


def write_findings_to_tensorboard(logdir: str, report: Any) -> None:
    """Adds the report's findings as TensorBoard text to a closed run directory."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=logdir, filename_suffix=".findings")
        w.add_text(report_tb_tag(), report.to_markdown(), global_step=int(report.source.get("steps", 0) or 0))
        w.close()
    except Exception:  # noqa: BLE001 - the report is still returned
        pass


def _rank_and_world() -> tuple[int, int]:
    """The global rank from ``torch.distributed`` once a process group exists, else from the
    launcher's environment: torchrun's ``RANK``, or ``LOCAL_RANK`` where there is no ``RANK``
    (Lightning's children); no collective."""
    try:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        rank, world = 0, 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return rank, world


def _is_ddp(model: nn.Module) -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(model, DistributedDataParallel)
    except Exception:  # noqa: BLE001
        return False


def _unwrap(model: nn.Module) -> nn.Module:
    for _ in range(3):
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None) if _is_ddp(model) else None)
        if inner is None:
            break
        model = inner
    return model


def _clean_name(name: str) -> str:
    """Parameter/module names without the wrappers' prefixes (compile, DDP)."""
    parts = [p for p in name.split(".") if p not in ("_orig_mod",)]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def default_logdir() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(os.getcwd(), "gradprobe_runs")
    path = os.path.join(base, f"{stamp}-{os.getpid()}")
    k = 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(base, f"{stamp}-{os.getpid()}-{k}")
    return path


_LIVE: "weakref.WeakSet[Probe]" = weakref.WeakSet()


def live_probes() -> list[Probe]:
    return list(_LIVE)


def _after_fork_in_child() -> None:
    # Forked children (DataLoader workers) must not write logs or touch the parent's threads.
    for p in list(_LIVE):
        p._forked = True
    patches._active.clear()


def _close_at_exit() -> None:
    for p in list(_LIVE):
        if p._pid == os.getpid():
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


def watch(
    model: Any,
    optimizer: Any = None,
    *,
    scaler: Any = None,
    logdir: str | os.PathLike[str] | None = None,
    profile: str = "default",
    sample_every: int | None = None,
    config: ProbeConfig | None = None,
    **options: Any,
) -> Probe:
    """Starts recording a training run.

    Args:
        model: an ``nn.Module`` or an iterable of them (GAN-style loops).
        optimizer: an optimizer or an iterable of them; None adopts any optimizer that
            steps the model's parameters.
        scaler: a ``torch.amp.GradScaler`` (or several); None adopts the first enabled
            scaler that scales a loss.
        logdir: run directory; default a new folder under ``./gradprobe_runs/``.
        profile: ``"default"``, ``"light"`` (no deep probes) or ``"full"`` (sample every step).
        sample_every: steady-state interval of the sampled deep probes.
        config: a full :class:`ProbeConfig` (overrides ``profile`` and options).
        **options: other :class:`ProbeConfig` fields (e.g. ``tensorboard=False``), and
            ``mlflow``: ``True`` logs the report to the MLflow run active now when the
            probe closes, or a run id (:mod:`gradprobe.integrations.mlflow`).

    Returns:
        A :class:`Probe` (a context manager).
    """
    mlflow = options.pop("mlflow", None)
    if config is None:
        if sample_every is not None:
            from gradprobe.schedule import Schedule

            options["schedule"] = Schedule(every=sample_every)
        config = ProbeConfig.profile(profile, **options)
    logger = None
    if mlflow:  # before the probe exists: without MLflow installed, nothing is attached
        from gradprobe.integrations.mlflow import ReportLogger

        logger = ReportLogger(mlflow)
    probe = Probe(model, optimizer, scalers=scaler, logdir=logdir, config=config)
    if logger is not None:
        probe._after_close.append(lambda: logger.log(probe.report))
    return probe
