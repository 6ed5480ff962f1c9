"""Mixed precision as the rules read it: autocast as it was in force module by module, the
GradScaler's history (calibration, settled scale, collapse), and float16 overflow.

The mechanics. float16 holds magnitudes from 2**-24 (smallest subnormal; below it a value is
0) to 65504 (about 2**16; above it a value is inf), normal precision only from 2**-14 up. A
GradScaler multiplies the loss by ``scale`` before backward so that small gradients stay
representable, checks the unscaled gradients for inf/NaN, skips the optimizer step when it
finds one, and in ``update()`` multiplies the scale by ``backoff_factor`` (0.5) after a skip
or by ``growth_factor`` (2) after ``growth_interval`` (2000) clean steps in a row. The
default ``init_scale`` of 2**16 is float16's own range: it starts as high as can make sense
and backs off, one skipped step per halving, until the gradients fit; that search is the
calibration, not a fault.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.nonfinite import nonfinite_timeline
from gradprobe.analysis.steps import scaler_rows

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

#: Halvings (factor 2**8 = 256) between the initial scale and the scale the run settles at
#: from which the start is a "long burst" rather than the scaler calibrating (see GP301).
LONG_BURST_HALVINGS = 8
#: float16's range as a scale: 2**16 (~65504) is PyTorch's default init_scale, the largest
#: scale at which a gradient entry of 1 still fits.
FP16_MAX_SCALE = 2.0**16
#: Late skip rate (net of growth probes) above which skipping is sustained (see GP302).
LATE_SKIP_RATE = 0.01
LATE_SKIP_MIN = 3
#: Skipped steps whose unscaled loss was already inf/NaN: the forward itself overflowed.
FORWARD_OVERFLOW_MIN = 2


def scaler_in_use(ctx: RunContext) -> bool:
    """An enabled GradScaler was configured or a loss scale was recorded."""
    return ctx.scaler is not None or bool(scaler_rows(ctx).any())


@quantity
def autocast_modules(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Autocast as it was actually in force, module by module.

    Merges the ``autocast`` events (every change) with the metadata (last state). Per module:
    ``class``, ``dtypes`` (autocast dtypes seen while enabled), ``output_dtypes`` (output
    dtypes seen while enabled; None = the forward raised), ``first_step`` (first step seen
    enabled), ``enabled`` (ever enabled).
    """
    out: dict[str, dict[str, Any]] = {}
    entries = [(e.get("module"), e) for e in ctx.events("autocast")]
    entries += list((ctx.meta.get("autocast") or {}).items())
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



@quantity
def autocast_dtypes(ctx: RunContext) -> set[str]:
    """Autocast dtypes requested anywhere in the run (empty: autocast never on)."""
    return {d for m in autocast_modules(ctx).values() for d in m["dtypes"] if d and d != "none"}


@quantity
def fp16_compute_modules(ctx: RunContext) -> list[str]:
    """Matmul/conv/recurrent modules whose output was actually float16 under autocast (they
    computed in float16; containers and activations only pass float16 through)."""
    return [n for n, m in autocast_modules(ctx).items() if "float16" in m["dtypes"] and "float16" in m["output_dtypes"]
            and m.get("class") in AUTOCAST_COMPUTE_CLASSES]


@quantity
def fp16_trained_modules(ctx: RunContext) -> list[str]:
    """Of :func:`fp16_compute_modules`, those whose *training* forwards ran in float16.

    Autocast events do not say whether a forward had grad enabled, so a float16 autocast used
    only for evaluation looks the same as float16 training. The sampled activation statistics
    are taken on grad-enabled forwards only, and a float16 output's largest magnitude is a
    float16 number: if a module's sampled ``absmax`` values are not all exactly representable
    in float16, its training forwards ran in a wider dtype (the chance that a float32 value is
    exactly a float16 one is about 2**-13 per sample). Modules without samples are kept.
    """
    mods = fp16_compute_modules(ctx)
    act = ctx.samples("activation", "absmax")
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


@quantity
def scaler_history(ctx: RunContext) -> ScalerHistory:
    return ScalerHistory(ctx)


def uses_fp16_or_unknown(ctx: RunContext) -> bool:
    """Scale-driven overflow is a float16 phenomenon; with only bfloat16/float32 autocast a
    skipped step is a genuine inf/NaN (GP4xx), not float16's range."""
    dtypes = autocast_dtypes(ctx)
    return not dtypes or "float16" in dtypes


def has_scale(ctx: RunContext) -> bool:
    return ("scaler" in ctx.signals or "loss_scale" in ctx.signals) and bool(scaler_rows(ctx).any())


@quantity
def fp16_activation_overflow_steps(ctx: RunContext) -> list[tuple[int, str]]:
    """Sampled steps where the forward itself overflowed float16: the first module (in call
    order) whose output was non-finite is a module that computed in float16, while the
    model's input was finite and the parameters were still finite. A matmul/conv of finite
    numbers can only produce inf by exceeding 65504. Returns (step, module) pairs."""
    fp16 = set(fp16_trained_modules(ctx))
    act = ctx.samples("activation", "nonfinite")
    if not fp16 or act.empty:
        return []
    tl = nonfinite_timeline(ctx)
    inp = ctx.samples("input", "nonfinite")
    clean_input_steps = set(inp.loc[inp["value"] == 0, "step"].astype(int)) - set(
        inp.loc[inp["value"] > 0, "step"].astype(int))
    out = []
    for step, grp in act.groupby("step"):
        step = int(step)
        if step not in clean_input_steps or (tl.param_step is not None and step > tl.param_step):
            continue
        bad = grp[grp["value"] > 0]
        if bad.empty:
            continue
        first = str(bad.sort_values("index")["target"].iloc[0])
        if first in fp16:
            out.append((step, first))
    return out


class OverflowTriggers:
    """The ways float16 overflow shows (GP302), shared with GP301 (a collapsing scale is not
    a high initial scale) and GP304 (nor calibration): in the scaler's history
    (``collapsed_below_1``, ``late_skipping``, ``no_step_succeeded``, ``forward_overflow``:
    skipped steps whose unscaled loss was inf/NaN) and in the sampled activations
    (``activation_overflow``: a float16 module produced the first inf of the forward; seen
    with or without a scaler, e.g. when the loop skips non-finite losses before the scaler
    sees them).

    Attributes:
        triggered: condition -> (first_step, confidence), for the conditions met.
        activation_overflow: (step, module) pairs of :func:`fp16_activation_overflow_steps`.
        forward_overflow: scaler positions of skipped steps whose loss was inf/NaN before any
            scaling (not after NaN data).
    """

    def __init__(self, ctx: RunContext) -> None:
        out: dict[str, tuple[int, float]] = {}
        h = scaler_history(ctx)
        act = fp16_activation_overflow_steps(ctx)
        self.activation_overflow = act
        self.forward_overflow = h.forward_overflow[:0]
        if act:
            out["activation_overflow"] = (act[0][0], min(1.0, 0.7 + 0.1 * len(act)))
        if h.n and has_scale(ctx) and uses_fp16_or_unknown(ctx):
            low = np.flatnonzero((h.scale_after <= 1.0) | (h.scale_before <= 1.0))
            if low.size:
                c = min(1.0, 0.7 + 0.05 * math.log2(1.0 / max(h.min_scale, 1e-30)))
                out["collapsed_below_1"] = (h.step_of(int(low[0])), c)
            if h.first_success is None and h.skipped.sum() >= LONG_BURST_HALVINGS and h.min_scale > 1.0:
                # not one step has succeeded: the scale is still falling. Below float16's own range
                # (2**16) by 8+ halvings, it is past any calibration: the unscaled values overflow
                below = math.log2(FP16_MAX_SCALE / h.min_scale) if h.min_scale > 0 else math.inf
                if below >= LONG_BURST_HALVINGS:
                    c = 0.5 + 0.5 * min(1.0, (below - (LONG_BURST_HALVINGS - 1)) / 8.0)
                    out["no_step_succeeded"] = (h.step_of(0), c)
            if h.late_excess_skips >= LATE_SKIP_MIN and h.late_rate >= LATE_SKIP_RATE and h.tail_excess_skips >= 1:
                late_skips = h.late[h.skipped[h.late]]
                c = 0.5 + 0.25 * min(1.0, h.late_excess_skips / 10.0) + 0.25 * min(1.0, h.late_rate / 0.1)
                out["late_skipping"] = (h.step_of(int(late_skips[0])), c)
            if h.forward_overflow.size >= FORWARD_OVERFLOW_MIN:
                tl = nonfinite_timeline(ctx)
                fo = h.forward_overflow
                if tl.input_observed_step is not None:  # NaN data, not float16's range
                    fo = fo[h.steps[fo] < tl.input_observed_step]
                if fo.size >= FORWARD_OVERFLOW_MIN:
                    c = min(1.0, 0.6 + 0.1 * fo.size)
                    out["forward_overflow"] = (h.step_of(int(fo[0])), c)
                    self.forward_overflow = fo
        self.triggered = out

    @property
    def collapsing(self) -> bool:
        """The scale keeps falling: it reached 1, skipping goes on late, or nothing succeeded."""
        return any(k in self.triggered for k in ("collapsed_below_1", "late_skipping", "no_step_succeeded"))


@quantity
def overflow_triggers(ctx: RunContext) -> OverflowTriggers:
    return OverflowTriggers(ctx)


@quantity
def high_init(ctx: RunContext) -> dict[str, Any] | None:
    """GP301's condition, shared with GP304: the initial scale at least 2**8 above the settled
    scale, skips on the way down, and the scale held afterwards (not collapsing)."""
    if not has_scale(ctx):
        return None
    h = scaler_history(ctx)
    if h.settled_scale is None or h.init_scale is None or h.settled_scale <= 0 or not h.calibration_skips.size:
        return None
    halvings = math.log2(h.init_scale / h.settled_scale)
    if halvings < LONG_BURST_HALVINGS - 1e-9 or overflow_triggers(ctx).collapsing:
        return None
    return {"halvings": halvings}
