"""What the probe watches: models, optimizers, GradScalers, and the table of parameters.

Models are given to ``watch`` or, under ``gradprobe run``, found at their first forward
(a module called at depth 0 with parameters); optimizers are given, adopted when they update
a watched model's parameters (``optimizer=None``: those created before ``watch`` are found
once through the garbage collector's object list, later ones as they are created), or, under
``gradprobe run``, every optimizer created; a GradScaler is given, or the first enabled one
that scales a loss is adopted.

The *layout* is the table of watched parameters (the layers of the run log, in model order,
then parameters only an optimizer knows); it is rebuilt when a model or optimizer is added,
and a changed table starts a new layer segment (``layers-<k>.arrow``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from gradprobe.probe.context import Context

RECURRENT_TYPES: tuple[type, ...] = (nn.RNNBase, nn.RNNCellBase)
SATURATING_TYPES: tuple[type, ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)
RELU_TYPES: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish)


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


def as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (nn.Module, torch.optim.Optimizer)) or not isinstance(x, Iterable):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    return list(x)


def json_hparam(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and v.device.type == "cpu":
            return float(v)
        return f"tensor(device={v.device.type})"
    if isinstance(v, (tuple, list)):
        return [json_hparam(x) for x in v]
    return str(v)


def is_ddp(model: nn.Module) -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel

        return isinstance(model, DistributedDataParallel)
    except Exception:  # noqa: BLE001
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DistributedDataParallel wrappers."""
    for _ in range(3):
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None) if is_ddp(model) else None)
        if inner is None:
            break
        model = inner
    return model


def clean_name(name: str) -> str:
    """Parameter/module names without the wrappers' prefixes (compile, DDP)."""
    parts = [p for p in name.split(".") if p not in ("_orig_mod",)]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def grad_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance within which two 2-norms of one gradient, rescaled in its own
    dtype, are one factor apart: 8 units of roundoff of the dtype (a rescaled element is off
    by at most one, the norm by at most that), and at least 1e-4, the float32 accumulation of
    a large tensor's norm (float32 and float64 gradients)."""
    try:
        u = float(torch.finfo(dtype).eps) / 2 if dtype.is_floating_point else 0.0
    except TypeError:
        u = 0.0
    return max(8.0 * u, 1e-4)


class Discovery:
    """The watched models, optimizers and scalers, and the layout of watched parameters.

    ``module_hooks`` (forward pre and post hook callables), ``optimizer_hooks`` (step pre and
    post) and ``on_ddp_model``/``on_layout`` (callbacks) are wired by the probe before the
    first model is added.
    """

    def __init__(self, ctx: "Context", *, global_optimizer_hooks: bool) -> None:
        self.ctx = ctx
        self.module_info: "weakref.WeakKeyDictionary[nn.Module, ModuleInfo]" = weakref.WeakKeyDictionary()
        self.roots: list[tuple[str, nn.Module]] = []
        self.root_ids: set[int] = set()
        self.prefix_all = False
        self.optimizers: list[OptInfo] = []
        self.scalers: list[ScalerInfo] = []
        self.layers: list[LayerInfo] = []
        self.param_index: dict[int, int] = {}
        self.all_scope: list[int] = []
        self.tolerances: tuple[float, ...] = ()  # per layer: grad_tolerance of its dtype
        self.segment_id = -1
        self.global_optimizer_hooks = global_optimizer_hooks
        # activation modules without parameters: hooked only while a sampled step is open
        self.light_modules: list[nn.Module] = []
        # non-root modules with parameters: their forward-pre hook only serves the sampled
        # probes (the post hook, which dates what they output, stays on every step)
        self.pre_modules: list[nn.Module] = []
        self.handles: list[Any] = []
        self.module_hooks: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self.optimizer_hooks: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self.on_ddp_model: Callable[[nn.Module], None] = lambda model: None
        self.on_layout: Callable[[list[LayerInfo]], None] = lambda layers: None
        self.on_new_hooks: Callable[[], None] = lambda: None
        self._layout_version = 0
        self._layout_built = -1

    # ------------------------------------------------------------------------- models -----
    def add_root(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradprobe.watch: expected an nn.Module, got {type(model).__name__}")
        ctx = self.ctx
        base = unwrap(model)
        cls = type(base).__name__
        if ctx.auto and not any(True for _ in model.parameters()):
            # parameterless module called on its own (a loss module): known, not a model
            self.module_info[model] = ModuleInfo(
                name=cls[:1].lower() + cls[1:], cls=cls, root="", is_loss=isinstance(model, nn.modules.loss._Loss)
            )
            return
        if ctx.auto and self.roots:
            self._demote_nested(model)
        if not self.roots and not self.prefix_all:
            root_name = ""
        else:
            root_name = cls[:1].lower() + cls[1:]
            taken = {n for n, _ in self.roots}
            k = 1
            while root_name in taken:
                k += 1
                root_name = f"{cls[:1].lower() + cls[1:]}{k}"
        self.roots.append((root_name, model))
        self.root_ids.add(id(model))
        prefix = f"{root_name}." if root_name else ""
        for name, mod in model.named_modules():
            full = (prefix + clean_name(name)).rstrip(".") or (root_name or cls.lower())
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
            self.module_info[mod] = info
            ctx.meta.setdefault("modules", {})[full] = info.cls
            if ctx.auto:
                continue  # global hooks see every module
            if info.light:
                if info.saturating or info.relu_like:
                    self.light_modules.append(mod)  # the activation probes' hooks, on sampled steps
                continue  # else nothing to measure on it: no hooks (containers, dropout, reshapes)
            assert self.module_hooks is not None
            pre, post = self.module_hooks
            if mod is model:
                self.handles.append(mod.register_forward_pre_hook(pre))
            else:
                self.pre_modules.append(mod)
            self.handles.append(mod.register_forward_hook(post, with_kwargs=True, always_call=True))
        self.on_new_hooks()
        ddp = is_ddp(model)
        if ddp:
            self.on_ddp_model(model)
        ctx.meta["models"].append({
            "name": root_name or cls,
            "class": cls,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "compiled": hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod"),
            "ddp": ddp,
        })
        for name, mod in model.named_modules():
            if isinstance(mod, RECURRENT_TYPES):
                info = self.module_info.get(mod)
                ctx.meta["recurrent"].append({
                    "module": info.name if info else name,
                    "class": type(mod).__name__,
                    "hidden_size": int(getattr(mod, "hidden_size", 0) or 0),
                    "num_layers": int(getattr(mod, "num_layers", 1) or 1),
                    "input_size": int(getattr(mod, "input_size", 0) or 0),
                    "lookback": None,
                })
        self._layout_version += 1
        ctx.meta_dirty = True

    def _demote_nested(self, model: nn.Module) -> None:
        """Earlier roots that ``model`` contains are its parts, not models. A script that calls
        layers on their own before wrapping them (``for m in layers: h = m(h)`` to print the
        activation scale at init, then ``nn.Sequential(*layers)``) made each of them a root at
        that first call; left so, every layer's input would count as the run's data (a NaN
        activation read as NaN data) and their parameters would carry the wrong names."""
        inside = {id(m) for m in model.modules()}
        nested = [(n, r) for n, r in self.roots if id(r) in inside]
        if not nested:
            return
        modules = self.ctx.meta.setdefault("modules", {})
        for _, r in nested:
            for mod in r.modules():
                old = self.module_info.get(mod)
                if old is not None:
                    modules.pop(old.name, None)
        gone = {n or type(unwrap(r)).__name__ for n, r in nested}
        self.roots = [(n, r) for n, r in self.roots if id(r) not in inside]
        self.root_ids -= {id(r) for _, r in nested}
        self.ctx.meta["models"] = [m for m in self.ctx.meta["models"] if m["name"] not in gone]

    def is_root(self, module: nn.Module) -> bool:
        return id(module) in self.root_ids

    # --------------------------------------------------------------------- optimizers -----
    def add_optimizer(self, opt: torch.optim.Optimizer) -> OptInfo | None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"gradprobe.watch: expected a torch.optim.Optimizer, got {type(opt).__name__}")
        for info in self.optimizers:
            if info.optimizer is opt:
                return info
        info = OptInfo(index=len(self.optimizers), optimizer=opt)
        self.optimizers.append(info)
        if not self.global_optimizer_hooks:
            assert self.optimizer_hooks is not None
            pre, post = self.optimizer_hooks
            self.handles.append(opt.register_step_pre_hook(pre))
            self.handles.append(opt.register_step_post_hook(post))
        self.ctx.meta["optimizers"].append(self._opt_meta(info))
        self._layout_version += 1
        self.ctx.meta_dirty = True
        return info

    def _opt_meta(self, info: OptInfo) -> dict[str, Any]:
        opt = info.optimizer
        groups = []
        for g in opt.param_groups:
            groups.append({k: json_hparam(v) for k, v in g.items() if k != "params"})
        info.config = groups
        return {
            "index": info.index,
            "class": type(opt).__name__,
            "fused": bool(opt.param_groups[0].get("fused")) if opt.param_groups else False,
            "param_groups": groups,
        }

    def opt_info(self, opt: Any) -> OptInfo | None:
        """The watched optimizer's info; adopts ``opt`` under ``gradprobe run``, or when it
        updates a watched model's parameters (``optimizer=None``); None if not watched."""
        for info in self.optimizers:
            if info.optimizer is opt:
                return info
        if self.ctx.auto:
            return self.add_optimizer(opt)
        if self.global_optimizer_hooks and self.roots:
            own = {id(p) for _, m in self.roots for p in m.parameters()}
            if any(id(p) in own for g in opt.param_groups for p in g["params"]):
                return self.add_optimizer(opt)
        return None

    def adopt_existing_optimizers(self) -> None:
        """optimizer=None: adopt optimizers created before watch() that update the models
        (found once, through the garbage collector's object list)."""
        import gc
        import warnings

        own = {id(p) for _, m in self.roots for p in m.parameters()}
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
            self.add_optimizer(obj)

    # ------------------------------------------------------------------------ scalers -----
    def add_scaler(self, scaler: Any) -> ScalerInfo:
        for info in self.scalers:
            if info.scaler is scaler:
                return info
        info = ScalerInfo(index=len(self.scalers), scaler=scaler)
        self.scalers.append(info)
        self.ctx.meta["scalers"].append(
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
        self.ctx.meta_dirty = True
        return info

    def scaler_info(self, scaler: Any, adopt: bool = False) -> ScalerInfo | None:
        for info in self.scalers:
            if info.scaler is scaler:
                return info
        if self.ctx.auto or (adopt and not self.scalers):
            return self.add_scaler(scaler)
        return None

    # ------------------------------------------------------------------------- layout -----
    def ensure_layout(self) -> None:
        """Rebuilds the table of watched parameters if a model or optimizer was added since."""
        if self._layout_built == self._layout_version:
            return
        layers: list[LayerInfo] = []
        index: dict[int, int] = {}
        for root_name, model in self.roots:
            prefix = f"{root_name}." if root_name else ""
            for name, p in model.named_parameters():
                if id(p) in index or not p.requires_grad:
                    continue
                clean = clean_name(name)
                index[id(p)] = len(layers)
                layers.append(LayerInfo(name=prefix + clean, param=p, module=(prefix + clean).rsplit(".", 1)[0]))
        for info in self.optimizers:
            k = 0
            for g in info.optimizer.param_groups:
                for p in g["params"]:
                    if not isinstance(p, torch.Tensor) or not p.requires_grad:
                        continue
                    if id(p) not in index:
                        index[id(p)] = len(layers)
                        layers.append(LayerInfo(name=f"optimizer{info.index}.param{k}", param=p, module=f"optimizer{info.index}"))
                    k += 1
        for info in self.optimizers:
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
        same = [a.name for a in self.layers] == [b.name for b in layers] and all(
            a.param is b.param for a, b in zip(self.layers, layers))
        self._layout_built = self._layout_version
        if same and self.segment_id >= 0:
            return
        ctx = self.ctx
        ctx.flush(True)  # the records so far belong to the old table
        self.layers = layers
        self.param_index = index
        self.all_scope = list(range(len(layers)))
        self.tolerances = tuple(grad_tolerance(layer.param.dtype) for layer in layers)
        if layers:
            ctx.device = layers[0].param.device
            ctx.meta["device"] = str(ctx.device)
            ctx.meta["memory_kind"] = "cuda_allocated" if ctx.device.type == "cuda" else "rss"
        self.segment_id += 1
        ctx.meta["layer_segments"].append(
            {
                "id": self.segment_id,
                "first_step": ctx.open.index,
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
        ctx.meta_dirty = True
        self.on_layout(layers)

    def scope(self, info: OptInfo) -> list[int]:
        self.ensure_layout()
        return info.scope

    def all_layers(self) -> list[int]:
        self.ensure_layout()
        return self.all_scope

    def scope_of_params(self, params: list[torch.Tensor]) -> list[int]:
        self.ensure_layout()
        idx = self.param_index
        out = []
        for p in params:
            i = idx.get(id(p))
            if i is not None:
                out.append(i)
        return out

    def close(self) -> None:
        for h in self.handles:
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self.handles = []
        self.roots = []
        self.root_ids = set()
        self.optimizers = []
        self.scalers = []
        self.layers = []
        self.param_index = {}
        self.module_info = weakref.WeakKeyDictionary()
