"""Pure numerical helpers over series (no run context): levels, trends, confidence scales.

One definition each of what the rules mean by a running level, a rise, a trend ("grows"),
a smoothing window and a log-scale confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Steps in the trailing window that defines the running level of a per-step series.
RUNNING_WINDOW = 20
#: A value this many times its running median (the 20 finite values before it) has risen:
#: batch-to-batch noise of a loss or a gradient norm does not reach 3x; a divergence does.
RISE_FACTOR = 3.0


def finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def percentile(x: np.ndarray, q: float) -> float | None:
    f = finite(x)
    return float(np.percentile(f, q)) if f.size else None


def nice(x: float, digits: int = 2) -> float:
    """Rounds to ``digits`` significant digits (recommendations are read by people)."""
    if x == 0 or not math.isfinite(x):
        return x
    r = float(f"{x:.{digits}g}")
    return r if math.isfinite(r) else x  # rounding up past the largest double would be Inf


def log_ratio_confidence(value: float, threshold: float, decades_to_certain: float = 1.0) -> float:
    """Confidence from how far ``value`` is past ``threshold`` on a log scale: 0.5 at the
    threshold, rising linearly to 1.0 at ``decades_to_certain`` decades past it."""
    if value <= 0 or threshold <= 0 or not math.isfinite(value):
        return 1.0 if value == math.inf else 0.5
    past = math.log10(value / threshold) / decades_to_certain
    return float(min(1.0, max(0.0, 0.5 + 0.5 * past)))


def count_confidence(count: int, base: float, needed: int) -> float:
    """``base`` for one occurrence, rising linearly to 1.0 at ``needed`` occurrences: a
    measurement that is exact, where the question is only whether it is a pattern."""
    return float(min(1.0, base + (1.0 - base) * min(1.0, count / max(needed, 1))))


def smoothing_window(n: int) -> int:
    """Records per smoothing window for a series of ``n`` records: ``n // 20`` clamped to
    [5, 50]. Five is the fewest records whose median ignores two outliers; 20 windows across a
    run keep its shape; 50 caps the lag on long runs."""
    return int(min(50, max(5, n // 20)))


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


def too_early_to_rise(x: np.ndarray, i0: int) -> bool:
    """1 or 2 finite values before row ``i0``: too early for :func:`risen_before` to judge (a
    run that went non-finite right after its first updates, where only a cause present from
    the start can drive it). With none, the untrained model's own forward made it."""
    return 1 <= int(np.isfinite(x[:i0]).sum()) < 3


def trailing_level(x: np.ndarray, window: int = RUNNING_WINDOW) -> np.ndarray:
    """Median of the previous ``window`` finite values (the current one excluded); NaN where
    there is none. One earlier value suffices, so a jump at step 1 is measured against step 0."""
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


@dataclass(frozen=True)
class Trend:
    """How a per-step series moves over the run: THE definition of "grows" the rules share
    (each rule applies its own thresholds to these numbers, and says why in its docstring).

    Attributes:
        n: finite values used.
        spearman: rank correlation with position (1.0: strictly increasing); NaN below 4 values.
        first_quarter, last_quarter: medians of the first and last quarter of the values.
        late_over_early: ``last_quarter / first_quarter`` (NaN when not computable).
        change: ``last_quarter - first_quarter``.
        quarters: the four quarters' medians (empty below 4 values).
        steady: every quarter's median is at least 1/8 of the growth from the first to the
            last quarter above the previous one (still rising in every quarter: a cache that
            fills once plateaus instead).
    """

    n: int
    spearman: float
    first_quarter: float
    last_quarter: float
    late_over_early: float
    change: float
    quarters: tuple[float, ...]
    steady: bool

    def rises(self, min_spearman: float, min_factor: float) -> bool:
        """Rank correlation at least ``min_spearman`` and last quarter at least
        ``min_factor`` times the first."""
        return bool(self.spearman >= min_spearman and self.late_over_early >= min_factor)


def trend(values: np.ndarray, positions: np.ndarray | None = None) -> Trend:
    """The :class:`Trend` of a series (non-finite values ignored)."""
    v = np.asarray(values, dtype=np.float64)
    pos = np.arange(v.size, dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    ok = np.isfinite(v) & np.isfinite(pos)
    v, pos = v[ok], pos[ok]
    if v.size < 4:
        return Trend(int(v.size), math.nan, math.nan, math.nan, math.nan, math.nan, (), False)
    q = max(1, v.size // 4)
    early, late = float(np.median(v[:q])), float(np.median(v[-q:]))
    quarters = tuple(float(np.median(c)) for c in np.array_split(v, 4))
    change = late - early
    grown = quarters[-1] - quarters[0]
    steady = grown > 0 and all(b - a >= grown / 8 for a, b in zip(quarters, quarters[1:]))
    return Trend(n=int(v.size), spearman=rank_correlation(pos, v), first_quarter=early, last_quarter=late,
                 late_over_early=late / early if early > 0 else math.nan, change=change, quarters=quarters,
                 steady=bool(steady))
