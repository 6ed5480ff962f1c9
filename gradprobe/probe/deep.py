"""Sampled deep probes: *why* a run is unhealthy (the sampled signals of docs/run-log.md).

They run only on the steps of the probe's :class:`~gradprobe.schedule.Schedule`, so their
average cost is small, and everything they compute stays on the device until the step's
record is flushed (on the CPU, where there is no device to wait for, a few 0-d values are read
to skip passes that cannot change the result: see :func:`_finite_moments`). Samples are
``(probe, target, stat, index, value)`` rows:

========== ==================== ====================================================
probe      target               stats
========== ==================== ====================================================
update     parameter name       ``ratio`` = ||Δθ|| / ||θ|| across the optimizer step
grad       parameter name       ``nonfinite_count`` (exact count of NaN/Inf entries)
weight     parameter name       ``nonfinite_count`` after the optimizer step
activation module name          ``mean std absmax nonfinite`` of the output (index =
                                call order in the step), ``saturated_frac`` (sigmoid/
                                tanh modules), ``dead_frac`` (ReLU/ReLU6: units never
                                active over the batch of ``dead_rows`` rows),
                                ``input_dead_frac`` (Linear/
                                Conv input features that are exactly 0 for the whole
                                batch: units killed by a functional ReLU upstream)
gates      module.l<k>.<gate>   ``low_frac`` (< 0.01), ``high_frac`` (> 0.99) for
                                sigmoid gates; ``sat_frac`` (|v| > 0.99) for tanh ones;
                                recomputed from the module's weights for a slice of the
                                batch (the fused kernels do not expose gates)
input      module name          ``numel nonfinite mean std absmax feature_std_min
                                feature_std_max integer`` of float inputs where they
                                enter the model (the root module) and the first
                                parametric layer (``first_layer``)
target     loss function        ``numel nonfinite mean std var absmax integer
                                n_classes reduction class_entropy`` of the target (reduction:
                                0 mean, 1 sum, 2 none, 3 batchmean; class_entropy: entropy of
                                the batch's class frequencies), and ``pred_*`` of the input;
                                also found from the loss's autograd node when the loss
                                function was bound before watch()
bptt       recurrent module     ``profile`` (index k = steps back from the last output),
                                ``hidden_size``; ``horizon``, ``growth_per_step``,
                                ``far_over_near``, ``lookback`` are derived from the
                                profile by :func:`gradprobe.stats.bptt_summary`
========== ==================== ====================================================

The gradient-through-time profile is a side computation: after the optimizer step, with a
copy of (a slice of) the step's input and the module's current parameters, under
``torch.random.fork_rng`` and with ``torch.autograd.grad`` (which never touches ``.grad``),
for a few random unit projections v of the last output h_T, ||d(v·h_T)/d(x_t)|| for every t
(one backward per projection), averaged. The module's forward is called directly (no hooks)
in eval mode with cuDNN off, so inter-layer dropout neither runs nor advances any RNG stream.
Cell loops (LSTMCell/GRUCell/RNNCell called T times in one step) are replayed from the
captured inputs x_1..x_T and the first state, feeding each output back as the next state.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from gradprobe.probe.buffer import StepRecord
    from gradprobe.probe.core import DeepHost
    from gradprobe.probe.discovery import ModuleInfo, OptInfo
    from gradprobe.probe.step import OpenStep

ACT_STATS = ("mean", "std", "absmax", "nonfinite")
INPUT_STATS = ("numel", "nonfinite", "mean", "std", "absmax", "feature_std_min", "feature_std_max", "integer")
TARGET_STATS = ("numel", "nonfinite", "mean", "std", "var", "absmax", "integer", "n_classes", "reduction", "class_entropy")
#: reduction of the loss call, as recorded in the ``reduction`` target stat
REDUCTIONS = {"mean": 0.0, "sum": 1.0, "none": 2.0, "batchmean": 3.0}
#: autograd nodes of loss functions: backward roots reveal a loss the F-patch could not see
#: (a loss function bound by name before watch())
LOSS_NODES = {
    "MseLossBackward0": "mse_loss",
    "NllLossBackward0": "nll_loss",
    "SmoothL1LossBackward0": "smooth_l1_loss",
    "HuberLossBackward0": "huber_loss",
    "BinaryCrossEntropyBackward0": "binary_cross_entropy",
    "BinaryCrossEntropyWithLogitsBackward0": "binary_cross_entropy_with_logits",
    "L1LossBackward0": "l1_loss",
}
#: units whose negative side passes no gradient: only these can die
DEAD_CAPABLE = (nn.ReLU, nn.ReLU6)
PARAMETRIC = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)


def _count_nan(poison: torch.Tensor) -> torch.Tensor:
    """Number of NaN entries of a tensor holding only 0 and NaN (``t * 0``: NaN exactly
    where ``t`` is NaN/Inf), as a float32 0-d tensor: ``count_nonzero`` counts NaN (NaN != 0)
    and not -0.0, in one pass over the tensor and no temporary of its size (``nan_to_num``
    then ``sum`` is two passes and one more full-size allocation)."""
    return torch.count_nonzero(poison).to(torch.float32)


def _nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """Exact number of NaN/Inf entries of ``t`` (float32 0-d tensor, no sync)."""
    return _count_nan(t.detach() * 0)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):
        return None


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` costs no host-device sync: a plain CPU tensor (a
    memory load). Elsewhere values are not read, and callers take the path that needs none."""
    return type(t) is torch.Tensor and t.device.type == "cpu"


def _finite_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, poison, n_bad, mean, std, absmax): the moments of a float tensor over its finite
    entries, with no host sync and in a few vectorised passes (a masked ``where`` and a
    Welford ``var_mean`` are several times slower on a CPU).

    ``poison`` = ``y * 0`` is 0 at finite entries and NaN at NaN/Inf ones (counted by
    :func:`_count_nan`); ``z`` is ``y`` with NaN/Inf set to 0. The variance is two-pass:
    the deviations ``y - mean`` with NaN/Inf ones set to 0, squared and summed in one ``dot``.

    On the CPU the sum is read first (no sync there): a finite sum means no NaN/Inf entry
    (one NaN makes it NaN, one Inf makes it Inf or NaN), so ``z`` is ``y``, ``poison`` is
    None (nothing to mask): four passes over the tensor instead of eight, and one full-size
    temporary instead of three. On a CPU each pass costs a parallel region's thread wake-up
    more than its arithmetic, and each fresh temporary its page faults.
    """
    n = y.numel()
    if not n:
        zero = torch.zeros((), device=y.device)
        return y, None, zero, zero, zero, zero
    if _on_host(y):
        total = y.sum()
        if math.isfinite(float(total)):
            mean = total / n
            d = torch.sub(y.reshape(-1), mean)
            std = (torch.dot(d, d) / n).sqrt()
            lo, hi = torch.aminmax(y)
            return y, None, torch.zeros((), device=y.device), mean, std, torch.maximum(hi, -lo)
    poison = y * 0
    n_bad = _count_nan(poison)
    z = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    n_fin = (n - n_bad).clamp(min=1)
    mean = z.sum() / n_fin
    d = torch.sub(y.reshape(-1), mean).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # NaN/Inf entries: 0
    std = (torch.dot(d, d) / n_fin).sqrt()
    lo, hi = torch.aminmax(z)
    return z, poison, n_bad, mean, std, torch.maximum(hi, -lo)


def _nonfinite_counts(tensors: list[torch.Tensor], norms: list[torch.Tensor] | None) -> torch.Tensor:
    """Exact number of NaN/Inf entries of each tensor, stacked (float32, no host-device sync).

    ``norms``: the tensors' current 2-norms, or None. A finite 2-norm
    means every entry is finite (one NaN/Inf entry makes the norm NaN/Inf; the converse does
    not hold: squares of large finite entries can overflow). So where the norms can be read
    without a sync (on the CPU), a tensor with a finite norm counts 0 without another pass
    over it; the others, and every tensor on an accelerator, are counted entry by entry."""
    known: list[float | None] = [None] * len(tensors)
    if norms and len(norms) == len(tensors) and all(_on_host(n) for n in norms):
        known = torch.stack(norms).tolist()
    return torch.stack([
        torch.zeros((), device=t.device) if v is not None and math.isfinite(v) else _nonfinite_count(t)
        for t, v in zip(tensors, known)
    ])


def _float_stats(x: torch.Tensor, feature_dim: int = -1) -> torch.Tensor:
    """[numel, nonfinite, mean, std, absmax, feature_std_min, feature_std_max, integer]
    over finite entries; features along ``feature_dim`` (channels of a conv input: 1)."""
    with torch.no_grad():
        xf = x.detach().float()
        z, _, n_bad, mean, std, absmax = _finite_moments(xf)
        fd = feature_dim % xf.dim() if xf.dim() else 0
        if xf.dim() >= 2 and xf.shape[fd] > 1 and xf.numel():
            feat = z.movedim(fd, -1).reshape(-1, xf.shape[fd])
            dev = feat - feat.mean(dim=0)
            fmin, fmax = torch.aminmax(dev.square_().mean(dim=0).sqrt())
        else:
            fmin = fmax = std
        numel = torch.tensor(float(xf.numel()), device=xf.device)
        return torch.stack([numel, n_bad, mean, std, absmax, fmin, fmax, torch.zeros((), device=xf.device)])


def _int_stats(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        xi = x.detach()
        dev = xi.device
        if xi.numel() == 0:
            return torch.zeros(len(INPUT_STATS), device=dev)
        xf = xi.float()
        numel = torch.tensor(float(xi.numel()), device=dev)
        zero = torch.zeros((), device=dev)
        return torch.stack([numel, zero, xf.mean(), xf.std(unbiased=False), xf.abs().max(), zero, zero, torch.ones((), device=dev)])


class DeepProbes:
    """The sampled probes of one :class:`~gradprobe.probe.core.Probe`.

    They see the probe only through ``host`` (:class:`~gradprobe.probe.core.DeepHost`): the
    guard, the configuration, the open step's index and samples, which modules are models,
    the watched parameters, and the two metadata entries they fill (a recurrent module's
    lookback, a loss function found from its autograd node). The recorder calls the
    ``on_*`` methods on sampled steps and :meth:`on_close` when such a step closes.
    """

    def __init__(self, host: "DeepHost") -> None:
        self.host = host
        self.cfg = host.config
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self._call_order = 0
        self._step_seen = -1
        self._first_layer_done = False
        self._roots_done: set[int] = set()
        self._captures: dict[int, tuple[nn.Module, "ModuleInfo", Any, Any]] = {}
        self._cell_calls: dict[int, tuple[nn.Module, "ModuleInfo", list[torch.Tensor], Any, Any]] = {}
        self._gate_acc: dict[str, list[torch.Tensor]] = {}
        self._stats_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: (id of a ReLU's output, feature dim) -> (the output, its version, per-feature max);
        #: the next layer's input check reads it instead of a second pass over the same tensor
        self._colmax: dict[tuple[int, int], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._side = False
        self._loss_seen = False
        self._dtype = torch.float32

    # ------------------------------------------------------------------ helpers --------
    @property
    def in_side_computation(self) -> bool:
        """The gradient-through-time side computation is running (its forwards are not the run's)."""
        return self._side

    def _sample(self, probe: str, target: Any, stat: Any, value: Any, index: int = 0) -> None:
        self.host.add_sample((probe, target, stat, index, value))

    def _new_step(self) -> None:
        idx = self.host.step_index()
        if idx != self._step_seen:
            self._step_seen = idx
            self._call_order = 0
            self._first_layer_done = False
            self._roots_done = set()
            self._loss_seen = False
            self._captures = {}
            self._cell_calls = {}
            self._stats_cache = {}
            self._colmax = {}

    def _guard(self, part: str, fn: Any, *args: Any) -> Any:
        return self.host.guard.call("deep." + part, fn, *args)

    # ------------------------------------------------------------------ forward ---------
    def on_forward_pre(self, module: nn.Module, info: "ModuleInfo", args: Any) -> None:
        if self._side:
            return
        self._new_step()
        if self.host.is_root(module) and id(module) not in self._roots_done:
            self._roots_done.add(id(module))
            self._guard("input", self._input_stats, "input", info.name, args, None)
        if not self._first_layer_done and isinstance(module, PARAMETRIC) and not isinstance(module, nn.Embedding):
            self._first_layer_done = True
            self._guard("input", self._input_stats, "first_layer", info.name, args, module)
        elif not self._first_layer_done and isinstance(module, nn.Embedding):
            self._first_layer_done = True  # token ids: not features

    def _input_stats(self, probe: str, target: str, args: Any, module: nn.Module | None) -> None:
        for k, t in enumerate(a for a in args if isinstance(a, torch.Tensor)):
            if k >= 2:
                break
            name = target if k == 0 else f"{target}[{k}]"
            if probe == "input" and t.grad_fn is not None:
                continue  # computed from parameters in this step (another model's output): not data
            if t.is_floating_point():
                # features: channels for conv layers and image-like (N, C, H, W...) inputs, else the last dim
                conv = isinstance(module, nn.modules.conv._ConvNd) or (module is None and t.dim() >= 4)
                fd = 1 if conv and t.dim() >= 3 else -1
                hit = self._stats_cache.get((id(t), fd))
                if hit is None or hit[0] is not t:  # the model's input is often the first layer's too
                    hit = (t, _float_stats(t, fd))
                    self._stats_cache[(id(t), fd)] = hit
                self._sample(probe, name, INPUT_STATS, hit[1])
            elif not t.is_complex() and t.dtype != torch.bool:
                self._sample(probe, name, INPUT_STATS, _int_stats(t))

    def on_forward(self, module: nn.Module, info: "ModuleInfo", args: Any, kwargs: Any, output: Any) -> None:
        if self._side:
            return
        self._new_step()
        out = output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) else output
        if isinstance(out, torch.nn.utils.rnn.PackedSequence):
            out = out.data
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        order = self._call_order
        self._call_order += 1
        if isinstance(module, PARAMETRIC) or info.saturating or info.relu_like:
            self._guard("activation", self._act_stats, module, info, args, out, order)
        if info.recurrent:
            self._guard("gates", self._gates, module, info, args, kwargs)
            self._guard("bptt", self._capture, module, info, args, kwargs, output)

    def _act_stats(self, module: nn.Module, info: "ModuleInfo", args: Any, out: torch.Tensor, order: int) -> None:
        with torch.no_grad():
            y = out.detach().float()
            _, poison, n_bad, mean, std, absmax = _finite_moments(y)
            self._sample("activation", info.name, ACT_STATS, torch.stack([mean, std, absmax, n_bad]), index=order)
            if info.saturating:
                if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
                    sat = ((y < 0.01) | (y > 0.99)).float().mean()
                else:
                    sat = (y.abs() > 0.99).float().mean()
                self._sample("activation", info.name, "saturated_frac", sat, index=order)
            if isinstance(module, DEAD_CAPABLE) and y.dim() >= 2:
                dim = 1 if y.dim() >= 4 else y.dim() - 1
                units = y.movedim(dim, -1).reshape(-1, y.shape[dim])
                # a unit is active if its largest output over the batch is > 0 (a NaN max is
                # not > 0); NaN/Inf in a unit's column is "poisoned", not "never active"
                if units.shape[0]:
                    colmax = units.amax(dim=0)
                    active = colmax > 0
                    version = _version(out)
                    if version is not None:
                        # a ReLU's outputs are >= 0 (or NaN): their column max is the max of
                        # |x| that the next layer's dead-input check needs
                        self._colmax[(id(out), dim)] = (out, version, colmax)
                else:
                    active = torch.zeros(units.shape[1], dtype=torch.bool, device=y.device)
                if poison is not None:
                    poisoned = poison.movedim(dim, -1).reshape(-1, y.shape[dim]).sum(dim=0).isnan()
                    active = active | poisoned
                dead = (~active).float().mean()
                self._sample("activation", info.name, "dead_frac", dead, index=order)
                self._sample("activation", info.name, "dead_rows", float(units.shape[0]), index=order)
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                if x.is_floating_point() and x.dim() >= 2:
                    dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
                    feats = x.movedim(dim, -1).reshape(-1, x.shape[dim])
                    hit = self._colmax.get((id(args[0]), dim))
                    if hit is not None and hit[0] is args[0] and hit[1] == _version(args[0]):
                        colmax = hit[2]  # a ReLU's outputs: >= 0 (or NaN)
                        dead_in = (colmax == 0).float().mean()
                    elif feats.shape[0]:
                        lo, hi = torch.aminmax(feats, dim=0)  # one pass; NaN in a column: not 0
                        dead_in = ((lo == 0) & (hi == 0)).float().mean()
                    else:
                        dead_in = feats.new_ones(())
                    self._sample("activation", info.name, "input_dead_frac", dead_in, index=order)

    # ------------------------------------------------------------- recurrent gates ------
    def _gates(self, module: nn.Module, info: "ModuleInfo", args: Any, kwargs: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        B = self.cfg.bptt_batch
        with torch.no_grad():
            if isinstance(module, nn.RNNCellBase):
                x = args[0].detach()
                if x.dim() == 1:
                    x = x.unsqueeze(0)
                hx = args[1] if len(args) > 1 else kwargs.get("hx")
                h, _ = _split_hx(hx, module, x)
                with torch.autocast(x.device.type, enabled=False):
                    gates = _cell_gates(module, x[:B], _slice(h, B), module.weight_ih, module.weight_hh,
                                        module.bias_ih if module.bias else None, module.bias_hh if module.bias else None)
                self._gate_stats(info.name + ".l0", gates)
                return
            if not isinstance(module, nn.RNNBase) or getattr(module, "proj_size", 0):
                return
            x = args[0].detach()
            if x.dim() == 2:
                x = x.unsqueeze(0 if module.batch_first else 1)
            if module.batch_first:
                x = x.transpose(0, 1)
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            layer_in = x[:, :B].float()
            # float32 whatever the autocast in force; cuDNN off: it would warn about the
            # layer's weights not being one flattened buffer
            with torch.autocast(x.device.type, enabled=False), torch.backends.cudnn.flags(enabled=False):
                for layer in range(module.num_layers):
                    layer_in, gates = _layer_gates(module, layer, layer_in, hx)
                    self._gate_stats(f"{info.name}.l{layer}", gates)

    def _gate_stats(self, prefix: str, gates: dict[str, torch.Tensor]) -> None:
        for gname, v in gates.items():
            if gname in ("cell", "candidate", "new", "h"):
                stats = torch.stack([(v.abs() > 0.99).float().mean(), v.abs().mean()])
                self._sample("gates", f"{prefix}.{gname}", ("sat_frac", "absmean"), stats)
            else:
                stats = torch.stack([(v < 0.01).float().mean(), (v > 0.99).float().mean(), v.mean()])
                self._sample("gates", f"{prefix}.{gname}", ("low_frac", "high_frac", "mean"), stats)

    # ---------------------------------------------------------------- gradient in time --
    def _capture(self, module: nn.Module, info: "ModuleInfo", args: Any, kwargs: Any, output: Any = None) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return
        B = self.cfg.bptt_batch
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(module, nn.RNNCellBase):
            x = args[0].detach()
            if x.dim() == 1:
                x = x.unsqueeze(0)
            entry = self._cell_calls.get(id(module))
            h_in = hx[0] if isinstance(hx, tuple) else hx
            # a call continues the sequence only if its state is the previous call's output;
            # a fresh state starts a new sequence (the profile uses the step's last one)
            if entry is None or h_in is None or entry[4]() is not h_in:
                h, c = _split_hx(hx, module, x)
                state = (_slice(h, B), _slice(c, B))
                state = tuple(s.detach().clone() if s is not None else None for s in state)
                entry = (module, info, [], state, lambda: None)
            out_h = output[0] if isinstance(output, tuple) else output
            entry = (entry[0], entry[1], entry[2], entry[3], weakref.ref(out_h) if isinstance(out_h, torch.Tensor) else (lambda: None))
            self._cell_calls[id(module)] = entry
            entry[2].append(x[:B].clone())
            return
        if not isinstance(module, nn.RNNBase) or id(module) in self._captures:
            return
        x = args[0].detach()
        if x.dim() == 2:
            x = x.unsqueeze(0 if module.batch_first else 1)
        x = x[:B] if module.batch_first else x[:, :B]
        h = None
        if hx is not None:
            if isinstance(hx, tuple):
                h = tuple(t.detach()[:, :B].clone() for t in hx)
            else:
                h = hx.detach()[:, :B].clone()
        self._captures[id(module)] = (module, info, x.clone(), h)

    def _bptt_fused(self, module: nn.Module, info: "ModuleInfo", x: torch.Tensor, hx: Any) -> None:
        T = x.shape[1] if module.batch_first else x.shape[0]
        if T < 2:
            return
        self._dtype = _param_dtype(module)
        if isinstance(hx, tuple):
            hx = tuple(h.to(self._dtype) for h in hx)
        elif hx is not None:
            hx = hx.to(self._dtype)
        bd = 0 if module.batch_first else 1
        B = x.shape[bd]

        def run(xs: torch.Tensor) -> torch.Tensor:  # hx's batch dimension is 1
            return _last_output(module, xs, _repeat_batch(hx, xs.shape[bd] // B, 1))

        profile = self._profile(run, x, time_dim=1 if module.batch_first else 0, batch_dim=bd)
        self._emit_profile(info.name, profile, int(getattr(module, "hidden_size", 0)))
        self._set_lookback(info.name, T)

    def _bptt_cells(self, module: nn.Module, info: "ModuleInfo", xs: list[torch.Tensor], state: Any) -> None:
        if len(xs) < 2 or any(x.shape != xs[0].shape for x in xs):
            return
        x = torch.stack(xs, dim=0)  # (T, B, I)
        self._dtype = _param_dtype(module)
        state = tuple(s.to(self._dtype) if s is not None else None for s in state)

        B = x.shape[1]

        def run(seq: torch.Tensor) -> torch.Tensor:
            h, c = _repeat_batch(state, seq.shape[1] // B, 0)
            for t in range(seq.shape[0]):
                if isinstance(module, nn.LSTMCell):
                    h, c = nn.LSTMCell.forward(module, seq[t], (h, c) if h is not None else None)
                else:
                    h = type(module).forward(module, seq[t], h)
            return h

        profile = self._profile(run, x, time_dim=0, batch_dim=1)
        self._emit_profile(info.name, profile, int(getattr(module, "hidden_size", 0)))
        self._set_lookback(info.name, len(xs))

    def _profile(self, fn: Any, x: torch.Tensor, time_dim: int, batch_dim: int | None = None) -> torch.Tensor:
        dev = x.device
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return gradient_through_time(fn, x.to(self._dtype), time_dim, max(1, self.cfg.bptt_projections), batch_dim)

    def _emit_profile(self, name: str, profile: torch.Tensor, hidden: int) -> None:
        self._sample("bptt", name, "profile", profile)
        self._sample("bptt", name, "hidden_size", float(hidden))

    def _set_lookback(self, name: str, T: int) -> None:
        self.host.set_lookback(name, T)

    # ------------------------------------------------------------------ loss ------------
    def on_backward_root(self, root: torch.Tensor) -> None:
        """A loss bound before watch() (``from torch.nn.functional import mse_loss``) is not
        seen by the F-patch; its autograd node still names it and saves its target."""
        if self._loss_seen or self._side:
            return
        self._guard("target", self._target_from_graph, root)

    def _target_from_graph(self, root: torch.Tensor) -> None:
        node = root.grad_fn
        for _ in range(4):
            if node is None:
                return
            kind = LOSS_NODES.get(type(node).__name__)
            if kind is not None:
                target = getattr(node, "_saved_target", None)
                pred = getattr(node, "_saved_self", None)
                if isinstance(target, torch.Tensor):
                    self._loss_seen = True
                    self._target_sample(kind, pred, target, "mean")
                    self.host.note_loss_function(kind)
                return
            nxt = [n for n, _ in node.next_functions if n is not None]
            node = nxt[0] if nxt else None

    def on_loss_fn(self, name: str, args: Any, kwargs: Any, out: torch.Tensor) -> None:
        self._guard("target", self._target_stats, name, args, kwargs)

    def _target_stats(self, name: str, args: Any, kwargs: Any) -> None:
        self._loss_seen = True
        pred = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        self._target_sample(name, pred, target, kwargs.get("reduction", "mean"))

    def _target_sample(self, name: str, pred: Any, target: Any, reduction: Any) -> None:
        n_classes = 0.0
        if isinstance(pred, torch.Tensor) and name in ("cross_entropy", "nll_loss") and pred.dim() >= 1:
            n_classes = float(pred.shape[1] if pred.dim() >= 2 else pred.shape[0])
        red = REDUCTIONS.get(str(reduction), -1.0)
        if isinstance(target, torch.Tensor):
            dev = target.device
            extra = [torch.tensor(n_classes, device=dev), torch.tensor(red, device=dev), torch.zeros((), device=dev)]
            if target.is_floating_point():
                s = _float_stats(target)
                vals = torch.stack([s[0], s[1], s[2], s[3], s[3] * s[3], s[4], s[7], *extra])
            else:
                s = _int_stats(target)
                if n_classes >= 2 and target.numel():
                    # entropy of the batch's class frequencies: the loss of predicting the class prior
                    # negative targets are ignore_index (-100 by default): no class, not class 0
                    t = target.detach().reshape(-1).long()
                    counts = torch.bincount(t.clamp(min=0), minlength=int(n_classes)).float()
                    counts[0] -= (t < 0).sum()
                    p = counts / counts.sum().clamp(min=1)
                    extra[2] = -(p * torch.log(p.clamp(min=1e-12))).sum()
                vals = torch.stack([s[0], s[1], s[2], s[3], s[3] * s[3], s[4], s[7], *extra])
            self._sample("target", name, TARGET_STATS, vals)
        if isinstance(pred, torch.Tensor) and pred.is_floating_point():
            s = _float_stats(pred)
            self._sample("target", name, tuple("pred_" + k for k in INPUT_STATS), s)

    # ------------------------------------------------------------- optimizer step ------
    def on_pre_step(self, info: "OptInfo") -> None:
        self._guard("update", self._snapshot, info)
        self._guard("grad", self._grad_counts, info)

    def _snapshot(self, info: "OptInfo") -> None:
        params = [layer.param for layer in self.host.layers(info.scope)]
        with torch.no_grad():
            self._snapshots[info.index] = [p.detach().clone() for p in params]

    def _grad_counts(self, info: "OptInfo") -> None:
        names, grads = [], []
        for layer in self.host.layers(info.scope):
            g = layer.param.grad
            if g is None or g.is_sparse:
                continue
            names.append(layer.name)
            grads.append(g.detach())
        if grads:
            with torch.no_grad():
                # the gradients as the step sees them (clipping or unscale_ may have changed
                # them since their norms were recorded): their own norms, one serial pass on the CPU
                norms = list(torch._foreach_norm(grads, 2)) if all(_on_host(g) for g in grads) else None
                self._sample("grad", tuple(names), "nonfinite_count", _nonfinite_counts(grads, norms))

    def on_post_step(self, info: "OptInfo", weights: list[torch.Tensor]) -> None:
        """``weights``: the parameters' 2-norms after the step, as the recorder measured them."""
        self._guard("update", self._update_ratio, info, weights)
        self._guard("weight", self._weight_counts, info, weights)

    def _weight_counts(self, info: "OptInfo", weights: list[torch.Tensor]) -> None:
        """Exact count of NaN/Inf entries per parameter after the step (sampled steps);
        ``weights``: their 2-norms, measured just after the step."""
        layers = self.host.layers(info.scope)
        if layers:
            with torch.no_grad():
                counts = _nonfinite_counts([layer.param.detach() for layer in layers], weights)
            self._sample("weight", tuple(layer.name for layer in layers), "nonfinite_count", counts)

    def _update_ratio(self, info: "OptInfo", weights: list[torch.Tensor]) -> None:
        before = self._snapshots.pop(info.index, None)
        if not before:
            return
        layers = self.host.layers(info.scope)
        params = [layer.param.detach() for layer in layers]
        if len(params) != len(before):
            return
        with torch.no_grad():
            torch._foreach_sub_(before, params)  # the snapshot (ours) becomes -delta in place
            dn = torch.stack(torch._foreach_norm(before, 2, dtype=torch.float32))
            if len(weights) == len(params):
                wn = torch.stack(weights).to(dn.device)
            else:
                wn = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
            ratio = dn / wn.clamp(min=1e-12)
        self._sample("update", tuple(layer.name for layer in layers), "ratio", ratio)

    # ------------------------------------------------------------------ close -----------
    def on_close(self, st: "OpenStep", rec: "StepRecord") -> None:
        """Runs the side computations of the step (after the optimizer step) and adds all
        samples to the step's record."""
        if self._step_seen != st.index:
            return
        n0 = len(st.samples)
        self._side = True
        try:
            for module, info, x, hx in self._captures.values():
                self._guard("bptt", self._run_side, self._bptt_fused, module, info, x, hx)
            for module, info, xs, state, _ in self._cell_calls.values():
                self._guard("bptt", self._run_side, self._bptt_cells, module, info, xs, state)
        finally:
            self._side = False
            self._captures = {}
            self._cell_calls = {}
            self._stats_cache = {}
            self._colmax = {}
        for probe, target, stat, index, value in st.samples[n0:]:
            if isinstance(value, torch.Tensor):
                rec.add("sample", value, (probe, target, stat, index))
            else:
                rec.host_sample((probe, target, stat, index, float(value)))

    def _run_side(self, fn: Any, module: nn.Module, info: "ModuleInfo", *rest: Any) -> None:
        was_training = module.training
        try:
            if isinstance(module, nn.RNNBase):
                module.train(False)
            with torch.backends.cudnn.flags(enabled=False):
                fn(module, info, *rest)
        finally:
            if module.training != was_training:
                module.train(was_training)

    def close(self) -> None:
        self._snapshots.clear()
        self._captures = {}
        self._cell_calls = {}


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def gradient_through_time(fn: Any, x: torch.Tensor, time_dim: int, projections: int | list[torch.Tensor],
                          batch_dim: int | None = None) -> torch.Tensor:
    """The gradient-through-time profile of ``fn`` (input sequence -> last output h_T).

    ``profile[k]`` = mean over projections v of ||d(v·h_T)/d x_{T-1-k}||, the norm taken over
    batch and features: how much of the output's gradient reaches the input k steps back.
    ``projections`` is a count (random unit vectors per batch row, drawn from the current
    RNG: callers fork it) or explicit tensors shaped like h_T. Gradients come from
    ``torch.autograd.grad``, so no ``.grad`` is touched.

    With ``batch_dim`` (the batch dimension of ``x``; h_T's is 0), the P projections share
    one forward and one backward: ``x`` is repeated P times along the batch (``fn`` must
    repeat its own initial state to match), copy p is projected on v_p, and since the
    sequences of a batch do not interact, the gradient of copy p is the gradient for v_p.
    Without it, one backward per projection.
    """
    dev = x.device
    vs = projections if isinstance(projections, list) else None
    P = len(vs) if vs is not None else int(projections)
    with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        if batch_dim is not None and P > 1:
            xs = torch.cat([x.detach()] * P, dim=batch_dim).requires_grad_(True)
            hT = fn(xs)
            if vs is not None:
                v = torch.cat([u.to(hT.dtype) for u in vs], dim=0)
            else:
                v = torch.randn_like(hT)
                v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            (g,) = torch.autograd.grad((hT * v).sum(), xs)
            acc = torch.zeros(xs.shape[time_dim], device=dev, dtype=torch.float32)
            for gp in g.chunk(P, dim=batch_dim):
                dims = [d for d in range(gp.dim()) if d != time_dim]
                acc = acc + gp.float().pow(2).sum(dim=dims).sqrt()
            return (acc / P).flip(0).detach()
        xs = x.detach().clone().requires_grad_(True)
        hT = fn(xs)
        acc = torch.zeros(xs.shape[time_dim], device=dev, dtype=torch.float32)
        for k in range(P):
            if vs is not None:
                v = vs[k].to(hT.dtype)
            else:
                v = torch.randn_like(hT)
                v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            (g,) = torch.autograd.grad((hT * v).sum(), xs, retain_graph=k < P - 1)
            dims = [d for d in range(g.dim()) if d != time_dim]
            acc = acc + g.float().pow(2).sum(dim=dims).sqrt()
        return (acc / P).flip(0).detach()


def _repeat_batch(state: Any, reps: int, dim: int) -> Any:
    """A recurrent state (tensor, tuple of tensors or None) repeated ``reps`` times along its
    batch dimension, as :func:`gradient_through_time` repeats the input."""
    if reps == 1 or state is None:
        return state
    if isinstance(state, tuple):
        return tuple(_repeat_batch(s, reps, dim) for s in state)
    return torch.cat([state] * reps, dim=dim)


def _slice(t: Any, B: int) -> Any:
    return t[:B] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t


def _split_hx(hx: Any, module: nn.Module, x: torch.Tensor) -> tuple[Any, Any]:
    if hx is None:
        z = torch.zeros(x.shape[0], module.hidden_size, device=x.device, dtype=x.dtype)
        return z, (z.clone() if isinstance(module, nn.LSTMCell) else None)
    if isinstance(hx, tuple):
        h, c = hx
        if h.dim() == 1:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        return h.detach(), c.detach()
    h = hx.detach()
    return (h.unsqueeze(0) if h.dim() == 1 else h), None


def _initial_state(module: nn.RNNBase, hx: Any, k: int, batch: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    H = module.hidden_size
    zeros = torch.zeros(batch, H, device=ref.device, dtype=ref.dtype)
    if hx is None:
        return zeros, (zeros.clone() if isinstance(module, nn.LSTM) else None)
    if isinstance(hx, tuple):
        h, c = hx
        return h.detach()[k, :batch].to(ref.dtype), c.detach()[k, :batch].to(ref.dtype)
    return hx.detach()[k, :batch].to(ref.dtype), None


def _cell_gates(module: nn.Module, x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: Any, b_hh: Any) -> dict[str, torch.Tensor]:
    """The gates of a cell (or of a layer at every time step at once: ``x`` and ``h`` may carry
    leading time and batch dimensions, ``h`` being the state each step starts from), in
    float32, from the raw weights; no cell state is needed for the gates themselves."""
    gi = x.float() @ w_ih.float().t()
    gh = h.float() @ w_hh.float().t()
    if b_ih is not None:
        gi = gi + b_ih.float()
    if b_hh is not None:
        gh = gh + b_hh.float()
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        return {"input": torch.sigmoid(i), "forget": torch.sigmoid(f), "cell": torch.tanh(g), "output": torch.sigmoid(o)}
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        ir, iz, inn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return {"reset": r, "update": z, "new": n}
    nonlin = getattr(module, "nonlinearity", "tanh")
    return {"h": torch.tanh(gi + gh)} if nonlin == "tanh" else {}


def _layer_gates(module: nn.RNNBase, layer: int, seq: torch.Tensor, hx: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One layer of ``module`` on ``seq`` (T, B, I), in float32: its output (T, B, dirs*H),
    the next layer's input, and the gates of its forward direction at every time step.

    The layer runs as the module's own fused kernel (one call, both directions, no dropout:
    gate statistics describe the weights, not a dropout draw). The fused kernel does not
    expose its gates, but they only depend on x_t and h_{t-1}, both known once the layer's
    outputs are: they are recomputed for all time steps at once with two matrix products."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias else ("weight_ih", "weight_hh")
    sfxs = ("", "_reverse") if module.bidirectional else ("",)
    weights = [getattr(module, f"{k}_l{layer}{sfx}").detach().float() for sfx in sfxs for k in kinds]
    states = [_initial_state(module, hx, layer * len(sfxs) + d, seq.shape[1], seq) for d in range(len(sfxs))]
    h0 = torch.stack([h for h, _ in states])
    flags = (module.bias, 1, 0.0, False, module.bidirectional, False)  # one layer, no dropout, eval
    if isinstance(module, nn.LSTM):
        out = torch.lstm(seq, (h0, torch.stack([c for _, c in states])), weights, *flags)[0]
    elif isinstance(module, nn.GRU):
        out = torch.gru(seq, h0, weights, *flags)[0]
    else:
        tanh = getattr(module, "nonlinearity", "tanh") == "tanh"
        out = (torch.rnn_tanh if tanh else torch.rnn_relu)(seq, h0, weights, *flags)[0]
        return out, ({"h": out[..., : module.hidden_size]} if tanh else {})  # a plain RNN's gate is its output
    H = module.hidden_size
    h_prev = torch.cat([h0[:1], out[:-1, :, :H]])  # the state each step of the forward direction starts from
    b_ih, b_hh = (weights[2], weights[3]) if module.bias else (None, None)
    return out, _cell_gates(module, seq, h_prev, weights[0], weights[1], b_ih, b_hh)


def _last_output(module: nn.RNNBase, xs: torch.Tensor, hx: Any) -> torch.Tensor:
    out = type(module).forward(module, xs, hx)
    y = out[0] if isinstance(out, tuple) else out
    return y[:, -1] if module.batch_first else y[-1]
