"""The run context: a RunLog plus every derived quantity, computed lazily through one cache.

A *quantity* is a function ``f(ctx, *args) -> value`` decorated with :func:`quantity`: the
first call computes it, later calls (from any rule) return the same object from
``ctx``'s cache, keyed by the function and its arguments. Context attributes that are
quantities of the run itself (``ctx.loss``, ``ctx.step``...) go through the same cache
(:func:`attribute`). There is no other cache: a rule never stores anything on the context,
and values handed out are shared, so nobody modifies them.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import pandas as pd

from gradprobe.runlog import RunLog
from gradprobe.runlog.schema import eval_stream_name
from gradprobe.signals import available_signals

T = TypeVar("T")

#: Optimizers whose step size is normalised per parameter by running gradient statistics:
#: a uniform rescaling of the gradient (clipping, loss scale) barely changes their update.
ADAPTIVE_OPTIMIZERS = frozenset(
    {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
     "Adafactor", "LAMB", "Lamb", "FusedAdam", "FusedLAMB", "Lion", "AdamWScheduleFree", "Adam8bit", "AdamW8bit"}
)

#: The recorder's validation stream is chosen among the no-grad loss streams with at least this
#: many evaluations: a one-off evaluation (a final test pass after training) says nothing of
#: how the run went, whereas a stream evaluated again and again does.
MIN_STREAM_RECORDS = 2


#: frames of a no-grad loss stream's call chain shown in messages (the loss call, the function
#: that computed it, the line that called that)
SHOWN_FRAMES = 3


@dataclass(frozen=True)
class EvalStream:
    """One no-grad loss stream of a recorded run: the loss function's values computed without
    grad at one call site (``site``: ``file:line`` of each frame of the call chain, innermost
    first; empty where the log does not say), one value per step (the mean of that step's
    calls), indexed by step."""

    name: str
    site: tuple[str, ...]
    series: pd.Series

    @property
    def where(self) -> str:
        """The call chain as people read it: ``train.py:30 <- train.py:55`` (file names only,
        the innermost ``SHOWN_FRAMES``: a trainer's own loop below the user's code goes on)."""
        shown = [re.split(r"[\\/]", x)[-1] for x in self.site[:SHOWN_FRAMES]]
        return " <- ".join(shown + ["..."] * (len(self.site) > SHOWN_FRAMES))


_EVAL_NAME = re.compile(r"(val|valid|validation|eval|test|dev)[_/ .-]*(loss|mse|rmse|error)|^(val|eval)$", re.I)


def quantity(fn: Callable[..., T]) -> Callable[..., T]:
    """Makes ``fn(ctx, *args)`` a cached quantity of the run (one value per context and
    arguments). The arguments must be hashable."""
    key = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def get(ctx: "RunContext", *args: Any) -> T:
        return ctx.cached((key, args), lambda: fn(ctx, *args))

    get.quantity_key = key  # type: ignore[attr-defined]
    return get


class attribute:  # noqa: N801 - used like ``property``
    """A quantity exposed as a context attribute (``ctx.loss``), through the same cache."""

    def __init__(self, fn: Callable[["RunContext"], Any]) -> None:
        self.fn = fn
        self.key = f"{fn.__module__}.RunContext.{fn.__name__}"
        self.__doc__ = fn.__doc__

    def __get__(self, ctx: "RunContext | None", owner: type) -> Any:
        if ctx is None:
            return self
        return ctx.cached((self.key, ()), lambda: self.fn(ctx))


class RunContext:
    """A RunLog plus its derived quantities. ``log`` is never modified."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.meta = log.meta
        self.steps = log.steps
        self.signals = available_signals(log)
        self.n = len(log.steps)
        self.kind = log.source.get("kind", "gradprobe")
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, make: Callable[[], T]) -> T:
        """The value under ``key``, made once (the one cache of the analysis)."""
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = make()
            return value

    # ---- per-step series ----------------------------------------------------------------
    @attribute
    def step(self) -> np.ndarray:
        return self.steps["step"].to_numpy(dtype=np.int64)

    @attribute
    def loss(self) -> np.ndarray:
        """Training loss per step: the backward roots, else loss-function values."""
        loss = self.steps["loss"].to_numpy(dtype=np.float64).copy()
        lfn = self.steps["loss_fn"].to_numpy(dtype=np.float64)
        fill = np.isnan(loss) & ~self.steps["loss_nonfinite"].to_numpy() & ~np.isnan(lfn)
        loss[fill] = lfn[fill]
        return loss

    @attribute
    def grad_norm(self) -> np.ndarray:
        """Total gradient norm after the last backward of the step, before clipping."""
        return self.steps["grad_norm"].to_numpy(dtype=np.float64)

    @attribute
    def step_grad_norm(self) -> np.ndarray:
        """Total gradient norm the optimizer stepped with (after clipping)."""
        return self.steps["step_grad_norm"].to_numpy(dtype=np.float64)

    @attribute
    def lr(self) -> np.ndarray:
        return self.steps["lr"].to_numpy(dtype=np.float64)

    @attribute
    def skipped(self) -> np.ndarray:
        """A GradScaler skipped the step (inf/NaN gradients)."""
        return self.steps["skipped"].to_numpy(dtype=bool)

    def col(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        """A raw column of the step table (not cached: a cheap view)."""
        return self.steps[name].to_numpy(dtype=dtype)

    def step_at(self, i: int) -> int:
        return int(self.step[i])

    def row_of(self, step: int) -> int:
        """The row of the first record at or after ``step`` (clipped to the last row)."""
        return int(min(max(int(np.searchsorted(self.step, step)), 0), max(self.n - 1, 0)))

    def first_step_where(self, mask: np.ndarray) -> int | None:
        idx = np.flatnonzero(mask)
        return int(self.step[idx[0]]) if idx.size else None

    # ---- optimizer ------------------------------------------------------------------------
    @attribute
    def optimizer(self) -> dict[str, Any] | None:
        opts = self.meta.get("optimizers") or []
        return opts[0] if opts else None

    @attribute
    def optimizer_class(self) -> str | None:
        return self.optimizer.get("class") if self.optimizer else None

    @attribute
    def hparams(self) -> dict[str, Any]:
        """The first parameter group's hyperparameters (shared: do not modify)."""
        if not self.optimizer:
            return {}
        groups = self.optimizer.get("param_groups") or [{}]
        return dict(groups[0])

    @attribute
    def adaptive(self) -> bool | None:
        """True for Adam-like optimizers, False for SGD-like, None if unknown."""
        c = self.optimizer_class
        if c is None:
            return None
        return c in ADAPTIVE_OPTIMIZERS or "adam" in c.lower()

    @attribute
    def lr0(self) -> float | None:
        """The learning rate the run started with."""
        finite = self.lr[np.isfinite(self.lr)]
        if finite.size:
            return float(finite[0])
        v = self.hparams.get("lr")
        return float(v) if isinstance(v, (int, float)) else None

    # ---- clipping -------------------------------------------------------------------------
    @attribute
    def clip_mask(self) -> np.ndarray:
        """Rows where a clip call was observed."""
        return self.steps["clip_calls"].to_numpy() > 0

    @attribute
    def max_norm(self) -> float | None:
        """The clip threshold in force (median over clipped steps), None if never clipped."""
        m = self.steps["clip_max_norm"].to_numpy(dtype=np.float64)
        m = m[np.isfinite(m)]
        return float(np.median(m)) if m.size else None

    # ---- AMP ------------------------------------------------------------------------------
    @attribute
    def scaler(self) -> dict[str, Any] | None:
        """The first enabled GradScaler's configuration."""
        for s in self.meta.get("scalers") or []:
            if s.get("enabled", True):
                return s
        return None

    @attribute
    def scale(self) -> np.ndarray:
        return self.steps["scale"].to_numpy(dtype=np.float64)

    @attribute
    def amp_dtype(self) -> str | None:
        """The autocast dtype in force in most modules (None: autocast never on)."""
        dtypes = [v.get("dtype") for v in (self.meta.get("autocast") or {}).values() if v.get("enabled")]
        if not dtypes:
            return None
        return max(set(dtypes), key=dtypes.count)

    # ---- model ----------------------------------------------------------------------------
    @attribute
    def recurrent(self) -> list[dict[str, Any]]:
        """Watched recurrent modules (module, hidden_size, lookback)."""
        return list(self.meta.get("recurrent") or [])

    @attribute
    def layer_info(self) -> dict[str, dict[str, Any]]:
        """Parameter name -> its metadata (shape, numel, module)."""
        out: dict[str, dict[str, Any]] = {}
        for seg in self.meta.get("layer_segments") or []:
            for layer in seg.get("layers", []):
                out[str(layer.get("name"))] = layer
        return out

    # ---- samples, scalars, events ---------------------------------------------------------
    def samples(self, probe: str, stat: str | None = None) -> pd.DataFrame:
        return self.log.samples_of(probe, stat)

    @attribute
    def eval_streams(self) -> list[EvalStream]:
        """The no-grad loss streams, one per call site of the loss (the recorder's
        ``eval_streams``: stream 0 is the ``eval_loss`` column with any evaluation after the last
        step, stream k the scalar ``eval_loss/<k>``); a log that does not list streams (a foreign
        log, a log from an earlier recorder) has at most one, its ``eval_loss`` column. Streams
        without a value are left out."""
        entries = self.meta.get("eval_streams")
        col = self.steps["eval_loss"].to_numpy(dtype=np.float64)
        mask = ~np.isnan(col)
        column = pd.Series(col[mask], index=self.step[mask], dtype=np.float64)
        if not entries:
            return [EvalStream("eval_loss", (), column)] if len(column) else []
        out = []
        for entry in entries:
            name = entry.get("name")
            if not isinstance(name, str):
                continue
            series = self.log.scalar(name).astype(np.float64)
            if name == eval_stream_name(0):
                # an evaluation after the last step was written (a scalar) is the stream's latest value
                series = pd.concat([column[~column.index.isin(series.index)], series]).sort_index()
            if len(series):
                out.append(EvalStream(name, tuple(entry.get("site") or ()), series))
        return out

    @attribute
    def validation_stream(self) -> EvalStream | None:
        """The no-grad loss stream that describes the held-out data: among the streams with at
        least ``MIN_STREAM_RECORDS`` evaluations (all, where none has), the one that ends
        farthest above the training loss (the median, over its second half, of each evaluation
        minus the training loss of its step). A stream computed on the training data follows
        the training loss; held-out data ends above it. A stream with a non-finite evaluation
        comes first: that is what must be seen of it. None without a stream."""
        streams = self.eval_streams
        if len(streams) <= 1:
            return streams[0] if streams else None
        many = [s for s in streams if len(s.series) >= MIN_STREAM_RECORDS] or streams
        loss = self.loss
        fin = np.isfinite(loss)
        train_steps, train = self.step[fin], loss[fin]

        def above(s: EvalStream) -> float:
            v = s.series.to_numpy(dtype=np.float64)
            if not np.isfinite(v).all():
                return math.inf
            half = v[len(v) // 2:]
            if not train.size:
                return float(np.median(half))
            at = np.clip(np.searchsorted(train_steps, s.series.index.to_numpy(dtype=np.int64), side="right") - 1,
                         0, train.size - 1)
            return float(np.median(half - train[at][len(v) // 2:]))

        return max(many, key=above)  # the first of equals: max keeps the earliest

    @attribute
    def eval_loss(self) -> pd.Series:
        """Validation loss by step: ``probe.log(val_loss=...)``-style scalars, else the
        recorder's :attr:`validation_stream` (the eval loss functions seen without grad), else a
        foreign log's eval_loss."""
        sc = self.log.scalars
        if not sc.empty:
            streams = {e.get("name") for e in self.meta.get("eval_streams") or () if isinstance(e, dict)}
            counts = sc["name"].astype(str).value_counts()
            names = [n for n in counts.index if _EVAL_NAME.search(n) and n not in streams]
            if names:
                # the series with the most evaluations describes the run (a recorder that did not
                # list its streams added a one-record "eval_loss" for an evaluation after the last
                # step), then losses
                names.sort(key=lambda n: (-int(counts[n]), 0 if "loss" in n.lower() else 1, n))
                s = self.log.scalar(names[0])
                return s.astype(np.float64)
        vs = self.validation_stream
        return vs.series if vs is not None else pd.Series([], dtype=np.float64)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return self.log.events_of(kind)
