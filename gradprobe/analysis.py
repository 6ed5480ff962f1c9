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
        inf; NaN norms become +inf so 'missing' and 'non-finite' stay distinct). Built once per
        context (several rules read it; do not modify the frame)."""
        if "_layer_grads" in self.__dict__:
            return self.__dict__["_layer_grads"]
        lg = self.log.layer_grad
        if lg.empty:
            return lg
        arr = lg.to_numpy(dtype=np.float64, copy=True)
        arr[np.isnan(arr)] = np.inf
        arr[arr == MISSING] = np.nan
        out = pd.DataFrame(arr, index=lg.index, columns=lg.columns)
        self.__dict__["_layer_grads"] = out
        return out

    # ---- samples & scalars -------------------------------------------------------------------
    def samples(self, probe: str, stat: str | None = None) -> pd.DataFrame:
        return self.log.samples_of(probe, stat)

    @cached_property
    def eval_loss(self) -> pd.Series:
        """Validation loss by step: ``probe.log(val_loss=...)``-style scalars, else the eval
        loss functions seen without grad, else a foreign log's eval_loss."""
        sc = self.log.scalars
        if not sc.empty:
            counts = sc["name"].astype(str).value_counts()
            names = [n for n in counts.index if _EVAL_NAME.search(n)]
            if names:
                # the series with the most evaluations describes the run (the recorder adds a
                # one-record "eval_loss" for an evaluation after the last step), then losses
                names.sort(key=lambda n: (-int(counts[n]), 0 if "loss" in n.lower() else 1, n))
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
    """Matmul/conv/recurrent modules whose output was actually float16 under autocast (they
    computed in float16; containers and activations only pass float16 through)."""
    return [n for n, m in autocast_modules(ctx).items() if "float16" in m["dtypes"] and "float16" in m["output_dtypes"]
            and m.get("class") in AUTOCAST_COMPUTE_CLASSES]


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
        init_scale: the first recorded scale (where this run's scaler started);
            ``configured_init_scale`` the constructor's value from the metadata.
        backoff_factor, growth_factor, growth_interval: the configuration (from the
            metadata, else inferred from the observed factors).
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
        tail_excess_skips: the same over the last quarter of the rows (still skipping at the end).
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
        # where this run's scaler actually started (a scaler restored from a checkpoint
        # starts at its saved scale, not at the constructor's init_scale)
        self.configured_init_scale = init
        self.init_scale = first_scale if first_scale is not None else init
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
        tail = np.arange(max(start, self.n - max(self.n // 4, 1)), self.n)
        self.tail_excess_skips = max(0, int(self.skipped[tail].sum()) - int(self.growth[tail].sum()))
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
            gradients went non-finite while the parameters were still finite; or, exactly,
            ``data_step`` when that is earlier.
        data: row mask, the recorder counted NaN/Inf entries in the step's data (the watched
            models' first input, float loss targets; column ``data_nonfinite``, every step)
            at or before ``param_step``.
        data_step: first step of ``data`` (None: never, or not measured).
        data_measured: the log has the per-step data count.
    """

    def __init__(self, ctx: RunContext) -> None:
        st = ctx.steps

        def flag(name: str) -> np.ndarray:
            return st[name].to_numpy(dtype=bool)

        self.loss = flag("loss_nonfinite") | flag("loss_fn_nonfinite") | np.isinf(ctx.loss)
        self.grad_raw = (st["grad_nonfinite_layers"].to_numpy() > 0) | np.isinf(ctx.grad_norm)
        srows = scaler_rows(ctx)
        self.skipped_mask = ctx.skipped & self.grad_raw
        # scaled steps whose gradients were looked at and thrown away without update(): the
        # recorder's abandoned rows, and a last row the run ended in before update()
        not_updated = ~flag("scaler_updated") & (st["optimizer_steps"].to_numpy() == 0)
        self.discarded_mask = srows & self.grad_raw & ~ctx.skipped & (flag("abandoned") | not_updated)
        self.grad = self.grad_raw & ~ctx.skipped & ~self.discarded_mask
        self.param = st["param_nonfinite_layers"].to_numpy() > 0
        self.loss_step = ctx.first_step_where(self.loss)
        self.grad_step = ctx.first_step_where(self.grad)
        self.param_step = ctx.first_step_where(self.param)
        self.inputs: list[dict[str, Any]] = []
        self.input_observed_step: int | None = None
        self.input_step: int | None = None
        self.last_clean_input_step: int | None = None
        self._inputs(ctx)
        counts = st["data_nonfinite"].to_numpy() if "data_nonfinite" in st else np.full(len(st), -1)
        self.data_measured = bool((counts >= 0).any())
        self.data = counts > 0
        if self.param_step is not None:  # a chained model's input can come from NaN weights
            self.data &= ctx.step <= self.param_step
        self.data_counts = counts
        self.data_step = ctx.first_step_where(self.data)
        if self.data_step is not None:  # observed, not inferred: the first observation wins
            seen = [self.data_step] + ([self.input_observed_step] if self.input_observed_step is not None else [])
            self.input_step = min(seen)

    def _inputs(self, ctx: RunContext) -> None:
        s = ctx.log.samples
        if s.empty:
            return
        sel = s[s["probe"].isin(["input", "first_layer", "target"]) & s["stat"].isin(["nonfinite", "numel"])]
        if sel.empty:
            return
        piv = sel.pivot_table(index=["step", "probe", "target"], columns="stat", values="value", aggfunc="max")
        piv = piv.reset_index()
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


# ==== shared views for the recurrent-state (GP1xx) and gradient-magnitude (GP2xx) rules =====
# Appended as module-level functions (cached on the context with ``_ctx_cache``).

#: A pre-clip gradient norm this many times its running level is a spike. Mini-batch gradient
#: norms of a healthy run scatter around their level by a factor of about 2 to 3 (the batch-
#: to-batch noise of a sum over many examples); an explosion multiplies the norm by 10x to
#: 1e6x within a step or a few. One order of magnitude separates the two.
SPIKE_FACTOR = 10.0
#: Steps in the trailing window that defines the running level of a per-step series.
RUNNING_WINDOW = 20
#: A spike must also exceed the highest running level the run sustained before it by this
#: factor: batch-to-batch scatter of a norm about its level reaches 2-3x, so a norm within 3x
#: of a level the run already trained at is inside its ordinary range (see GradSpikes).
SPIKE_ABOVE_SUSTAINED = 3.0
#: A value this many times its running median (the 20 finite values before it) has risen:
#: batch-to-batch noise of a loss or a gradient norm does not reach 3x; a divergence does.
RISE_FACTOR = 3.0


def risen_before(x: np.ndarray, i0: int) -> tuple[float, float] | None:
    """(last finite value before row ``i0``, its ratio to the median of the 20 finite values
    before it) when that ratio is at least :data:`RISE_FACTOR` and the value is above all of
    those 20: the series was running away right before ``i0`` (a divergence), else None. A
    noisy series (the gradient norm of small batches scatters by 5x and more) reaches 3x its
    median now and then, but not a new high every time; a divergence climbs to one. Needs 3
    finite values before ``i0``."""
    before = x[:i0][np.isfinite(x[:i0])]
    if before.size < 3:
        return None
    window = before[-21:-1]
    med = float(np.median(window))
    last = float(before[-1])
    if med > 0 and last / med >= RISE_FACTOR and last > float(window.max()):
        return last, last / med
    return None


def trailing_level(x: np.ndarray, window: int = RUNNING_WINDOW) -> np.ndarray:
    """Median of the previous ``window`` finite values (the current one excluded); NaN where
    there is none. Unlike :func:`rolling_median`, one earlier value suffices, so a jump at
    step 1 is measured against step 0."""
    s = pd.Series(np.where(np.isfinite(x), x, np.nan))
    return s.shift(1).rolling(window, min_periods=1).median().to_numpy()


def trailing_level_at(x: np.ndarray, i: int, window: int = RUNNING_WINDOW) -> np.ndarray:
    """``trailing_level(x[:, j])[i]`` for every column ``j`` of a 2-D ``x`` (one row of
    each column's running level without computing the whole series): the median of the
    finite values among the ``window`` rows before row ``i``; NaN where there is none."""
    seg = x[max(0, i - window):max(0, i)]
    seg = np.where(np.isfinite(seg), seg, np.nan)
    out = np.full(x.shape[1], np.nan)
    have = ~np.isnan(seg).all(axis=0)
    if have.any():
        out[have] = np.nanmedian(seg[:, have], axis=0)
    return out


def optimizer_family(ctx: RunContext) -> str | None:
    """How the update scales with the gradient: ``"adaptive"`` (Adam-like: normalised per
    parameter, a uniform rescaling barely changes the step), ``"sgd"`` (SGD-like: the step is
    lr times the gradient), ``"other"`` (LBFGS, Rprop...: line search or signs), None unknown."""
    if ctx.optimizer_class is None:
        return None
    if ctx.adaptive:
        return "adaptive"
    c = ctx.optimizer_class.lower()
    if "sgd" in c or c in ("momentum", "nesterov", "heavyball"):
        return "sgd"
    return "other"


class GradSpikes:
    """Spikes of the pre-clip total gradient norm above its running level.

    A spike must also reach :data:`SPIKE_ABOVE_SUSTAINED` times the highest running level the
    run had sustained before it (the running maximum of ``level``): a run's gradient norm
    shrinks as the loss falls (most of all when it memorises its data), and its ordinary
    batch-to-batch scatter then reaches 10x the shrunken level while staying within the
    scale the run already trained at, typically at its start, without harm. Such a norm
    is not an explosion; one far above anything the run sustained is.

    Attributes (arrays are per row of ``ctx.steps``):
        norm: pre-clip gradient norm (NaN: not measured).
        level: running level, :func:`trailing_level` of ``norm``.
        sustained: the highest running level up to each row (running maximum of ``level``).
        ratio: ``norm / level`` where both are finite and the level is > 0, else NaN.
        floor: 1e-3 x the median of the first tenth of the finite norms (at least 3).
        spike: ``ratio >= SPIKE_FACTOR``, ``norm >= floor`` and
            ``norm >= SPIKE_ABOVE_SUSTAINED x sustained``.
        rows: row indices of the spikes.
        first: row of the first spike (None: none).
        max_ratio: largest ratio among the spikes (0.0: no spike).
    """

    def __init__(self, ctx: RunContext) -> None:
        norm = ctx.grad_norm.copy()
        norm[~np.isfinite(norm)] = np.nan
        self.norm = norm
        self.level = trailing_level(norm)
        with np.errstate(all="ignore"):
            ratio = np.where((self.level > 0) & np.isfinite(norm), norm / self.level, np.nan)
        self.ratio = ratio
        fin = norm[np.isfinite(norm)]
        head = fin[: max(3, fin.size // 10)]
        #: norms below this are ignored as spikes: 1e-3 of the run's starting scale, far below
        #: any step the learning rate can take (a converged run's 1e-20 -> 1e-15 is no spike)
        self.floor = 1e-3 * float(np.median(head)) if head.size else 0.0
        self.sustained = np.fmax.accumulate(np.nan_to_num(self.level, nan=0.0)) if norm.size else norm
        self.spike = ((np.nan_to_num(ratio, nan=0.0) >= SPIKE_FACTOR) & (np.nan_to_num(norm, nan=0.0) >= self.floor)
                      & (np.nan_to_num(norm, nan=0.0) >= SPIKE_ABOVE_SUSTAINED * self.sustained))
        self.rows = np.flatnonzero(self.spike)
        self.first = int(self.rows[0]) if self.rows.size else None
        spiked = ratio[self.spike]
        self.max_ratio = float(spiked.max()) if spiked.size else 0.0


def grad_spikes(ctx: RunContext) -> GradSpikes:
    return _ctx_cache(ctx, "grad_spikes", GradSpikes)


def stable_window(ctx: RunContext) -> np.ndarray:
    """Row mask of the stretch on which gradient-norm statistics are taken: a finite pre-clip
    norm, a step that really happened (not skipped by a GradScaler, not abandoned), after the
    warm-up (the first ``max(1, min(50, n // 10))`` rows, where norms still move with the
    initialisation), and neither a spike nor one of the 2 rows after one (an explosion's
    aftermath is not the run's normal scale). When at least 10 such rows precede the first
    spike, only those are kept: after an explosion the weights themselves are damaged and the
    norms stay inflated. Falls back to every finite row when fewer than 5 rows remain."""

    def make(c: RunContext) -> np.ndarray:
        sp = grad_spikes(c)
        fin = np.isfinite(sp.norm) & ~c.skipped & ~c.col("abandoned", bool)
        warm = max(1, min(50, c.n // 10))
        near_spike = sp.spike.copy()
        for k in (1, 2):
            near_spike[k:] |= sp.spike[:-k]
        mask = fin & ~near_spike
        mask[:warm] = False
        if sp.first is not None:
            before = mask.copy()
            before[sp.first:] = False
            if before.sum() >= 10:
                mask = before
        if mask.sum() < 5:
            mask = fin
        return mask

    return _ctx_cache(ctx, "stable_window", make)


def suggested_max_norm(ctx: RunContext) -> tuple[float, dict[str, Any]] | None:
    """The clipping threshold computed from the run: the 95th percentile of the pre-clip
    gradient norms in the :func:`stable_window`. Clipping there trims the 5% largest normal
    steps and every spike, and leaves the bulk of the updates at the size the optimizer and
    learning rate were tuned for. Returns ``(max_norm, details)`` or None without norms."""

    def make(c: RunContext) -> tuple[float, dict[str, Any]] | None:
        mask = stable_window(c)
        vals = grad_spikes(c).norm[mask]
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if vals.size == 0:
            return None
        steps = c.step[mask]
        value = nice(float(np.percentile(vals, 95)))
        return value, {"p95": float(np.percentile(vals, 95)), "median": float(np.median(vals)),
                       "window": [int(steps.min()), int(steps.max())], "n": int(vals.size)}

    return _ctx_cache(ctx, "suggested_max_norm", make)


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length arrays (ties get their average rank);
    0.0 when either is constant or fewer than 3 pairs are finite. numpy only (no scipy)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return 0.0
    rx = pd.Series(x[ok]).rank().to_numpy()
    ry = pd.Series(y[ok]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def series_trend(values: np.ndarray, positions: np.ndarray | None = None) -> dict[str, float]:
    """Trend of a per-step series: ``spearman`` (rank correlation with position, 1.0 =
    strictly increasing) and ``late_over_early`` (median of the last quarter over the first
    quarter, NaN if not computable), on the finite values; ``n`` values used."""
    v = np.asarray(values, dtype=np.float64)
    pos = np.arange(v.size, dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    ok = np.isfinite(v) & np.isfinite(pos)
    v, pos = v[ok], pos[ok]
    out = {"spearman": float("nan"), "late_over_early": float("nan"), "n": int(v.size)}
    if v.size < 4:
        return out
    out["spearman"] = rank_correlation(pos, v)
    q = max(1, v.size // 4)
    early, late = float(np.median(v[:q])), float(np.median(v[-q:]))
    if early > 0:
        out["late_over_early"] = late / early
    return out


def fp16_trained_modules(ctx: RunContext) -> list[str]:
    """Of :func:`fp16_compute_modules`, those whose *training* forwards ran in float16.

    Autocast events do not say whether a forward had grad enabled, so a float16 autocast used
    only for evaluation looks the same as float16 training. The sampled activation statistics
    are taken on grad-enabled forwards only, and a float16 output's largest magnitude is a
    float16 number: if a module's sampled ``absmax`` values are not all exactly representable
    in float16, its training forwards ran in a wider dtype (the chance that a float32 value is
    exactly a float16 one is about 2**-13 per sample). Modules without samples are kept.
    """

    def make(c: RunContext) -> list[str]:
        mods = fp16_compute_modules(c)
        act = c.samples("activation", "absmax")
        if act.empty or not mods:
            return mods
        out = []
        for name in mods:
            v = act.loc[act["target"].astype(str) == name, "value"].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v) & (v != 0)]
            if v.size and not np.all(v.astype(np.float16).astype(np.float64) == v):
                continue
            out.append(name)
        return out

    return _ctx_cache(ctx, "fp16_trained_modules", make)


# ==== shared views for the optimization (GP5xx) and data (GP6xx) rules =======================
# Appended as module-level functions (cached on the context with ``_ctx_cache``).

#: The update-to-weight ratio ||dW|| / ||W|| per optimizer step at which training usually
#: moves steadily: each step changes a weight matrix by about a thousandth of its size, so a
#: few thousand steps can move it by its own scale, and no single step can overshoot. GP501 and
#: GP502 act only a decade or more away from it, and only together with evidence in the loss.
TARGET_UPDATE_RATIO = 1e-3
#: GP501's lr suggestion aims here, half a decade above the centre. A too-high lr is measured
#: on the run's first steps (before the harm), where Adam moves every element by the full lr
#: (m / sqrt(v) is exactly +-1 at the first step, a fraction of it once the moments average
#: the noise) and SGD steps on the largest gradients of the run: extrapolating that ratio
#: linearly to a new lr overstates the new lr's steady ratio by a factor of a few. Aiming at
#: 10**-2.5 keeps a sqrt(10) margin under GP501's threshold (1e-2) if the extrapolation is
#: exact, and does not give away the 3x of progress per step that aiming at the centre would.
SUGGEST_RATIO_WHEN_TOO_HIGH = 10 ** -2.5


def smoothing_window(n: int) -> int:
    """Records per smoothing window for a series of ``n`` records: ``n // 20`` clamped to
    [5, 50]. Five is the fewest records whose median ignores two outliers; 20 windows across a
    run keep its shape; 50 caps the lag on long runs."""
    return int(min(50, max(5, n // 20)))


class LossCurve:
    """A loss series (training or validation) as levels that mini-batch noise does not move.
    One definition for GP501-GP506.

    Attributes:
        steps, values: the finite records in order (``values`` as float64).
        n: finite records.
        per_step: every record is one optimizer step's own loss (a gradprobe log, or a
            foreign log that logged every step); False when a record averages many steps
            (Hugging Face ``logging_steps``, one validation pass).
        window: :func:`smoothing_window` of ``n``.
        smooth: centred rolling median over ``window`` (post hoc, so non-causal).
        initial, final: medians of the first and last ``window`` records.
        start: where the loss started: the lower of the first record (the untrained model)
            and ``initial`` (a blow-up in the first steps must not inflate the start).
        best, best_index: the lowest smoothed level and its record index.
        noise: spread of the records about ``smooth`` (1.4826 x median absolute residual, the
            standard deviation for Gaussian noise).
        nonfinite_step: first step whose loss was NaN/Inf (None: never).
    """

    def __init__(self, steps: np.ndarray, values: np.ndarray, *, per_step: bool,
                 nonfinite: np.ndarray | None = None) -> None:
        steps = np.asarray(steps, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        fin = np.isfinite(values)
        bad = ~fin & ~np.isnan(values)
        if nonfinite is not None:
            bad |= np.asarray(nonfinite, dtype=bool)
        self.nonfinite_step = int(steps[bad][0]) if bad.any() else None
        self.steps = steps[fin]
        self.values = values[fin]
        self.n = int(self.values.size)
        self.per_step = per_step
        self.window = smoothing_window(self.n)
        w = self.window
        if self.n:
            self.smooth = pd.Series(self.values).rolling(w, center=True, min_periods=1).median().to_numpy()
            self.initial = float(np.median(self.values[:w]))
            self.start = min(float(self.values[0]), self.initial)
            self.final = float(np.median(self.values[-w:]))
            self.best_index = int(np.argmin(self.smooth))
            self.best = float(self.smooth[self.best_index])
            self.noise = float(1.4826 * np.median(np.abs(self.values - self.smooth)))
        else:
            self.smooth = np.zeros(0)
            self.initial = self.start = self.final = self.best = self.noise = math.nan
            self.best_index = 0

    def level_before(self, i: int) -> float:
        """Median of the ``window`` records before record ``i`` (NaN: none)."""
        seg = self.values[max(0, i - self.window):i]
        return float(np.median(seg)) if seg.size else math.nan

    def level_after(self, i: int) -> float:
        """Median of the ``window`` records after record ``i`` (NaN: none)."""
        seg = self.values[i + 1:i + 1 + self.window]
        return float(np.median(seg)) if seg.size else math.nan

    def index_at(self, step: int) -> int:
        """Index of the first record at or after ``step`` (``n`` if none)."""
        return int(np.searchsorted(self.steps, step, side="left"))

    @property
    def progress(self) -> float:
        """(start - final) / |start|: the fraction of its starting level the loss lost."""
        if not self.n or self.start == 0:
            return 0.0
        return (self.start - self.final) / abs(self.start)

    @property
    def settled_start(self) -> float:
        """Where the loss started, judged on levels that mini-batch noise does not decide: the
        first window's median, or the first record (the untrained model) when it lies more
        than 5 noise units away from that median. A window median scatters by ~1.25 x noise /
        sqrt(window), a single record by the noise itself, and per-batch losses are skewed to
        the right (a mean of squared errors or log-losses: a hard batch reaches 3-4 noise units
        far more often than Gaussian noise would): one easy or hard first batch must not move
        the start, while a loss that falls fast (the first record far above the window) or
        blows up in its first steps (far below it) is measured from where it was."""
        if not self.n:
            return math.nan
        first = float(self.values[0])
        return first if abs(first - self.initial) > 5.0 * self.noise else self.initial

    @property
    def settled_progress(self) -> float:
        """(settled_start - final) / |settled_start|: the fraction of its starting level the
        loss lost, robust to the first batch's noise."""
        st = self.settled_start
        if not self.n or st == 0:
            return 0.0
        return (st - self.final) / abs(st)

    @property
    def fell(self) -> bool:
        """The loss ended below :attr:`settled_start` by more than :func:`level_significance`
        (10% of the start and 3 standard errors of a window median; 5 noise units when the
        start is the single first record): it made progress that noise does not explain."""
        return self.n >= 2 and bool(self.settled_start - self.final >= self._change_significance())

    @property
    def rose(self) -> bool:
        """The loss ended above :attr:`settled_start` by more than :func:`level_significance`
        (and by 5 noise units when the start is the single first record)."""
        return self.n >= 2 and bool(self.final - self.settled_start >= self._change_significance())

    def _change_significance(self) -> float:
        """The change :attr:`fell` and :attr:`rose` require: :func:`level_significance`, and
        at least 5 noise units when the settled start is not the first record."""
        sig = level_significance(self)
        return max(sig, 5.0 * self.noise) if self.settled_start != self.initial else sig

def level_significance(curve: LossCurve) -> float:
    """Smallest difference between two levels of ``curve`` that noise does not explain: 3
    standard errors of a window median (1.25 x noise / sqrt(window): the median's standard
    error for Gaussian noise), and at least 10% of the starting level."""
    se = 1.25 * curve.noise / math.sqrt(max(curve.window, 1))
    return max(3.0 * se, 0.10 * abs(curve.start))


def _per_step_records(steps: np.ndarray) -> bool:
    if steps.size < 2:
        return True
    return float(np.median(np.diff(steps))) <= 1.0


def loss_curve(ctx: RunContext) -> LossCurve:
    """The training loss (:attr:`RunContext.loss`) as a :class:`LossCurve`."""

    def make(c: RunContext) -> LossCurve:
        nonfinite = (c.col("loss_nonfinite", bool) | c.col("loss_fn_nonfinite", bool)) if c.n else np.zeros(0, bool)
        fin = np.isfinite(c.loss)
        per_step = c.kind == "gradprobe" or _per_step_records(c.step[fin])
        return LossCurve(c.step, c.loss, per_step=per_step, nonfinite=nonfinite)

    return _ctx_cache(ctx, "loss_curve", make)


def eval_curve(ctx: RunContext) -> LossCurve | None:
    """The validation loss (:attr:`RunContext.eval_loss`) as a :class:`LossCurve`; None
    without one. A record averages a whole validation pass (``per_step`` False), unless the
    records come every step (a no-grad loss computed on each training batch, e.g. for
    logging): those are single batches, as noisy as the training loss."""

    def make(c: RunContext) -> LossCurve | None:
        ev = c.eval_loss
        if ev is None or len(ev) == 0:
            return None
        ev = ev.sort_index()
        steps = ev.index.to_numpy(dtype=np.int64)
        return LossCurve(steps, ev.to_numpy(dtype=np.float64), per_step=_per_step_records(steps) and len(ev) > 1)

    return _ctx_cache(ctx, "eval_curve", make)


#: A loss record at least this many times its running level (jump >= 2 x |level|) is high.
#: Mini-batch losses scatter about their level by tens of percent; a batch mean three times
#: the population mean needs a batch made almost entirely of the hardest examples.
LOSS_SPIKE_FACTOR = 3.0
#: ... and at least this many robust standard deviations of the record-to-record noise above it
#: (so that losses noisy by nature, e.g. reinforcement-learning objectives, need more).
LOSS_SPIKE_Z = 6.0
#: In the first records of a curve (fewer than 5 before it: no noise estimate yet) a spike
#: must reach this factor.
LOSS_SPIKE_SINGLE = 10.0
#: A spike must undo at least this fraction of the progress the loss had made (initial level
#: minus the level before the spike); smaller ones do not set the run back.
LOSS_SPIKE_MATERIAL = 0.05


class LossSpike:
    """One spike event of a :class:`LossCurve`: consecutive high records.

    Attributes:
        start, end, peak: record indices (first, last, highest).
        step, peak_step, end_step: their steps.
        level: the running level before the spike; ``peak_value``: the highest record.
        factor: ``peak_value / level`` (for a level <= 0: 1 + jump / |level|).
        z: jump in robust standard deviations of the running noise.
        records: records in the event.
        recovered: the loss came back below half-way between level and peak afterwards.
    """

    def __init__(self, curve: LossCurve, start: int, end: int, level: float, sigma: float) -> None:
        v = curve.values
        seg = v[start:end + 1]
        self.start, self.end = int(start), int(end)
        self.peak = int(start + int(np.argmax(seg)))
        self.step = int(curve.steps[start])
        self.peak_step = int(curve.steps[self.peak])
        self.end_step = int(curve.steps[end])
        self.level = float(level)
        self.peak_value = float(v[self.peak])
        jump = self.peak_value - self.level
        self.factor = self.peak_value / self.level if self.level > 0 else 1.0 + jump / max(abs(self.level), 1e-300)
        self.z = jump / sigma if sigma > 0 else math.inf
        self.records = int(end - start + 1)
        after = v[end + 1:end + 1 + curve.window]
        half = self.level + 0.5 * jump
        self.recovered = bool(after.size) and float(np.median(after)) < half

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "peak_step": self.peak_step, "level": self.level, "peak": self.peak_value,
                "factor": round(self.factor, 2), "records": self.records, "recovered": self.recovered}


def loss_spikes(curve: LossCurve | None) -> list[LossSpike]:
    """Spike events of a loss curve (see the ``LOSS_SPIKE_*`` constants).

    Running level: median of the previous ``max(window, 10)`` records; running noise: 1.4826 x
    the median absolute residual about the smooth level over the same records (from 5 records
    on), capped at the whole curve's noise (a window that holds an earlier spike overstates
    it). A record starts a spike when it is at least ``LOSS_SPIKE_FACTOR`` times the level and
    ``LOSS_SPIKE_Z`` noise units above it, and the jump is material (``LOSS_SPIKE_MATERIAL``);
    with fewer than 5 earlier records (the first steps, where the noise is unknown) only a jump
    of ``LOSS_SPIKE_SINGLE`` times the level does, the level there being the lower of the
    running median and the first record (the untrained model's loss: a loss that climbs over
    its first records, as an oversized first step makes it, would otherwise carry its own
    median level up with it). The spike goes on while the following
    records pass the same test against the level *before* it (a trailing median would soon
    absorb the spike itself).

    On an averaged curve (validation passes, foreign records averaging many steps) one record
    is a spike. On a per-step curve (one record per batch) a single record never is (one hard
    or corrupt batch lifts one record; weights knocked off course lift the records that
    follow), and a run of L records counts only when independent outliers would not make one:
    with p the run's own rate of records at least as far above their running level as the
    spike's lowest record (the spike's own records included: the rate is estimated from this
    run, and the spike is part of it), n p**L < 0.05. Late in a classification run, where a
    few percent of batches carry a confidently wrong example at 10-25x the median, two in a
    row are then expected and need a third; in a run without other such records two suffice
    once it is longer than 80 records (n (2/n)**2 < 0.05): in a shorter one, two high records
    in a row are what its own heavy-tailed batches can make. Two exceptions, where chance is
    not an explanation: a spike in the first records (10x the untrained model's loss, held to
    ``LOSS_SPIKE_SINGLE``), and a spike the run never came back from (it went non-finite right
    after its last record).
    """
    if curve is None or curve.n < 6:
        return []
    if "_loss_spikes" in curve.__dict__:  # computed once per curve (several rules ask)
        return list(curve.__dict__["_loss_spikes"])
    v = curve.values
    n = curve.n
    W = max(curve.window, 10)
    prev = pd.Series(v).shift(1).rolling(W, min_periods=1)
    level = prev.median().to_numpy()
    count = prev.count().to_numpy()
    resid = pd.Series(np.abs(v - curve.smooth))
    sigma = np.nan_to_num(1.4826 * resid.shift(1).rolling(W, min_periods=5).median().to_numpy(), nan=0.0)
    # a window holding an earlier spike overstates the noise: never above the run's own noise
    sigma = np.minimum(sigma, curve.noise)
    early = np.nan_to_num(count, nan=0.0) < 5
    # the first records: the untrained model's loss bounds the level (a loss climbing over its
    # first records, as an oversized first step makes it, would carry a median level up with it)
    level = level.copy()
    level[1:] = np.where(early[1:], np.fmin(level[1:], v[0]), level[1:])

    def high(vals: np.ndarray, lvl: Any, sig: Any, is_early: Any) -> np.ndarray:
        # elementwise: records ``vals`` high against level ``lvl`` (arrays, or one event's scalars)
        with np.errstate(invalid="ignore", over="ignore"):
            jump = vals - lvl
            factor = np.where(is_early, LOSS_SPIKE_SINGLE, LOSS_SPIKE_FACTOR)
            return (np.isfinite(lvl) & (jump > 0) & (jump >= (factor - 1.0) * np.abs(lvl))
                    & (is_early | (jump >= LOSS_SPIKE_Z * sig))
                    & (jump >= LOSS_SPIKE_MATERIAL * np.maximum(curve.initial - lvl, 0.0)))

    found: list[LossSpike] = []
    nxt = 0
    for i in np.flatnonzero(high(v, level, sigma, early)).tolist():
        if i < nxt:
            continue  # inside the previous event
        # the event goes on while the records stay high against the level before it
        j, chunk = i, 64
        while j + 1 < n:
            seg = high(v[j + 1:j + 1 + chunk], level[i], sigma[i], early[i])
            stop = np.flatnonzero(~seg)
            if stop.size:
                j += int(stop[0])
                break
            j += int(seg.size)
            chunk *= 2
        found.append(LossSpike(curve, i, j, level[i], float(sigma[i])))
        nxt = j + 1
    if not curve.per_step:
        curve.__dict__["_loss_spikes"] = found
        return list(found)
    with np.errstate(all="ignore"):
        rel = np.where(level > 0, v / level, np.nan)
    known = np.isfinite(rel) & ~early
    n_known = max(int(known.sum()), 1)
    broke = curve.nonfinite_step is not None
    out = []
    known_rel: np.ndarray | None = None  # sorted ratios of the known records (on first need)
    for e in found:
        if e.records < 2:
            continue
        if early[e.start]:
            out.append(e)  # 10x the untrained model's loss, twice: no batch of the first steps does that
            continue
        if broke and e.end == n - 1 and curve.nonfinite_step > e.end_step:
            out.append(e)  # the run never came back: it went non-finite right after
            continue
        seg = v[e.start:e.end + 1]
        low = float(seg.min() / e.level) if e.level > 0 else 1.0 + float(seg.min() - e.level) / max(abs(e.level), 1e-300)
        # the run's rate of records at least this far above their running level, the spike's own
        # records included: the rate is estimated from this run, and the spike is part of it
        # (counted as all known records >= low minus those inside the spike: one sort, not one pass per event)
        if known_rel is None:
            known_rel = np.sort(rel[known])
        above = known_rel.size - int(np.searchsorted(known_rel, low, side="left"))
        with np.errstate(invalid="ignore"):
            above -= int((known[e.start:e.end + 1] & (rel[e.start:e.end + 1] >= low)).sum())
        p = float(above + e.records) / n_known
        if n * p ** e.records < 0.05:
            out.append(e)
    curve.__dict__["_loss_spikes"] = out
    return list(out)


def init_scale_norm(shape: list[int] | tuple[int, ...]) -> float:
    """A floor for the norm of a weight tensor of this shape: half the norm of a unit-gain
    Xavier initialisation, 0.5 * sqrt(out * in / (out + in)) (the receptive field cancels for
    kernels). Every standard initialisation (PyTorch's default, Xavier, Kaiming, the recurrent
    layers') gives a larger norm; weights below it were initialised (or shrunk) far below any
    design scale."""
    if len(shape) < 2:
        return 0.0
    o, i = float(shape[0]), float(shape[1])
    return 0.5 * math.sqrt(o * i / (o + i)) if o + i > 0 else 0.0


def update_ratios(ctx: RunContext) -> pd.DataFrame:
    """Sampled update-to-weight ratios, one row per sampled step, one column per parameter:
    ||dW|| / max(||W||, :func:`init_scale_norm`). Only weight matrices and kernels (two or more
    dimensions) when the run has any: biases and normalisation gains have small norms (a
    zero-initialised bias has an infinite ratio on its first step) and are not what the
    learning rate is tuned for. The floor keeps weights initialised far below any design
    scale (xavier gain 0.001) from reading as huge relative steps: a step of lr on a weight of
    1e-3 is the weights growing back to size, not overshooting. Parameters that never moved
    (ratio 0 on every sample: frozen, or unused) are dropped."""

    def make(c: RunContext) -> pd.DataFrame:
        s = c.samples("update", "ratio")
        if s.empty:
            return pd.DataFrame()
        t = s.assign(target=s["target"].astype(str)).pivot_table(index="step", columns="target", values="value", aggfunc="max")
        t = t.replace([np.inf, -np.inf], np.nan)
        matrix = [col for col in t.columns if len(c.layer_info.get(col, {}).get("shape") or []) >= 2]
        if matrix:
            t = t[matrix]
        moving = [col for col in t.columns if (t[col].fillna(0) > 0).any()]
        t = t[moving].sort_index()
        lw = c.log.layer_weight
        for col in t.columns:
            floor = init_scale_norm(c.layer_info.get(col, {}).get("shape") or [])
            if floor <= 0 or col not in lw.columns:
                continue
            w = lw[col].reindex(t.index).to_numpy(dtype=np.float64)
            ok = np.isfinite(w) & (w > 0) & (w < floor)
            if ok.any():
                vals = t[col].to_numpy(dtype=np.float64).copy()
                vals[ok] = vals[ok] * w[ok] / floor
                t[col] = vals
        return t

    return _ctx_cache(ctx, "update_ratios", make)


def update_ratio_by_step(ctx: RunContext) -> pd.Series:
    """Median over parameters of :func:`update_ratios` per sampled step (finite, > 0)."""

    def make(c: RunContext) -> pd.Series:
        t = update_ratios(c)
        if t.empty:
            return pd.Series([], dtype=np.float64)
        med = t.where(t > 0).median(axis=1, skipna=True)
        return med[np.isfinite(med) & (med > 0)]

    return _ctx_cache(ctx, "update_ratio_by_step", make)


def _bernoulli_entropy(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


class TrivialLoss:
    """The loss of a model that ignores its input, per sampled step, from the target samples:
    predicting the data's mean under ``mse_loss``, the uniform distribution under
    ``cross_entropy``/``nll_loss`` (ln n_classes), the base rate under
    ``binary_cross_entropy(_with_logits)``. Summed over the grad-enabled loss calls of the
    step, as ``loss_fn`` is.

    The data's mean (and base rate) is the mean of the sampled batch means of that loss
    function, so a batch's baseline is what predicting it costs on that batch: under MSE its
    variance plus its mean's squared distance from the data's mean (the law of total variance:
    batches of contiguous windows, or an unshuffled dataset, have small within-batch variance
    but a model that ignores its input cannot know the batch's own mean).

    Attributes:
        table: DataFrame indexed by sampled step: ``baseline``, ``loss_fn`` (the recorded value),
            ``ratio`` (loss_fn / baseline), ``expected_initial`` (what loss_fn should be for
            the recorded predictions if they were unrelated to the targets), ``kinds``.
        first_over_expected: the first sampled loss_fn / expected_initial (NaN: none).
        consistent: the first sampled loss matches ``expected_initial`` within a factor 3,
            i.e. the loss is on the scale the baseline assumes (not reduction="sum", not
            re-weighted, not a sum with other terms); rules compare with the baseline only then.
        kinds: the baselines involved (``mean``, ``uniform``, ``base-rate``).
        pred_spread: per sampled step, the largest across-batch std of one output feature
            relative to the target std (regression) or in nats (logits): near 0 means the
            predictions do not depend on the input.
    """

    _KINDS = {"mse_loss": "mean", "cross_entropy": "uniform", "nll_loss": "uniform",
              "binary_cross_entropy": "base-rate", "binary_cross_entropy_with_logits": "base-rate"}

    def __init__(self, ctx: RunContext) -> None:
        self.table = pd.DataFrame()
        self.consistent = False
        self.kinds: list[str] = []
        self.pred_spread = pd.Series([], dtype=np.float64)
        self.first_over_expected = math.nan
        s = ctx.samples("target")
        if s.empty:
            return
        s = s.assign(target=s["target"].astype(str), stat=s["stat"].astype(str))
        loss_fn = pd.Series(ctx.col("loss_fn"), index=ctx.step)
        loss_fn = loss_fn[~loss_fn.index.duplicated(keep="last")]
        means = s[s["stat"] == "mean"].groupby("target")["value"].mean()
        rows = []
        spreads = {}
        for step, g in s.groupby("step", sort=True):
            base = 0.0
            expected = 0.0
            kinds = []
            ok = True
            spread = []
            for name, gg in g.groupby("target", sort=False):
                kind = self._KINDS.get(name)
                st = {k: gg.loc[gg["stat"] == k, "value"].to_numpy(dtype=np.float64) for k in
                      ("numel", "var", "mean", "std", "absmax", "n_classes", "pred_std", "pred_mean",
                       "pred_feature_std_max")}
                calls = st["numel"].size
                if kind is None or calls == 0:
                    ok = False
                    break
                for k in range(calls):
                    def at(key: str) -> float:
                        arr = st[key]
                        return float(arr[k]) if k < arr.size else math.nan
                    if kind == "mean":
                        var = at("var")
                        base += var + (at("mean") - float(means.get(name, at("mean")))) ** 2
                        expected += var + at("pred_std") ** 2 + (at("mean") - at("pred_mean")) ** 2
                        tstd = at("std")
                        if tstd > 0:
                            spread.append(at("pred_feature_std_max") / tstd)
                    elif kind == "uniform":
                        c = at("n_classes")
                        if not c > 1:
                            ok = False
                            break
                        base += math.log(c)
                        expected += math.log(c) + 0.5 * at("pred_std") ** 2
                        spread.append(at("pred_feature_std_max"))
                    else:
                        m = at("mean")
                        if not (0.0 <= m <= 1.0) or at("absmax") > 1.0:
                            ok = False
                            break
                        pbar = min(max(float(means.get(name, m)), 1e-7), 1 - 1e-7)
                        base += -(m * math.log(pbar) + (1 - m) * math.log(1 - pbar))
                        expected += _bernoulli_entropy(m)
                    kinds.append(kind)
                if not ok:
                    break
            if not ok or not base > 0:
                continue
            lf = float(loss_fn.get(step, math.nan))
            rows.append({"step": int(step), "baseline": base, "loss_fn": lf, "ratio": lf / base if math.isfinite(lf) else math.nan,
                         "expected_initial": expected, "kinds": ",".join(sorted(set(kinds)))})
            if spread and np.isfinite(spread).any():
                spreads[int(step)] = float(np.nanmax(spread))
        if not rows:
            return
        self.table = pd.DataFrame(rows).set_index("step").sort_index()
        self.kinds = sorted({k for ks in self.table["kinds"] for k in ks.split(",") if k})
        self.pred_spread = pd.Series(spreads, dtype=np.float64).sort_index()
        first = self.table.dropna(subset=["loss_fn"])
        if len(first):
            r = first["loss_fn"].iloc[0] / first["expected_initial"].iloc[0] if first["expected_initial"].iloc[0] > 0 else math.nan
            self.first_over_expected = float(r)
            self.consistent = bool(math.isfinite(r) and 1 / 3 <= r <= 3)

    def ratio_between(self, lo: int, hi: int) -> float:
        """Median of ``loss_fn / baseline`` over the sampled steps in [lo, hi] (NaN: none)."""
        if self.table.empty:
            return math.nan
        t = self.table.loc[(self.table.index >= lo) & (self.table.index <= hi), "ratio"].dropna()
        return float(t.median()) if len(t) else math.nan

    def baseline_between(self, lo: int, hi: int) -> float:
        if self.table.empty:
            return math.nan
        t = self.table.loc[(self.table.index >= lo) & (self.table.index <= hi), "baseline"].dropna()
        return float(t.median()) if len(t) else math.nan


def trivial_loss(ctx: RunContext) -> TrivialLoss:
    return _ctx_cache(ctx, "trivial_loss", TrivialLoss)
