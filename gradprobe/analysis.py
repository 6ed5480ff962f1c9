"""Shared, cached views of a run for the rules: one definition of each derived statistic.

Rules read a :class:`RunContext`, never raw hooks. When two rules need the same derived
quantity (the loss series, the stable window, the optimizer family, the clip threshold),
it lives here, once.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.runlog import MISSING, RunLog
from gradprobe.signals import available_signals

#: Optimizers whose step size is normalised per parameter by running gradient statistics:
#: a uniform rescaling of the gradient (clipping, loss scale) barely changes their update.
ADAPTIVE_OPTIMIZERS = frozenset(
    {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
     "Adafactor", "LAMB", "Lamb", "FusedAdam", "FusedLAMB", "Lion", "AdamWScheduleFree", "Adam8bit", "AdamW8bit"}
)

_EVAL_NAME = re.compile(r"(val|valid|validation|eval|test|dev)[_/ .-]*(loss|mse|rmse|error)|^(val|eval)$", re.I)


class RunContext:
    """A RunLog plus cached derived series. ``log`` is never modified."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.meta = log.meta
        self.steps = log.steps
        self.signals = available_signals(log)
        self.n = len(log.steps)
        self.kind = log.source.get("kind", "gradprobe")

    # ---- series --------------------------------------------------------------------------
    @cached_property
    def step(self) -> np.ndarray:
        return self.steps["step"].to_numpy(dtype=np.int64)

    @cached_property
    def loss(self) -> np.ndarray:
        """Training loss per step: the backward roots, else loss-function values."""
        loss = self.steps["loss"].to_numpy(dtype=np.float64).copy()
        lfn = self.steps["loss_fn"].to_numpy(dtype=np.float64)
        fill = np.isnan(loss) & ~self.steps["loss_nonfinite"].to_numpy() & ~np.isnan(lfn)
        loss[fill] = lfn[fill]
        return loss

    @cached_property
    def grad_norm(self) -> np.ndarray:
        return self.steps["grad_norm"].to_numpy(dtype=np.float64)

    @cached_property
    def step_grad_norm(self) -> np.ndarray:
        return self.steps["step_grad_norm"].to_numpy(dtype=np.float64)

    @cached_property
    def lr(self) -> np.ndarray:
        return self.steps["lr"].to_numpy(dtype=np.float64)

    @cached_property
    def skipped(self) -> np.ndarray:
        return self.steps["skipped"].to_numpy(dtype=bool)

    def col(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        return self.steps[name].to_numpy(dtype=dtype)

    def step_at(self, i: int) -> int:
        return int(self.step[i])

    def first_step_where(self, mask: np.ndarray) -> int | None:
        idx = np.flatnonzero(mask)
        return int(self.step[idx[0]]) if idx.size else None

    # ---- optimizer ------------------------------------------------------------------------
    @cached_property
    def optimizer(self) -> dict[str, Any] | None:
        opts = self.meta.get("optimizers") or []
        return opts[0] if opts else None

    @cached_property
    def optimizer_class(self) -> str | None:
        return self.optimizer.get("class") if self.optimizer else None

    @cached_property
    def hparams(self) -> dict[str, Any]:
        if not self.optimizer:
            return {}
        groups = self.optimizer.get("param_groups") or [{}]
        return dict(groups[0])

    @cached_property
    def adaptive(self) -> bool | None:
        """True for Adam-like optimizers, False for SGD-like, None if unknown."""
        c = self.optimizer_class
        if c is None:
            return None
        return c in ADAPTIVE_OPTIMIZERS or "adam" in c.lower()

    @cached_property
    def lr0(self) -> float | None:
        finite = self.lr[np.isfinite(self.lr)]
        if finite.size:
            return float(finite[0])
        v = self.hparams.get("lr")
        return float(v) if isinstance(v, (int, float)) else None

    # ---- clipping -------------------------------------------------------------------------
    @cached_property
    def clip_mask(self) -> np.ndarray:
        return self.steps["clip_calls"].to_numpy() > 0

    @cached_property
    def max_norm(self) -> float | None:
        """The clip threshold in force (median over clipped steps), None if never clipped."""
        m = self.steps["clip_max_norm"].to_numpy(dtype=np.float64)
        m = m[np.isfinite(m)]
        return float(np.median(m)) if m.size else None

    # ---- AMP ------------------------------------------------------------------------------
    @cached_property
    def scaler(self) -> dict[str, Any] | None:
        sc = self.meta.get("scalers") or []
        for s in sc:
            if s.get("enabled", True):
                return s
        return None

    @cached_property
    def scale(self) -> np.ndarray:
        return self.steps["scale"].to_numpy(dtype=np.float64)

    @cached_property
    def amp_dtype(self) -> str | None:
        """The autocast dtype in force in any module (None: autocast never on)."""
        dtypes = [v.get("dtype") for v in (self.meta.get("autocast") or {}).values() if v.get("enabled")]
        if not dtypes:
            return None
        return max(set(dtypes), key=dtypes.count)

    # ---- recurrent ------------------------------------------------------------------------
    @cached_property
    def recurrent(self) -> list[dict[str, Any]]:
        return list(self.meta.get("recurrent") or [])

    # ---- layers ---------------------------------------------------------------------------
    @cached_property
    def layer_info(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for seg in self.meta.get("layer_segments") or []:
            for layer in seg.get("layers", []):
                out[str(layer.get("name"))] = layer
        return out

    def layer_grads(self) -> pd.DataFrame:
        """Per-layer pre-clip gradient norms with missing values as NaN (non-finite kept as
        inf; NaN norms become +inf so 'missing' and 'non-finite' stay distinct)."""
        lg = self.log.layer_grad
        if lg.empty:
            return lg
        arr = lg.to_numpy(dtype=np.float64, copy=True)
        arr[np.isnan(arr)] = np.inf
        arr[arr == MISSING] = np.nan
        return pd.DataFrame(arr, index=lg.index, columns=lg.columns)

    # ---- samples & scalars -------------------------------------------------------------------
    def samples(self, probe: str, stat: str | None = None) -> pd.DataFrame:
        return self.log.samples_of(probe, stat)

    @cached_property
    def eval_loss(self) -> pd.Series:
        """Validation loss by step: ``probe.log(val_loss=...)``-style scalars, else the eval
        loss functions seen without grad, else a foreign log's eval_loss."""
        sc = self.log.scalars
        if not sc.empty:
            names = [n for n in sc["name"].astype(str).unique() if _EVAL_NAME.search(n)]
            if names:
                names.sort(key=lambda n: (0 if "loss" in n.lower() else 1, n))
                s = self.log.scalar(names[0])
                return s.astype(np.float64)
        ev = self.steps["eval_loss"].to_numpy(dtype=np.float64)
        mask = ~np.isnan(ev)
        return pd.Series(ev[mask], index=self.step[mask], dtype=np.float64)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return self.log.events_of(kind)


def finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing median over the previous ``window`` finite values (excluding the current)."""
    s = pd.Series(np.where(np.isfinite(x), x, np.nan))
    return s.shift(1).rolling(window, min_periods=max(3, window // 4)).median().to_numpy()


def percentile(x: np.ndarray, q: float) -> float | None:
    f = finite(x)
    return float(np.percentile(f, q)) if f.size else None


def nice(x: float, digits: int = 2) -> float:
    """Rounds to ``digits`` significant digits (recommendations are read by people)."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def log_ratio_confidence(value: float, threshold: float, decades_to_certain: float = 1.0) -> float:
    """Confidence from how far ``value`` is past ``threshold`` on a log scale: 0.5 at the
    threshold, rising linearly to 1.0 at ``decades_to_certain`` decades past it."""
    if value <= 0 or threshold <= 0 or not math.isfinite(value):
        return 1.0 if value == math.inf else 0.5
    past = math.log10(value / threshold) / decades_to_certain
    return float(min(1.0, max(0.0, 0.5 + 0.5 * past)))


def fraction_confidence(count: int, total: int, needed: int = 10) -> float:
    """Confidence from the evidence count: saturates once ``needed`` steps support it."""
    if total <= 0:
        return 0.0
    return float(min(1.0, count / max(needed, 1)))


# ==== shared views for the mixed-precision (GP3xx) and non-finite (GP4xx) rules ==============
# Appended as module-level functions (cached on the context) so that other rule families can
# append their own helpers without touching these.

#: float16: largest finite value, smallest normal and smallest subnormal magnitude.
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24

#: Module classes whose forward autocast runs in the lower precision (matmul/conv based).
#: A float32 output from one of them under float16/bfloat16 autocast means the requested
#: precision was not honoured (on CPU, float16 autocast leaves GRU and the cells in float32).
AUTOCAST_COMPUTE_CLASSES = frozenset(
    {"Linear", "LazyLinear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
     "ConvTranspose3d", "LazyConv1d", "LazyConv2d", "LazyConv3d", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell",
     "GRUCell", "MultiheadAttention", "NonDynamicallyQuantizableLinear"}
)


def _ctx_cache(ctx: RunContext, key: str, make: Any) -> Any:
    store = ctx.__dict__.setdefault("_shared_cache", {})
    if key not in store:
        store[key] = make(ctx)
    return store[key]


def scaler_rows(ctx: RunContext) -> np.ndarray:
    """Row mask: a GradScaler scaled this step (a scale was recorded)."""
    return _ctx_cache(ctx, "scaler_rows", lambda c: np.isfinite(c.col("scale_before")) | np.isfinite(c.col("scale")))


def scaler_in_use(ctx: RunContext) -> bool:
    """An enabled GradScaler was configured or a loss scale was recorded."""
    return ctx.scaler is not None or bool(scaler_rows(ctx).any())


def autocast_modules(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Autocast as it was actually in force, module by module.

    Merges the ``autocast`` events (every change) with the metadata (last state). Per module:
    ``class``, ``dtypes`` (autocast dtypes seen while enabled), ``output_dtypes`` (output
    dtypes seen while enabled; None = the forward raised), ``first_step`` (first step seen
    enabled), ``enabled`` (ever enabled).
    """

    def make(c: RunContext) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        entries = [(e.get("module"), e) for e in c.events("autocast")]
        entries += list((c.meta.get("autocast") or {}).items())
        for name, e in entries:
            if name is None:
                continue
            m = out.setdefault(str(name), {"class": e.get("class"), "dtypes": [], "output_dtypes": [],
                                           "first_step": None, "enabled": False, "device": e.get("device")})
            if not e.get("enabled"):
                continue
            m["enabled"] = True
            if e.get("dtype") not in m["dtypes"]:
                m["dtypes"].append(e.get("dtype"))
            if e.get("output_dtype") not in m["output_dtypes"]:
                m["output_dtypes"].append(e.get("output_dtype"))
            st = e.get("step")
            if isinstance(st, (int, float)) and (m["first_step"] is None or st < m["first_step"]):
                m["first_step"] = int(st)
        return {k: v for k, v in out.items() if v["enabled"]}

    return _ctx_cache(ctx, "autocast_modules", make)


def autocast_dtypes(ctx: RunContext) -> set[str]:
    """Autocast dtypes requested anywhere in the run (empty: autocast never on)."""
    return {d for m in autocast_modules(ctx).values() for d in m["dtypes"] if d and d != "none"}


def fp16_compute_modules(ctx: RunContext) -> list[str]:
    """Modules whose output was actually float16 under autocast (they computed in float16)."""
    return [n for n, m in autocast_modules(ctx).items() if "float16" in m["dtypes"] and "float16" in m["output_dtypes"]]


def layer_forward_order(ctx: RunContext) -> dict[str, float]:
    """Parameter name -> position in the forward pass: the call order of its module in the
    sampled activation statistics where known, else its registration order (after them)."""

    def make(c: RunContext) -> dict[str, float]:
        names = list(c.log.layer_grad.columns) or list(c.layer_info)
        act = c.samples("activation", "mean")
        call: dict[str, float] = {}
        if not act.empty:
            first = act[act["step"] == act["step"].min()]
            for target, idx in zip(first["target"].astype(str), first["index"].to_numpy()):
                call[target] = min(call.get(target, np.inf), float(idx))
        order: dict[str, float] = {}
        n = len(names)
        last = -1.0
        for i, name in enumerate(names):
            module = str(c.layer_info.get(name, {}).get("module") or name.rsplit(".", 1)[0])
            # a module without activation samples (a norm layer...) sits right after the
            # registered layer before it; ties keep the registration order
            pos = call[module] if module in call else last + 0.5
            last = max(last, pos) if module in call else last
            order[name] = pos + i / (n + 1) * 1e-3
        return order

    return _ctx_cache(ctx, "layer_forward_order", make)


class ScalerHistory:
    """What the GradScaler did, step by step: the calibration at the start, where the scale
    settled, and whether it kept collapsing afterwards. One definition for GP301/302/304.

    Attributes (positions index the scaler rows, not the run's rows):
        steps, scale_before, scale_after, skipped, loss_nonfinite: per scaler row.
        init_scale, backoff_factor, growth_factor, growth_interval: the configuration
            (from the metadata, else inferred: the first scale and the observed factors).
        growth: rows where the scale grew (a successful step followed by a larger scale).
        first_success: position of the first non-skipped row (None: every step skipped).
        descent_end: position of the first growth (the calibration descent ends there).
        settled_scale: median scale of the successful steps of the descent (None: none).
        calibration_skips: positions of the skips of the descent at scales above settled_scale.
        min_scale: smallest scale reached (before or after update).
        net_halvings: backoffs below the first successful scale, net of growth:
            log(first successful scale / lowest later scale) / log(1 / backoff_factor).
        late: positions of the late window (second half of the rows, after the calibration).
        late_excess_skips: skips in the late window minus growth events in it (a skip right
            after a growth is the scaler probing, by design).
        forward_overflow: positions of skipped rows whose unscaled loss was already NaN/Inf.
    """

    def __init__(self, ctx: RunContext) -> None:
        rows = np.flatnonzero(scaler_rows(ctx))
        self.rows = rows
        self.n = int(rows.size)
        self.steps = ctx.step[rows]
        sa = ctx.col("scale")[rows]
        sb = ctx.col("scale_before")[rows]
        cfg = ctx.scaler or {}
        init = cfg.get("init_scale")
        init = float(init) if isinstance(init, (int, float)) and math.isfinite(init) and init > 0 else None
        # scale_before missing (foreign logs): the previous scale after update
        prev = np.concatenate([[init if init is not None else np.nan], sa[:-1]]) if self.n else sa
        sb = np.where(np.isfinite(sb), sb, prev)
        sa = np.where(np.isfinite(sa), sa, sb)
        self.scale_before = sb
        self.scale_after = sa
        self.skipped = ctx.skipped[rows]
        self.loss_nonfinite = (ctx.col("loss_nonfinite", bool) | ctx.col("loss_fn_nonfinite", bool))[rows]
        first_scale = next((float(x) for x in sb if np.isfinite(x) and x > 0), None)
        self.init_scale = init if init is not None else first_scale
        with np.errstate(all="ignore"):
            ratio = sa / sb
        bo = cfg.get("backoff_factor")
        if not (isinstance(bo, (int, float)) and 0 < bo < 1):
            r = ratio[self.skipped & np.isfinite(ratio) & (ratio < 1)]
            bo = float(np.median(r)) if r.size else 0.5
        gf = cfg.get("growth_factor")
        if not (isinstance(gf, (int, float)) and gf > 1):
            r = ratio[~self.skipped & np.isfinite(ratio) & (ratio > 1)]
            gf = float(np.median(r)) if r.size else 2.0
        gi = cfg.get("growth_interval")
        self.backoff_factor = float(bo)
        self.growth_factor = float(gf)
        self.growth_interval = int(gi) if isinstance(gi, (int, float)) and gi > 0 else None
        self.growth = ~self.skipped & np.isfinite(ratio) & (ratio > 1.0 + 1e-6)
        ok = np.flatnonzero(~self.skipped)
        self.first_success = int(ok[0]) if ok.size else None
        g = np.flatnonzero(self.growth)
        self.descent_end = int(g[0]) if g.size else self.n
        desc_ok = ok[ok < self.descent_end]
        self.settled_scale = float(np.median(sb[desc_ok])) if desc_ok.size else None
        desc_skips = np.flatnonzero(self.skipped[: self.descent_end])
        if self.settled_scale is not None:
            self.calibration_skips = desc_skips[sb[desc_skips] > self.settled_scale * (1 + 1e-6)]
        else:
            self.calibration_skips = desc_skips
        both = np.concatenate([sb[np.isfinite(sb)], sa[np.isfinite(sa)]])
        self.min_scale = float(both.min()) if both.size else math.nan
        self.net_halvings = 0.0
        if self.first_success is not None:
            s0 = sb[self.first_success]
            later = sa[self.first_success:]
            later = later[np.isfinite(later)]
            if later.size and s0 > 0 and later.min() > 0:
                self.net_halvings = max(0.0, math.log(s0 / float(later.min())) / math.log(1.0 / self.backoff_factor))
        settle_pos = int(self.calibration_skips[-1]) + 1 if self.calibration_skips.size else 0
        start = max(self.n // 2, settle_pos)
        self.late = np.arange(start, self.n)
        late_skips = int(self.skipped[self.late].sum())
        late_growth = int(self.growth[self.late].sum())
        self.late_excess_skips = max(0, late_skips - late_growth)
        self.forward_overflow = np.flatnonzero(self.skipped & self.loss_nonfinite)

    @property
    def excess_halvings(self) -> float | None:
        """How many backoffs the initial scale sat above the settled scale."""
        if self.init_scale is None or self.settled_scale is None or self.settled_scale <= 0:
            return None
        return max(0.0, math.log(self.init_scale / self.settled_scale) / math.log(1.0 / self.backoff_factor))

    @property
    def late_rate(self) -> float:
        return self.late_excess_skips / self.late.size if self.late.size else 0.0

    def step_of(self, pos: int) -> int:
        return int(self.steps[pos])


def scaler_history(ctx: RunContext) -> ScalerHistory:
    return _ctx_cache(ctx, "scaler_history", ScalerHistory)


class NonfiniteTimeline:
    """Where NaN/Inf first appeared, in causal order inputs -> loss -> gradients -> parameters.
    One definition for GP401-GP404 (and for anyone who needs "did the run go non-finite").

    Within one step the order is fixed: the batch enters, the loss is computed, backward
    fills the gradients, the optimizer updates the parameters. Parameters that are non-finite
    after step s can only affect the forward of step s+1 and later.

    Attributes:
        loss: row mask, a loss (backward root or loss-function output with grad) was NaN/Inf.
        grad_raw: row mask, a gradient was NaN/Inf (any reason).
        grad: ``grad_raw`` minus the steps a GradScaler skipped on purpose and the steps
            discarded under a GradScaler without ``update()`` (those are GP305's evidence).
        param: row mask, parameters NaN/Inf after the optimizer step.
        loss_step, grad_step, param_step: first step of each (None: never).
        inputs: sampled input/target evidence: a list of dicts (step, probe, target,
            nonfinite, numel), only samples that cannot come from non-finite parameters.
        input_observed_step: first sampled step with non-finite inputs or targets.
        input_step: the first step bounded with the per-step evidence: the first step after
            the last clean sample, at or before ``input_observed_step``, whose loss or
            gradients went non-finite while the parameters were still finite.
    """

    def __init__(self, ctx: RunContext) -> None:
        st = ctx.steps
        n = ctx.n
        self.loss = (st["loss_nonfinite"].to_numpy(dtype=bool) | st["loss_fn_nonfinite"].to_numpy(dtype=bool)
                     | np.isinf(ctx.loss)) if n else np.zeros(0, bool)
        gnf = st["grad_nonfinite_layers"].to_numpy() > 0 if n else np.zeros(0, bool)
        self.grad_raw = gnf | np.isinf(ctx.grad_norm) if n else np.zeros(0, bool)
        srows = scaler_rows(ctx)
        self.skipped_mask = ctx.skipped & self.grad_raw
        self.discarded_mask = (st["abandoned"].to_numpy(dtype=bool) & srows & self.grad_raw & ~ctx.skipped) if n else np.zeros(0, bool)
        self.grad = self.grad_raw & ~ctx.skipped & ~self.discarded_mask
        self.param = st["param_nonfinite_layers"].to_numpy() > 0 if n else np.zeros(0, bool)
        self.loss_step = ctx.first_step_where(self.loss)
        self.grad_step = ctx.first_step_where(self.grad)
        self.param_step = ctx.first_step_where(self.param)
        self.inputs: list[dict[str, Any]] = []
        self.input_observed_step: int | None = None
        self.input_step: int | None = None
        self.last_clean_input_step: int | None = None
        self._inputs(ctx)

    def _inputs(self, ctx: RunContext) -> None:
        s = ctx.log.samples
        if s.empty:
            return
        sel = s[s["probe"].isin(["input", "first_layer", "target"]) & s["stat"].isin(["nonfinite", "numel"])]
        if sel.empty:
            return
        piv = sel.pivot_table(index=["step", "probe", "target"], columns="stat", values="value", aggfunc="max").reset_index()
        if "nonfinite" not in piv.columns:
            return
        pstep = self.param_step
        rows = []
        for rec in piv.to_dict("records"):
            step = int(rec["step"])
            probe, target = str(rec["probe"]), str(rec["target"])
            data_input = probe == "input" and not target.endswith("]")
            # anything but the model's first input could come from non-finite parameters
            # (a carried state, a normalisation before the first layer, a teacher's targets)
            if not data_input and pstep is not None and step > pstep:
                continue
            rows.append({"step": step, "probe": probe, "target": target,
                         "nonfinite": float(rec.get("nonfinite", 0.0) or 0.0),
                         "numel": float(rec.get("numel", math.nan))})
        bad = [r for r in rows if r["nonfinite"] > 0]
        if not bad:
            return
        self.inputs = bad
        observed = min(r["step"] for r in bad)
        self.input_observed_step = observed
        clean = [r["step"] for r in rows if r["step"] < observed]
        lo = max(clean) if clean else None
        self.last_clean_input_step = lo
        hits = (self.loss | self.grad_raw) & (ctx.step <= observed)
        if lo is not None:
            hits &= ctx.step > lo
        if pstep is not None:
            hits &= ctx.step <= pstep
        first = ctx.first_step_where(hits)
        self.input_step = first if first is not None else observed


def nonfinite_timeline(ctx: RunContext) -> NonfiniteTimeline:
    return _ctx_cache(ctx, "nonfinite_timeline", NonfiniteTimeline)
