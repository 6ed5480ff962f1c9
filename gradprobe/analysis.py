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
