"""Device-side step records and their batched hand-over to the writer.

While a step is open, everything it measures stays on the device: small tensors (the loss
roots, per-layer norms from one ``torch._foreach_norm`` pass, the scale...). A closed step
becomes a :class:`StepRecord`: host values plus those values stacked into one device vector,
with a layout. Every ``flush_seconds`` the buffered records are concatenated into one flat device vector
and copied to the host in one transfer (non-blocking into pinned memory on CUDA, with an
event the writer thread waits on), so the training thread never waits for the device.
Statistics derived from the values (totals, non-finite counts) are computed on the host, in
float64, by :func:`resolve`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from gradprobe.runlog import schema as S


class StepRecord:
    """One closed step: host values and device tensors described by ``layout``.

    ``layout`` entries are ``(field, meta)`` with one tensor each (any shape, flattened).
    Fields: ``loss``/``loss_fn``/``eval_loss`` (one value per root/call; ``eval_loss`` meta: its
    no-grad loss stream, see :mod:`gradprobe.probe.forward`), ``grad`` (the
    gradient as the last backward left it), ``post`` (as the optimizer stepped with it,
    where it was measured again) and ``weight`` (meta: layer indices), ``clip`` (the clip's
    total norm; meta: layer indices, max_norm and the clip's ordinal), ``clip_coef`` (meta:
    layer indices and ordinal), ``clip_total``,
    ``clip_max``, ``scale_before``, ``scale_after``, ``found_inf``, ``data_check`` (one 0-d
    reduction per data tensor: non-finite when the tensor holds NaN/Inf, see
    :meth:`~gradprobe.probe.step.Segment.count_data`), ``sample`` (meta:
    ``(probe, target, stat, index0)``), ``scalar`` (meta: name). ``host["effect"]``: per
    comparison of the gradients (:mod:`gradprobe.probe.gradients`), (layer indices, the
    ordinals of the observed clips of each layer, B measured, compared).

    When the step closes, :meth:`compact` stacks all its 0-d values into one vector: a
    buffered step then holds a few objects instead of one tensor per value, so the records
    of the last second do not make the garbage collector's generations grow (on a small
    model a full collection of the process costs more than the statistics themselves).
    """

    __slots__ = ("host", "layout", "tensors", "places", "host_samples", "host_scalars")

    def __init__(self, host: dict[str, Any]) -> None:
        self.host = host
        self.layout: list[tuple[str, Any]] = []
        # a tensor or a list of 0-d tensors per layout entry; after compact(): the parts
        self.tensors: list[Any] = []
        # after compact(): (part, offset, size) of each layout entry
        self.places: list[tuple[int, int, int]] | None = None
        self.host_samples: list[tuple[str, str, str, int, float]] | None = None
        self.host_scalars: list[tuple[str, float]] | None = None

    def add(self, name: str, tensor: torch.Tensor | list[torch.Tensor], meta: Any = None) -> None:
        """One layout entry: a tensor, or a list of 0-d tensors (per-layer norms as
        ``torch._foreach_norm`` returns them)."""
        self.layout.append((name, meta))
        if self.places is None:
            self.tensors.append(tensor)
            return
        # added after compact() (a trailing evaluation loss): a part of its own
        with torch.no_grad():
            part = torch.stack(list(tensor)) if isinstance(tensor, (list, tuple)) else tensor.detach().reshape(-1)
        self.places.append((len(self.tensors), 0, part.numel()))
        self.tensors.append(part)

    def host_sample(self, row: tuple[str, str, str, int, float]) -> None:
        if self.host_samples is None:
            self.host_samples = []
        self.host_samples.append(row)

    def host_scalar(self, row: tuple[str, float]) -> None:
        if self.host_scalars is None:
            self.host_scalars = []
        self.host_scalars.append(row)

    def compact(self, device: torch.device) -> None:
        """Stacks every 0-d value (and list of them) into one float32 vector on ``device``
        (one ``torch.stack``); tensors with a shape stay parts of their own."""
        if self.places is not None:
            return
        zs: list[torch.Tensor] = []
        parts: list[torch.Tensor] = []
        places: list[tuple[int, int, int]] = []
        for t in self.tensors:
            if isinstance(t, (list, tuple)):
                places.append((0, len(zs), len(t)))
                zs.extend(t)
            elif t.dim() == 0:
                places.append((0, len(zs), 1))
                zs.append(t)
            else:
                parts.append(t)
                places.append((len(parts), 0, t.numel()))
        # hot path: one stack of values that share a device and need no gradient (what the
        # probe records is detached): no per-value checks, no no_grad() context, each of which
        # costs a few microseconds when run right after a training step
        if not zs:
            stacked = torch.empty(0, device=device)
        else:
            try:
                stacked = torch.stack(zs)
            except RuntimeError:  # values on several devices
                stacked = torch.stack([_on(z, device) for z in zs])
            if stacked.requires_grad:
                stacked = stacked.detach()
            if stacked.device != device:
                stacked = stacked.to(device, non_blocking=True)
        self.tensors = [stacked, *parts]
        self.places = places


class PendingBatch:
    """Closed steps on their way to disk; :meth:`resolve` runs on the writer thread."""

    def __init__(self, records: list[StepRecord], n_layers: int, segment: int, device: torch.device,
                 tolerances: tuple[float, ...] = ()) -> None:
        self.records = records
        self.n_layers = n_layers
        self.segment = segment
        # per layer: relative tolerance of a rescaling of its gradient (discovery.grad_tolerance)
        self.tolerances = tolerances if len(tolerances) == n_layers else (1e-4,) * n_layers
        self._event: Any = None
        self._host: torch.Tensor | None = None
        # the records' parts, concatenated into one flat float32 vector; where each layout
        # entry lies in it is worked out on the writer thread (resolve): here, on the
        # training thread, only each part's size is noted
        parts: list[torch.Tensor] = []
        self._sizes: list[list[int]] = []
        for r in records:
            r.compact(device)
            ts = r.tensors
            parts += ts
            self._sizes.append([t.numel() for t in ts])
            r.tensors = []  # drop device references: the flat copy holds the values
        with torch.no_grad():
            parts = [t for t in parts if t.numel()]
            if not parts:
                self._host = torch.empty(0)
                return
            try:  # hot path: the stacked vectors of one device (compact)
                flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in parts])
                if flat.device != device:
                    flat = flat.to(device, non_blocking=True)
            except RuntimeError:  # parts on several devices
                flat = torch.cat([_on(t.reshape(-1), device) for t in parts])
            if flat.dtype != torch.float32:
                flat = flat.float()
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

    def _entry_places(self) -> list[tuple[int, int]]:
        """(offset, size) in the flat vector of every layout entry of every record, in order."""
        out: list[tuple[int, int]] = []
        pos = 0
        for r, sizes in zip(self.records, self._sizes):
            base = []
            for size in sizes:
                base.append(pos)
                pos += size
            assert r.places is not None
            out.extend((base[part] + off, size) for part, off, size in r.places)
        return out

    def resolve(self) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[tuple[int, str, str, str, int, float]], list[tuple[int, str, float]]]:
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None
        flat = self._host.numpy().astype(np.float64)
        places = iter(self._entry_places())
        L = self.n_layers
        n = len(self.records)
        cols: dict[str, Any] = {name: [] for name, _, _ in S.STEP_COLUMNS}
        g_all = np.full((n, L), S.MISSING, dtype=np.float32)
        w_all = np.full((n, L), S.MISSING, dtype=np.float32)
        samples: list[tuple[int, str, str, str, int, float]] = []
        scalars: list[tuple[int, str, float]] = []
        coef_all = np.ones((n, L), dtype=np.float64)  # the observed clips' coefficients (B = A * coef)
        post_all = np.zeros((n, L), dtype=np.float64)  # B where it was measured
        has_post = np.zeros((n, L), dtype=bool)
        tols = np.asarray(self.tolerances, dtype=np.float64)
        change: list[int] = []
        has_w = np.zeros(n, dtype=bool)
        for k, rec in enumerate(self.records):
            if k % 16 == 15:
                time.sleep(0)  # let the training thread take the GIL back (see RunWriter)
            step = int(rec.host["step"])
            losses: list[float] = []
            loss_fn: list[float] = []
            evals: dict[int, list[float]] = {}  # no-grad loss stream -> its values
            vals: dict[str, float] = {}
            data_bad = -1
            coefs: dict[int, float] = {}
            checks: dict[int, float] = {}
            for name, meta in rec.layout:
                pos, size = next(places)
                v = flat[pos : pos + size]
                if name == "grad":
                    g_all[k, list(meta)] = v
                elif name == "weight":
                    w_all[k, list(meta)] = v
                    has_w[k] = True
                elif name == "post":
                    post_all[k, list(meta)] = v
                    has_post[k, list(meta)] = True
                elif name == "check":
                    checks[meta] = float(v[0])
                elif name == "clip_coef":
                    coefs[meta[1]] = float(v[0])
                elif name == "clip":
                    _, max_norm, ordinal = meta
                    t = float(v[0])
                    if math.isfinite(t):
                        coefs[ordinal] = min(max_norm / (t + 1e-6), 1.0)
                    else:
                        coefs[ordinal] = 0.0 if t == math.inf else math.nan
                elif name == "loss":
                    losses.extend(v.tolist())
                elif name == "loss_fn":
                    loss_fn.extend(v.tolist())
                elif name == "eval_loss":
                    evals.setdefault(meta or 0, []).extend(v.tolist())
                elif name == "data_check":  # one reduction per data tensor: non-finite iff it holds NaN/Inf
                    data_bad = max(data_bad, 0) + sum(1 for x in v.tolist() if not math.isfinite(x))
                elif name == "local_grad":
                    vals["local_grad"] = math.sqrt(math.fsum(x * x for x in v.tolist())) if size else math.nan
                elif name == "sample":
                    samples.extend(expand_sample(step, meta, v))
                elif name == "scalar":
                    scalars.append((step, meta, float(v[0]) if size else math.nan))
                else:
                    vals[name] = float(v[0]) if size else math.nan
            for probe, target, stat, index, x in rec.host_samples or ():
                samples.append((step, probe, target, stat, index, x))
            for name, x in rec.host_scalars or ():
                scalars.append((step, name, x))
            finite_losses = all(math.isfinite(x) for x in losses)
            loss = (math.fsum(losses) if finite_losses else sum(losses)) if losses else math.nan
            h = rec.host
            state = -1
            for idx, clips, measured, compared in h.get("effect", ()):
                if measured:
                    if compared:
                        state = max(state, measured_change(g_all[k, list(idx)], post_all[k, list(idx)], tols[list(idx)]))
                    continue
                factors = []
                for ordinals in clips:
                    f = 1.0
                    for o in ordinals:
                        f *= coefs.get(o, 1.0)
                    factors.append(f)
                extra = unobserved_factor(idx, factors, checks, g_all[k], tols)
                if extra is not None:  # a change the versions missed (``.data``): one more factor
                    factors = [f * extra for f in factors]
                for i, f in zip(idx, factors):
                    if f != 1.0:
                        coef_all[k, i] = f
                if compared:
                    state = max(state, derived_change(factors))
            change.append(state)
            cols["step"].append(step)
            cols["wall_time"].append(h["wall_time"])
            cols["step_time"].append(h["step_time"])
            cols["backward_time"].append(h["backward_time"])
            cols["n_backward"].append(h["n_backward"])
            cols["loss"].append(loss)
            cols["loss_nonfinite"].append(bool(losses) and not finite_losses)
            cols["loss_fn"].append(sum(loss_fn) if loss_fn else math.nan)
            cols["loss_fn_nonfinite"].append(bool(loss_fn) and not all(math.isfinite(x) for x in loss_fn))
            first = evals.pop(0, None)
            cols["eval_loss"].append(sum(first) / len(first) if first else math.nan)
            for stream, xs in evals.items():
                scalars.append((step, S.eval_stream_name(stream), sum(xs) / len(xs)))
            cols["clip_max_norm"].append(vals.get("clip_max", h.get("clip_max_norm", math.nan)))
            cols["clip_total_norm"].append(vals.get("clip_total", math.nan))
            cols["clip_calls"].append(h["clip_calls"])
            cols["clip_on_scaled"].append(h["clip_on_scaled"])
            cols["lr"].append(vals.get("lr_dev", h["lr"]))
            cols["optimizer_steps"].append(h["optimizer_steps"])
            cols["scale"].append(vals.get("scale_after", vals.get("scale_before", math.nan)))
            cols["scale_before"].append(vals.get("scale_before", math.nan))
            cols["skipped"].append(vals.get("found_inf", 0.0) > 0.0)
            cols["scaler_updated"].append(h["scaler_updated"])
            cols["scale_tampered"].append(h["scale_tampered"])
            cols["abandoned"].append(h["abandoned"])
            cols["state_age"].append(h["state_age"])
            cols["state_age_module"].append(h["state_age_module"])
            cols["graphs_alive"].append(h["graphs_alive"])
            cols["retain_graph"].append(h["retain_graph"])
            cols["memory"].append(h["memory"])
            cols["local_grad_norm"].append(vals.get("local_grad", math.nan))
            cols["data_nonfinite"].append(data_bad)
            cols["sampled"].append(h["sampled"])
        # the per-step totals of the whole batch at once (float64): the norm over the
        # measured layers, NaN if one is NaN or none was measured
        with np.errstate(all="ignore"):
            present = g_all != S.MISSING
            g64 = np.where(present, g_all.astype(np.float64), 0.0)
            any_g = present.any(axis=1)
            nan_g = np.isnan(g64).any(axis=1) | ~any_g
            grad_norm = np.sqrt(np.sum(g64 * g64, axis=1))
            b64 = np.where(has_post, post_all, g64 * coef_all)  # what the optimizer stepped with
            b64[~present] = 0.0
            step_norm = np.sqrt(np.sum(b64 * b64, axis=1))
            grad_norm[nan_g] = np.nan
            step_norm[nan_g] = np.nan
            wp = w_all != S.MISSING
            w64 = np.where(wp, w_all.astype(np.float64), 0.0)
            weight_norm = np.sqrt(np.sum(w64 * w64, axis=1))
            weight_norm[~has_w | ~wp.any(axis=1) | np.isnan(w64).any(axis=1)] = np.nan
        cols["grad_norm"] = grad_norm.tolist()
        cols["step_grad_norm"] = step_norm.tolist()
        cols["grad_change"] = change
        cols["grad_nonfinite_layers"] = (~np.isfinite(g_all)).sum(axis=1).tolist()
        cols["param_nonfinite_layers"] = np.where(has_w, (~np.isfinite(w_all)).sum(axis=1), -1).tolist()
        cols["weight_norm"] = weight_norm.tolist()
        samples.extend(derived_samples(samples))
        steps = np.asarray(cols["step"], dtype=np.int64)
        sampled = np.asarray(cols["sampled"], dtype=bool)
        return cols, (steps, g_all, w_all, sampled), samples, scalars


#: ``grad_change``: how the gradients the optimizer stepped with differ from those the last
#: backward left (compared groups of a step; the most changed one counts)
CHANGE_UNKNOWN, CHANGE_NONE, CHANGE_UNIFORM, CHANGE_OTHER = -1, 0, 1, 2


def unobserved_factor(idx: tuple[int, ...], factors: list[float], checks: dict[int, float],
                      a: np.ndarray, tol: np.ndarray) -> float | None:
    """The factor a group's checked layer shows beyond its observed changes (its norm at
    the comparison point over A times their coefficient), or None when it shows none.
    Gradients changed through ``.data`` keep their version, so the probe took one layer's
    norm again: a change the versions missed is taken as a uniform rescaling by that factor
    (a ``p.grad.data.mul_(c)`` clip); sampled steps measure every layer instead."""
    for pos, i in enumerate(idx):
        b = checks.get(i)
        if b is None:
            continue
        expected = float(a[i]) * factors[pos]
        if not (math.isfinite(b) and math.isfinite(expected)) or expected <= 0.0:
            return None
        r = b / expected
        return r if abs(r - 1.0) > float(tol[i]) else None
    return None


def derived_change(factors: list[float]) -> int:
    """The change of a group whose only changes were the observed clips (``factors``: each
    layer's product of their coefficients, exact host floats)."""
    if any(not math.isfinite(f) for f in factors):
        return CHANGE_UNKNOWN
    if all(f == 1.0 for f in factors):
        return CHANGE_NONE
    hi = max(factors)
    return CHANGE_UNIFORM if hi - min(factors) <= 1e-12 * hi else CHANGE_OTHER


def measured_change(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> int:
    """The change from per-layer norms ``a`` (after the last backward) to ``b`` (measured at
    the comparison point): none when every ratio is 1 within its layer's tolerance; uniform
    when all ratios are one factor within it (a rescaling of the whole gradient); otherwise
    other (per-layer clipping, a gradient added or zeroed in part). Layers with a non-finite
    norm say nothing."""
    with np.errstate(all="ignore"):
        ok = np.isfinite(a) & np.isfinite(b) & (a >= 0)
        if not ok.any():
            return CHANGE_UNKNOWN
        a, b, tol = a[ok], b[ok], tol[ok]
        pos = a > 0
        if (b[~pos] > 0).any():
            return CHANGE_OTHER  # a gradient where the backward left none
        if not pos.any():
            return CHANGE_NONE
        r = b[pos] / a[pos]
        t = tol[pos]
        if bool(np.all(np.abs(r - 1.0) <= t)):
            return CHANGE_NONE
        hi = float(r.max())
        return CHANGE_UNIFORM if hi - float(r.min()) <= float(t.max()) * hi else CHANGE_OTHER


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


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
