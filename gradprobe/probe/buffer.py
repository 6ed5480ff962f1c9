"""Device-side step records and their batched hand-over to the writer.

While a step is open, everything it measures stays on the device: small tensors (the loss
roots, per-layer norm vectors from one ``torch._foreach_norm`` pass, the scale...). A closed
step becomes a :class:`StepRecord`: host values plus a list of those tensors with a layout.
Every ``flush_seconds`` the buffered records are concatenated into one flat device vector
and copied to the host in one transfer (non-blocking into pinned memory on CUDA, with an
event the writer thread waits on), so the training thread never waits for the device.
Statistics derived from the values (totals, non-finite counts) are computed on the host, in
float64, by :func:`resolve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradprobe.runlog import schema as S


@dataclass
class StepRecord:
    """One closed step: host values and device tensors described by ``layout``.

    ``layout`` entries are ``(field, meta)`` with one tensor each (any shape, flattened).
    Fields: ``loss``/``loss_fn``/``eval_loss`` (one value per root/call), ``grad`` and
    ``weight`` (meta: layer indices), ``clip`` (the clip's total norm; meta: layer indices and
    max_norm), ``clip_coef`` (meta: layer indices), ``clip_total``,
    ``clip_max``, ``scale_before``, ``scale_after``, ``found_inf``, ``data_sum`` (one float32
    sum per data tensor: non-finite when the tensor holds NaN/Inf), ``sample`` (meta:
    ``(probe, target, stat, index0)``), ``scalar`` (meta: name).
    """

    host: dict[str, Any]
    layout: list[tuple[str, Any]] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    host_samples: list[tuple[str, str, str, int, float]] = field(default_factory=list)
    host_scalars: list[tuple[str, float]] = field(default_factory=list)

    def add(self, name: str, tensor: torch.Tensor | list[torch.Tensor], meta: Any = None) -> None:
        """One layout entry: a tensor, or a list of 0-d tensors (per-layer norms as
        ``torch._foreach_norm`` returns them: stacked once per flush, not once per step)."""
        self.layout.append((name, meta))
        self.tensors.append(tensor)


class PendingBatch:
    """Closed steps on their way to disk; :meth:`resolve` runs on the writer thread."""

    def __init__(self, records: list[StepRecord], n_layers: int, segment: int, device: torch.device) -> None:
        self.records = records
        self.n_layers = n_layers
        self.segment = segment
        self._event: Any = None
        self._host: torch.Tensor | None = None
        # every entry's (offset, size) in one flat float32 vector: tensors with a shape first,
        # then all 0-d values of the batch (losses, per-layer norms...) in one stack
        vectors: list[torch.Tensor] = []
        scalars: list[torch.Tensor] = []
        places: list[tuple[bool, int, int]] = []  # (in the scalar part, offset within it, size)
        nv = 0
        for r in records:
            for t in r.tensors:
                if isinstance(t, (list, tuple)):
                    places.append((True, len(scalars), len(t)))
                    scalars.extend(t)
                elif t.dim() == 0:
                    places.append((True, len(scalars), 1))
                    scalars.append(t)
                else:
                    n = t.numel()
                    places.append((False, nv, n))
                    vectors.append(t)
                    nv += n
        self._places = [(off + nv if in_scalars else off, size) for in_scalars, off, size in places]
        if not vectors and not scalars:
            self._host = torch.empty(0)
            return
        with torch.no_grad():
            parts = [_flat32(t, device) for t in vectors]
            if scalars:
                parts.append(_flat32(torch.stack([_on(t.detach(), device) for t in scalars]), device))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0]
            if flat.device.type == "cuda":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                self._event = ev
                self._host = host
            elif flat.device.type == "cpu":
                self._host = flat
            else:  # other accelerators: a plain copy
                self._host = flat.to("cpu")
        for r in records:  # drop device references now: the flat copy holds the values
            r.tensors = []

    def resolve(self) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[tuple[int, str, str, str, int, float]], list[tuple[int, str, float]]]:
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None
        flat = self._host.numpy().astype(np.float64)
        places = iter(self._places)
        L = self.n_layers
        n = len(self.records)
        cols: dict[str, Any] = {name: [] for name, _, _ in S.STEP_COLUMNS}
        g_all = np.full((n, L), S.MISSING, dtype=np.float32)
        w_all = np.full((n, L), S.MISSING, dtype=np.float32)
        samples: list[tuple[int, str, str, str, int, float]] = []
        scalars: list[tuple[int, str, float]] = []
        for k, rec in enumerate(self.records):
            step = int(rec.host["step"])
            g = g_all[k]
            w = w_all[k]
            coef = np.ones(L, dtype=np.float64)
            losses: list[float] = []
            loss_fn: list[float] = []
            evals: list[float] = []
            vals: dict[str, float] = {}
            has_weight = False
            data_bad = -1 if not any(name == "data_sum" for name, _ in rec.layout) else 0
            for name, meta in rec.layout:
                pos, size = next(places)
                v = flat[pos : pos + size]
                if name == "grad":
                    g[meta] = v
                elif name == "weight":
                    w[meta] = v
                    has_weight = True
                elif name == "clip_coef":
                    coef[meta] = v[0]
                elif name == "clip":
                    idx, max_norm = meta
                    with np.errstate(all="ignore"):
                        coef[idx] = min(max_norm / (v[0] + 1e-6), 1.0) if np.isfinite(v[0]) else (0.0 if v[0] == np.inf else np.nan)
                elif name == "loss":
                    losses.extend(v.tolist())
                elif name == "loss_fn":
                    loss_fn.extend(v.tolist())
                elif name == "eval_loss":
                    evals.extend(v.tolist())
                elif name == "data_sum":  # one float32 sum per data tensor: non-finite iff it holds NaN/Inf
                    data_bad += int(np.count_nonzero(~np.isfinite(v)))
                elif name == "local_grad":
                    with np.errstate(all="ignore"):
                        vals["local_grad"] = math.sqrt(float(np.sum(np.square(v)))) if size else math.nan
                elif name == "sample":
                    samples.extend(expand_sample(step, meta, v))
                elif name == "scalar":
                    scalars.append((step, meta, float(v[0]) if size else math.nan))
                else:
                    vals[name] = float(v[0]) if size else math.nan
            for probe, target, stat, index, x in rec.host_samples:
                samples.append((step, probe, target, stat, index, x))
            for name, x in rec.host_scalars:
                scalars.append((step, name, x))
            present = g != S.MISSING
            g64 = g.astype(np.float64)
            with np.errstate(all="ignore"):
                grad_norm = math.sqrt(float(np.sum(np.square(g64[present])))) if present.any() else math.nan
                step_norm = math.sqrt(float(np.sum(np.square(g64[present] * coef[present])))) if present.any() else math.nan
                if np.isnan(g64[present]).any():
                    grad_norm = step_norm = math.nan
                wp = w != S.MISSING
                weight_norm = math.sqrt(float(np.sum(np.square(w[wp].astype(np.float64))))) if has_weight and wp.any() else math.nan
                if has_weight and np.isnan(w[wp]).any():
                    weight_norm = math.nan
            loss = math.fsum(losses) if losses and all(math.isfinite(x) for x in losses) else (sum(losses) if losses else math.nan)
            lfn = sum(loss_fn) if loss_fn else math.nan
            h = rec.host
            cols["step"].append(step)
            cols["wall_time"].append(h["wall_time"])
            cols["step_time"].append(h["step_time"])
            cols["backward_time"].append(h["backward_time"])
            cols["n_backward"].append(h["n_backward"])
            cols["loss"].append(loss)
            cols["loss_nonfinite"].append(bool(losses) and not all(math.isfinite(x) for x in losses))
            cols["loss_fn"].append(lfn)
            cols["loss_fn_nonfinite"].append(bool(loss_fn) and not all(math.isfinite(x) for x in loss_fn))
            cols["eval_loss"].append(float(np.mean(evals)) if evals else math.nan)
            cols["grad_norm"].append(grad_norm)
            cols["step_grad_norm"].append(step_norm)
            cols["grad_nonfinite_layers"].append(int(np.sum(~np.isfinite(g))))
            cols["clip_max_norm"].append(vals.get("clip_max", h.get("clip_max_norm", math.nan)))
            cols["clip_total_norm"].append(vals.get("clip_total", math.nan))
            cols["clip_calls"].append(h["clip_calls"])
            cols["clip_on_scaled"].append(h["clip_on_scaled"])
            cols["lr"].append(vals.get("lr_dev", h["lr"]))
            cols["optimizer_steps"].append(h["optimizer_steps"])
            cols["scale"].append(vals.get("scale_after", vals.get("scale_before", math.nan)))
            cols["scale_before"].append(vals.get("scale_before", math.nan))
            cols["skipped"].append(bool(vals.get("found_inf", 0.0) > 0.0))
            cols["scaler_updated"].append(h["scaler_updated"])
            cols["scale_tampered"].append(h["scale_tampered"])
            cols["abandoned"].append(h["abandoned"])
            cols["param_nonfinite_layers"].append(int(np.sum(~np.isfinite(w))) if has_weight else -1)
            cols["weight_norm"].append(weight_norm)
            cols["state_age"].append(h["state_age"])
            cols["state_age_module"].append(h["state_age_module"])
            cols["graphs_alive"].append(h["graphs_alive"])
            cols["retain_graph"].append(h["retain_graph"])
            cols["memory"].append(h["memory"])
            cols["local_grad_norm"].append(vals.get("local_grad", math.nan))
            cols["data_nonfinite"].append(data_bad)
            cols["sampled"].append(h["sampled"])
        samples.extend(derived_samples(samples))
        steps = np.asarray(cols["step"], dtype=np.int64)
        sampled = np.asarray(cols["sampled"], dtype=bool)
        return cols, (steps, g_all, w_all, sampled), samples, scalars


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _flat32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = _on(t.detach().reshape(-1), device)
    if t.dtype != torch.float32:
        t = t.float()
    return t


def expand_sample(step: int, meta: tuple[str, Any, Any, int], values: np.ndarray) -> list[tuple[int, str, str, str, int, float]]:
    """Rows of one sample tensor: element j is target[j] (if a tuple), stat[j] (if a
    tuple), or index ``index0 + j`` (a profile)."""
    probe, target, stat, index0 = meta
    rows = []
    vals = values.tolist()
    if isinstance(target, tuple):
        for t, x in zip(target, vals):
            rows.append((step, probe, t, stat, index0, x))
    elif isinstance(stat, tuple):
        for st, x in zip(stat, vals):
            rows.append((step, probe, target, st, index0, x))
    else:
        for j, x in enumerate(vals):
            rows.append((step, probe, target, stat, index0 + j, x))
    return rows


def derived_samples(samples: list[tuple[int, str, str, str, int, float]]) -> list[tuple[int, str, str, str, int, float]]:
    """Horizon, growth and lookback rows derived from each gradient-through-time profile."""
    from gradprobe.stats import bptt_summary

    profiles: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for step, probe, target, stat, index, value in samples:
        if probe == "bptt" and stat == "profile":
            profiles.setdefault((step, target), []).append((index, value))
    out = []
    for (step, target), pts in profiles.items():
        pts.sort()
        summary = bptt_summary([v for _, v in pts])
        for k, v in summary.items():
            out.append((step, "bptt", target, k, 0, v))
    return out
