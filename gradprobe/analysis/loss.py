"""The loss as the rules read it: one curve, its levels, where it started, its spikes, and the
harm a run's loss shows.

``LossCurve`` is THE definition of where a loss started (:attr:`LossCurve.start`), whether it
fell or rose beyond noise, and its smoothing window; :func:`loss_harm` is THE definition of a
loss hurt by training (non-finite, diverged, regressed, spiked); :func:`healthy_end` is where
the healthy part of a run ends (recommendations are computed only before it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.analysis.context import RunContext, quantity
from gradprobe.analysis.nonfinite import nonfinite_timeline
from gradprobe.analysis.numeric import smoothing_window
from gradprobe.analysis.steps import layer_grads, warmup_rows


#: A loss negative on at least this fraction of its records is not a fit measure bounded by 0.
SIGNED_FRACTION = 0.10


class LossCurve:
    """A loss series (training or validation) as levels that mini-batch noise does not move.

    Attributes:
        steps, values: the finite records in order (``values`` as float64).
        n: finite records.
        per_step: every record is one optimizer step's own loss (a gradprobe log, a foreign
            log that logged every step, or one that sampled single steps' losses every few
            steps); False when a record averages many steps (Hugging Face ``logging_steps``,
            an epoch's mean, one validation pass).
        window: :func:`~gradprobe.analysis.numeric.smoothing_window` of ``n``.
        smooth: centred rolling median over ``window`` (post hoc, so non-causal).
        first_window, final: medians of the first and last ``window`` records.
        noise: spread of the records about ``smooth`` (1.4826 x median absolute residual, the
            standard deviation for Gaussian noise).
        start: where the loss started, judged on levels that mini-batch noise does not
            decide: the first window's median, or the first record (the untrained model) when
            it lies more than 5 noise units away from that median. A window median scatters
            by ~1.25 x noise / sqrt(window), a single record by the noise itself, and
            per-batch losses are skewed to the right (a mean of squared errors or log-losses:
            a hard batch reaches 3-4 noise units far more often than Gaussian noise would):
            one easy or hard first batch must not move the start, while a loss that falls
            fast (the first record far above the window) or blows up in its first steps (far
            below it) is measured from where it was.
        best, best_index: the lowest smoothed level and its record index.
        nonfinite_step: first step whose loss was NaN/Inf (None: never).
        signed: at least ``SIGNED_FRACTION`` of the records are negative: the loss is not a
            measure of fit bounded below by 0 (a policy-gradient surrogate centred on 0, a
            critic's estimate, a Gaussian NLL of sharp densities). Its levels have no "start",
            "progress" or "times its level" to judge by: the rules that compare levels skip it.
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
            self.first_window = float(np.median(self.values[:w]))
            self.final = float(np.median(self.values[-w:]))
            self.best_index = int(np.argmin(self.smooth))
            self.best = float(self.smooth[self.best_index])
            self.noise = float(1.4826 * np.median(np.abs(self.values - self.smooth)))
            self.signed = bool((self.values < 0).mean() >= SIGNED_FRACTION)
            first = float(self.values[0])
            self.start_is_first_record = abs(first - self.first_window) > 5.0 * self.noise
            self.start = first if self.start_is_first_record else self.first_window
        else:
            self.smooth = np.zeros(0)
            self.first_window = self.start = self.final = self.best = self.noise = math.nan
            self.start_is_first_record = False
            self.signed = False
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
    def median_se(self) -> float:
        """Standard error of the median of one smoothing window: 1.25 x noise / sqrt(window),
        for Gaussian noise."""
        return 1.25 * self.noise / math.sqrt(max(self.window, 1))

    @property
    def significance(self) -> float:
        """Smallest difference between two levels of this curve that noise does not explain:
        3 standard errors of a window median (:attr:`median_se`), and at least 10% of the
        start."""
        return max(3.0 * self.median_se, 0.10 * abs(self.start))

    @property
    def fell(self) -> bool:
        """The loss ended below :attr:`start` by more than :attr:`significance` (and by 5
        noise units when the start is the single first record): progress noise does not
        explain."""
        return self.n >= 2 and bool(self.start - self.final >= self._change_significance())

    @property
    def rose(self) -> bool:
        """The loss ended above :attr:`start` by more than :attr:`significance` (and by 5
        noise units when the start is the single first record)."""
        return self.n >= 2 and bool(self.final - self.start >= self._change_significance())

    def _change_significance(self) -> float:
        sig = self.significance
        return max(sig, 5.0 * self.noise) if self.start_is_first_record else sig


def _per_step_records(steps: np.ndarray) -> bool:
    if steps.size < 2:
        return True
    return float(np.median(np.diff(steps))) <= 1.0


@quantity
def loss_curve(ctx: RunContext) -> LossCurve:
    """The training loss (:attr:`RunContext.loss`) as a :class:`LossCurve`."""
    nonfinite = (ctx.col("loss_nonfinite", bool) | ctx.col("loss_fn_nonfinite", bool)) if ctx.n else np.zeros(0, bool)
    fin = np.isfinite(ctx.loss)
    # a saved log whose reader says each record is one step's loss, sampled every few steps
    # (meta "loss_records"), is read like one that logged every step
    per_step = ctx.kind == "gradprobe" or _per_step_records(ctx.step[fin]) or ctx.meta.get("loss_records") == "step"
    return LossCurve(ctx.step, ctx.loss, per_step=per_step, nonfinite=nonfinite)


def _eval_series_curve(ev: pd.Series | None) -> LossCurve | None:
    if ev is None or len(ev) == 0:
        return None
    ev = ev.sort_index()
    steps = ev.index.to_numpy(dtype=np.int64)
    return LossCurve(steps, ev.to_numpy(dtype=np.float64), per_step=_per_step_records(steps) and len(ev) > 1)


@quantity
def eval_curve(ctx: RunContext) -> LossCurve | None:
    """The validation loss (:attr:`RunContext.eval_loss`) as a :class:`LossCurve`; None
    without one. A record averages a whole validation pass (``per_step`` False), unless the
    records come every step (a no-grad loss computed on each training batch, e.g. for
    logging): those are single batches, as noisy as the training loss."""
    return _eval_series_curve(ctx.eval_loss)


@quantity
def eval_curves(ctx: RunContext) -> list[tuple[str, LossCurve]]:
    """Every validation-loss curve of the run, each with where it was computed (the call
    chain, :attr:`~gradprobe.analysis.context.EvalStream.where`; "" where the log does not
    say): :func:`eval_curve` first, then each other no-grad loss stream the recorder kept (one
    per call site of the loss: a script that evaluates the training set and the validation set
    from two lines has two). A rule that asks whether *any* evaluation shows something reads
    these; a stream computed on the training data follows the training loss."""
    out: list[tuple[str, LossCurve]] = []
    primary = eval_curve(ctx)
    vs = ctx.validation_stream
    # ctx.eval_loss is the stream's own series (one cache) unless a logged val_loss came first
    user = vs is None or ctx.eval_loss is not vs.series
    if primary is not None:
        out.append(("" if user or vs is None else vs.where, primary))
    if not ctx.meta.get("eval_streams"):
        return out  # a log that does not keep streams apart: its one eval loss, as it always was
    for s in ctx.eval_streams:
        if s is vs and not user:
            continue
        c = _eval_series_curve(s.series)
        if c is not None:
            out.append((s.where, c))
    return out


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
#: A spike is sudden: the loss goes from within ``SUDDEN_FRACTION`` of the jump above its level
#: to half-way up to the peak in at most ``SUDDEN_RECORDS`` records. A bad batch or an exploded update changes
#: the loss from one step to the next (momentum carries it a step or two further); a loss that
#: climbs record by record (a cyclic input, a schedule, a slow divergence) is a drift, judged
#: by the rules that read drifts.
SUDDEN_FRACTION = 0.1
SUDDEN_RECORDS = 3
#: A spike must undo at least this fraction of the progress the loss had made (its start
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


def find_loss_spikes(curve: LossCurve | None) -> list[LossSpike]:
    """Spike events of a loss curve: see :func:`_find_loss_spikes` (a signed curve has none:
    "times its level" means nothing for a loss centred on 0)."""
    if curve is None or curve.signed:
        return []
    return _find_loss_spikes(curve)


def _find_loss_spikes(curve: LossCurve | None) -> list[LossSpike]:
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
    median level up with it). A spike is sudden (``SUDDEN_RECORDS``): the loss goes from near
    its level to half-way up to the peak within 3 records; a loss that climbs record by record
    is a drift. The
    spike goes on while the following
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
                    & (jump >= LOSS_SPIKE_MATERIAL * np.maximum(curve.start - lvl, 0.0)))

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
        nxt = j + 1
        if i > 0 and np.isfinite(level[i]):
            jump = float(v[i:j + 1].max()) - level[i]
            p = i + int(np.flatnonzero(v[i:j + 1] >= level[i] + 0.5 * jump)[0])  # half-way up
            low = np.flatnonzero(v[:p] <= level[i] + SUDDEN_FRACTION * jump)
            if low.size and p - int(low[-1]) > SUDDEN_RECORDS:
                continue  # the loss climbed there record by record: a drift (a cycle, a schedule), not a jump
        found.append(LossSpike(curve, i, j, level[i], float(sigma[i])))
    if not curve.per_step:
        return found
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
    return out


def material_rise(curve: LossCurve, before: float, after: float) -> bool:
    """The loss rising from level ``before`` to ``after`` sets the run back: the rise undoes at
    least ``LOSS_SPIKE_MATERIAL`` of the progress the loss had made (its start minus
    ``before``), or the loss had made none. At convergence a loss of 1e-6 that doubles has
    moved by nothing the run can feel; a rise of 5% of what training had bought is felt."""
    if not (np.isfinite(before) and np.isfinite(after)) or after <= before:
        return False
    progress = curve.start - before if curve.n else math.nan
    if not np.isfinite(progress) or progress <= 0:
        return True
    return bool(after - before >= LOSS_SPIKE_MATERIAL * progress)


#: A set-back must also exceed how far the window after a record lies above the running level
#: before it at this quantile of the run's own records before the spike, away from any spike: a loss whose batches
#: span decades (per-sample SGD) moves its window medians by more than their standard error
#: suggests, and one spike among the run's records lands on a high one by chance.
WANDER_QUANTILE = 0.99
#: ... judged only from this many records away from the spikes (fewer: the standard error and
#: the 10% alone decide).
MIN_WANDER_RECORDS = 50


def level_wander(curve: LossCurve, spike: LossSpike, spikes: list[LossSpike]) -> float:
    """``WANDER_QUANTILE`` of (median of the ``window`` records after record i) / (median of
    the ``max(window, 10)`` records before it) - 1, over the records i before ``spike`` whose
    windows touch no spike: how far the run's own level wandered before it (what came after
    may be the damage itself); 0.0 with fewer than ``MIN_WANDER_RECORDS`` of them."""
    v = curve.values
    n = curve.n
    w = max(curve.window, 1)
    lw = max(curve.window, 10)
    if spike.start - w - lw < MIN_WANDER_RECORDS:
        return 0.0
    before = pd.Series(v).rolling(lw).median().shift(1).to_numpy()  # v[i-lw:i]
    after = pd.Series(v[::-1]).rolling(w).median().to_numpy()[::-1]  # v[i:i+w]
    after = np.append(after[1:], np.nan)  # v[i+1:i+1+w]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (after - before) / np.abs(before)  # relative: a loss's scatter scales with its level
    ok = np.isfinite(d)
    ok[max(0, spike.start - w):] = False
    for e in spikes:
        ok[max(0, e.start - w): min(n, e.end + lw + 1)] = False
    if ok.sum() < MIN_WANDER_RECORDS:
        return 0.0
    return float(np.quantile(d[ok], WANDER_QUANTILE))


def set_back(curve: LossCurve, spike: LossSpike, spikes: list[LossSpike] | None = None) -> bool:
    """After the spike the loss settled above where it was before it by more than noise and
    10% of that level: the weights were knocked off course (a hard or corrupt batch lifts its
    own records; damaged weights lift the loss of the batches that follow). Given the run's
    ``spikes``, also by more than the run's own wander of window medians before the spike
    (:func:`level_wander`). Not when the loss was back at its level before the spike (within
    the same bar) within ``REGAIN_WINDOWS`` smoothing windows after the spike: a transient, not
    a set-back (a catapult of a large-lr SGD run lifts the loss for a few dozen steps and
    returns it to its level; the run lost those steps, not its progress)."""
    after = curve.level_after(spike.end)
    if not np.isfinite(after):
        return not spike.recovered
    bar = _set_back_bar(curve, spike, spikes)
    return bool(after - spike.level > bar) and not _regained(curve, spike)


def transient(curve: LossCurve, spike: LossSpike, spikes: list[LossSpike] | None = None) -> bool:
    """After the spike the loss settled above its level (as :func:`set_back` has it) but was
    back there within ``REGAIN_WINDOWS`` smoothing windows."""
    after = curve.level_after(spike.end)
    if not np.isfinite(after):
        return False
    bar = _set_back_bar(curve, spike, spikes)
    return bool(after - spike.level > bar) and _regained(curve, spike)


def _set_back_bar(curve: LossCurve, spike: LossSpike, spikes: list[LossSpike] | None) -> float:
    bar = max(3.0 * curve.median_se, 0.10 * abs(spike.level))
    if spikes is not None:
        bar = max(bar, level_wander(curve, spike, spikes) * abs(spike.level))
    return bar


def _regained(curve: LossCurve, spike: LossSpike) -> bool:
    """A window after the first one after the spike (the next ``REGAIN_WINDOWS`` - 1, each a
    median of one smoothing window) is back at the level before it: within 10% of the level
    and one standard error of a window median. Strict on purpose (not the set-back's bar of
    3 standard errors or the run's wander, which a loss of a heavy tail meets by scatter
    alone): a window that only might be back leaves the set-back standing."""
    w = max(curve.window, 1)
    near = 0.10 * abs(spike.level) + curve.median_se
    levels = [curve.level_after(spike.end + k * w) for k in range(1, REGAIN_WINDOWS)]
    return any(np.isfinite(v) and v - spike.level <= near for v in levels)


#: A loss back at its level before a spike within this many smoothing windows after it was
#: lifted for a transient (a catapult), not set back.
REGAIN_WINDOWS = 3
#: Records of lr the lr of the step before a jump is compared with.
RUNNING_LR_RECORDS = 20
#: A step before a jump was ordinary when its pre-clip gradient norm stayed within this factor
#: of its running level (batch-to-batch scatter reaches 2-3x) and its lr within it of the
#: lr's median over the records before: one such update cannot lift the loss several-fold.
ORDINARY_STEP = 3.0
#: ... and the total weight norm, where recorded, changed by less than this fraction from the
#: step before to the jump's step (an ordinary update moves it by ~1e-3; weights rescaled or
#: reloaded by the script between steps move it by far more).
WEIGHTS_MOVED = 0.1
#: ... and the data got harder (rather than the weights worse) when the batches right after
#: the jump's first record stay within this factor below it (scatter between batches of one
#: kind stays within 1.5x: ``LOSS_HARM_FACTOR`` of GP202).
NOT_LIFTED = 1.5


def harder_data(ctx: RunContext, curve: LossCurve, spike: LossSpike) -> bool:
    """The jump came with the data, not from the weights: the step before its first record was
    ordinary (:data:`ORDINARY_STEP`: its gradient norm at its running level, its lr unchanged),
    so the weights that computed that record were those of an ordinary update (and, where the
    weight norm is recorded, it moved by less than :data:`WEIGHTS_MOVED` into that step: no
    weights rescaled or reloaded between steps); the batches
    right after it (``SUDDEN_RECORDS``) do not fall below 1 / :data:`NOT_LIFTED` of it (the new
    data is uniformly harder; one corrupt batch far above the batches after it is not, and what
    then stays up is the damage its update did); and after the spike the loss settled no
    higher than that first record (the run lost no ground on the new data: what it sits
    above is the old data's level). New classes joining a stream, a curriculum stage, a new
    dataset. False where the log has no gradient norms to tell, and for a step before the jump
    inside the warm-up (:func:`~gradprobe.analysis.steps.warmup_rows`): while the weights
    leave their initialisation no step is ordinary yet (the first oversized updates overshoot
    with gradients at their level; the lr's harm, GP501)."""
    from gradprobe.analysis.gradients import grad_spikes

    first = float(curve.values[spike.start])
    if spike.start == 0 or not curve.level_after(spike.end) <= first:
        return False
    nxt = curve.values[spike.start + 1: spike.start + 1 + SUDDEN_RECORDS]
    if not nxt.size or float(np.median(nxt)) < first / NOT_LIFTED:
        return False  # one bad batch far above the batches after it: what stayed up is the weights
    row = ctx.row_of(int(curve.steps[spike.start - 1]))
    if int(ctx.step[row]) != int(curve.steps[spike.start - 1]) or row < warmup_rows(ctx):
        return False
    sp = grad_spikes(ctx)
    ratio = sp.ratio[row] if row < sp.ratio.size else math.nan
    if not np.isfinite(ratio) or ratio > ORDINARY_STEP:
        return False
    lr = ctx.lr
    before = lr[max(0, row - RUNNING_LR_RECORDS): row]
    before = before[np.isfinite(before) & (before > 0)]
    if np.isfinite(lr[row]) and before.size and lr[row] > ORDINARY_STEP * float(np.median(before)):
        return False
    jump_row = ctx.row_of(int(curve.steps[spike.start]))
    if "weight_norm" in ctx.steps.columns:
        wn = ctx.col("weight_norm")
        a, b = float(wn[row]), float(wn[jump_row])
        if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0 and abs(math.log(b / a)) > math.log1p(WEIGHTS_MOVED):
            return False  # the weights changed by more than updates change them: not the data
    return True


@quantity
def new_parameter_steps(ctx: RunContext) -> list[int]:
    """Steps at which parameters the run had not trained before started getting gradients,
    observed by effect (the first step with a recorded gradient norm of a layer that had none
    while other layers had): a new head swapped in for fine-tuning, a layer grown into the
    model, a second model's optimizer taking over. Also a layer segment after the first that
    names a parameter no earlier segment had."""
    out: set[int] = set()
    seen: set[str] = set()
    for i, seg in enumerate(ctx.meta.get("layer_segments") or []):
        names = {str(layer.get("name")) for layer in seg.get("layers", [])}
        if i and names - seen and seg.get("first_step") is not None:
            out.add(int(seg["first_step"]))
        seen |= names
    lg = layer_grads(ctx)
    if not lg.empty:
        has = lg.notna().to_numpy()
        rows = has.any(axis=0)
        first = np.where(rows, has.argmax(axis=0), -1)
        start = int(first[rows].min()) if rows.any() else 0
        out |= {int(lg.index[k]) for k in first[rows] if k > start}
    return sorted(out)


@quantity
def loss_spikes(ctx: RunContext) -> list[LossSpike]:
    """Spike events of the training loss (:func:`find_loss_spikes` of :func:`loss_curve`),
    but for a jump whose first record is the step at which new parameters joined the run
    (:func:`new_parameter_steps`): that loss was computed before any update could knock
    anything off course, by a model with freshly initialised parts (a new head gives the loss
    of an untrained model). It is a new phase of training, not a spike."""
    curve = loss_curve(ctx)
    found = find_loss_spikes(curve)
    joins = {curve.index_at(s) for s in new_parameter_steps(ctx)}
    return [e for e in found if e.start not in joins]


@quantity
def eval_loss_spikes(ctx: RunContext) -> list[LossSpike]:
    """Spike events of the validation loss (empty without one)."""
    return find_loss_spikes(eval_curve(ctx))


@quantity
def loss_harm(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Evidence in the training loss that the run is being hurt (THE definition of harm).

    Keys present when found, each with ``step`` (onset) and ``strength`` in [0, 1]:
    ``nonfinite`` (the parameters went NaN/Inf, or the loss did and never came back, after a
    finite start and not after non-finite data),
    ``diverged`` (the final level is above the start by more than noise and 10%),
    ``regressed`` (after making progress the loss gave back at least half of it),
    ``spikes`` (:func:`loss_spikes` events; ``count``, ``unrecovered``), but for a spike
    whose data got harder (:func:`harder_data`: the step before its first record was an
    ordinary update, the batches after it as high, and the loss settled no higher than that
    first record): the weights that computed it were those of an ordinary step, so no
    update, of any size, did it.
    """
    out: dict[str, dict[str, Any]] = {}
    curve = loss_curve(ctx)
    curve_ok = not curve.signed  # a loss centred on 0 shows no harm in its levels
    first_finite = int(curve.steps[0]) if curve.n else None
    bad_steps = []
    nf = curve.nonfinite_step
    # a NaN loss counts when it lasts (no finite loss after it): one bad batch that the loop
    # skipped, after which training went on, is not the optimizer's doing
    if nf is not None and first_finite is not None and nf > first_finite and not (curve.steps > nf).any():
        bad_steps.append(nf)
    if ctx.n:
        pnf = ctx.col("param_nonfinite_layers") > 0
        st = ctx.first_step_where(pnf)
        if st is not None and (first_finite is None or st >= first_finite):
            bad_steps.append(st)
    data_nan = nonfinite_timeline(ctx).input_step
    bad_steps = [b for b in bad_steps if data_nan is None or b < data_nan]  # NaN data is not the optimizer's
    if bad_steps:
        out["nonfinite"] = {"step": int(min(bad_steps)), "strength": 1.0}
    if curve.n >= 10 and curve_ok:
        sig = curve.significance
        if curve.rose:
            above = np.flatnonzero(curve.smooth > curve.start + sig)
            onset = int(curve.steps[above[0]]) if above.size else int(curve.steps[-1])
            out["diverged"] = {"step": onset, "strength": 1.0, "start": curve.start, "final": curve.final}
        gain = curve.start - curve.best
        if (gain >= sig and gain > 0 and curve.final - curve.best >= max(0.5 * gain, sig)
                and curve.best_index < curve.n - curve.window):
            out["regressed"] = {"step": int(curve.steps[curve.best_index]), "strength": 0.8, "best": curve.best,
                                "final": curve.final, "given_back": (curve.final - curve.best) / gain}
    spikes = [e for e in loss_spikes(ctx) if not harder_data(ctx, curve, e)] if curve_ok else []
    if spikes:
        unrec = [e for e in spikes if not e.recovered]
        out["spikes"] = {"step": spikes[0].step, "strength": 0.9 if unrec else 0.7, "count": len(spikes),
                         "unrecovered": len(unrec), "max_factor": max(e.factor for e in spikes),
                         "events": [e.to_json() for e in spikes[:5]], "last_end_step": spikes[-1].end_step,
                         "all_recovered": not unrec}
    return out


@quantity
def healthy_end(ctx: RunContext) -> int | None:
    """The first step at which the run was no longer healthy, None when it stayed healthy:
    the earliest of the first counted non-finite loss, gradient or parameter
    (:class:`~gradprobe.analysis.nonfinite.NonfiniteTimeline`; steps a GradScaler skipped on
    purpose do not count), the first spike of the training loss that never recovered, and the
    onset of a divergence (the smoothed loss above its start by more than noise and 10%).

    Recommendations are computed from the steps before it only: numbers measured on a run
    that was already diverging or non-finite describe the breakdown, not the settings that
    trained (a max_norm taken from exploded norms would be the explosion's size)."""
    tl = nonfinite_timeline(ctx)
    ends = [s for s in (tl.loss_step, tl.grad_step, tl.param_step) if s is not None]
    spikes = loss_spikes(ctx)
    ends += [e.step for e in spikes if not e.recovered]
    curve = loss_curve(ctx)
    if curve.n >= 10 and not curve.signed and curve.rose:
        above = np.flatnonzero(curve.smooth > curve.start + curve.significance)
        if above.size:
            ends.append(int(curve.steps[above[0]]))
    return int(min(ends)) if ends else None


@quantity
def healthy_rows(ctx: RunContext) -> np.ndarray:
    """Row mask of the healthy part of the run: the steps before :func:`healthy_end`."""
    end = healthy_end(ctx)
    if end is None:
        return np.ones(ctx.n, dtype=bool)
    return ctx.step < end


def median_lr(ctx: RunContext, steps: Any) -> float | None:
    """Median finite, positive learning rate over ``steps`` (the run's first lr without any)."""
    lr = ctx.lr
    if not ctx.n:
        return None
    idx = np.searchsorted(ctx.step, np.asarray(list(steps), dtype=np.int64))
    idx = idx[(idx >= 0) & (idx < ctx.n)]
    vals = lr[idx] if idx.size else lr
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if not vals.size:
        return ctx.lr0
    return float(np.median(vals))


def trained_stably_before(ctx: RunContext, step: int) -> bool:
    """The run trained stably at the same learning rate for a long stretch before ``step``:
    ``step`` lies at least 25% of the records and 2 smoothing windows into the run, the loss
    level in the window before it had improved on the start by more than the curve's
    significance, and the lr at ``step`` is no more than 1.5x the median lr over the records
    before it (it did not climb)."""
    curve = loss_curve(ctx)
    k = curve.index_at(step)
    if k >= curve.n or k < max(2 * curve.window, int(0.25 * curve.n)):
        return False
    if not curve.level_before(k) < curve.start - curve.significance:
        return False
    lr = ctx.lr
    idx = np.clip(np.searchsorted(ctx.step, curve.steps[:k]), 0, max(ctx.n - 1, 0))
    before = lr[idx]
    before = before[np.isfinite(before) & (before > 0)]
    i = min(int(np.searchsorted(ctx.step, step)), ctx.n - 1)
    if not before.size or not np.isfinite(lr[i]):
        return True
    return bool(lr[i] <= 1.5 * float(np.median(before)))


def lr_following(ctx: RunContext, onset: int | None) -> dict[str, Any] | None:
    """The harm began as the learning rate climbed: the lr at the onset is at least 1.5x the
    lr the run started with (a warmup or an increase ran before it), and the loss had been
    improving at the lower lr (its level in the window before the onset is below its start).
    Returns ``lr_at_onset``, ``lr_stable`` (the lr one smoothing window before the onset, at
    which the loss was still improving) and ``lr_start``; None otherwise."""
    if onset is None or not ctx.n:
        return None
    lr = ctx.lr
    fin = np.isfinite(lr) & (lr > 0)
    if fin.sum() < 3:
        return None
    i = int(np.searchsorted(ctx.step, onset))
    i = min(max(i, 0), ctx.n - 1)
    first = float(lr[fin][0])
    if not np.isfinite(lr[i]) or lr[i] < 1.5 * first:
        return None
    curve = loss_curve(ctx)
    k = curve.index_at(onset)
    if k < curve.window or not curve.level_before(k) < curve.start:
        return None
    j = max(0, i - curve.window)
    while j > 0 and not np.isfinite(lr[j]):
        j -= 1
    return {"lr_at_onset": float(lr[i]), "lr_stable": float(lr[j]) if np.isfinite(lr[j]) else first,
            "lr_start": first}


def rising_trend(v: np.ndarray) -> float:
    """Kendall's S of ``v`` against its order (pairs rising minus pairs falling), in standard
    deviations of S for values in random order (normal approximation with the continuity
    correction; ties count as neither): large when the values climb, ~0 for a flat noisy band."""
    n = int(v.size)
    if n < 3:
        return 0.0
    d = np.sign(v[None, :] - v[:, None])
    s = float(np.triu(d, 1).sum())
    sd = math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
    return (s - math.copysign(1.0, s)) / sd if s else 0.0


#: The floor of a cross-entropy fed probabilities over K classes, read from the loss alone: its
#: lowest record within 0.1% of ln(e + K - 1) - 1 (a floor cannot be passed, so none lies
#: further below it; a loss averaged over a log's records reaches it to that precision, where
#: a healthy loss's lowest record lands by chance only within the 0.1% bands of the few floors
#: judged) ...
FLOOR_RTOL = 1e-3
#: ... and at least half of the records from the first one within 1% above it on (the loss
#: settles onto the floor and stays, its only excursions upward: a batch with a wrong
#: prediction) ...
FLOOR_BAND = 0.01
FLOOR_HUG = 0.5
#: ... judged for K = 2, 3, ... while the neighbouring floors lie at least 4% (40 x FLOOR_RTOL)
#: away: a lowest record falls within 0.1% of one of them by chance less than 5% of the time
#: (K <= 13; floors of more classes crowd together: 3% apart at K = 14).
FLOOR_SPACING = 0.04


def probability_floor(k: int) -> float:
    """ln(e + K - 1) - 1: the lowest loss ``cross_entropy`` reaches on probabilities over K
    classes (softmax of a one-hot vector puts e / (e + K - 1) on the right class)."""
    return float(np.log(np.e + k - 1) - 1.0)


def on_probability_floor(c: LossCurve, min_fraction: float) -> tuple[int, float, int, float] | None:
    """``(K, floor, index, covered)`` when the loss sits on the floor of a cross-entropy fed
    probabilities over K classes (:data:`FLOOR_RTOL`, :data:`FLOOR_BAND`,
    :data:`FLOOR_HUG`, :data:`FLOOR_SPACING`), from record ``index`` on, over the fraction
    ``covered`` (at least ``min_fraction``) of the steps the run covers; None otherwise (and
    for a signed loss)."""
    if c.n < 2 or c.signed:
        return None
    v = c.values
    low = float(v.min())
    span = float(c.steps[-1] - c.steps[0])
    k = 2
    while True:
        f = probability_floor(k)
        gap = min(probability_floor(k + 1) - f, f - probability_floor(k - 1) if k > 2 else math.inf)
        if gap < FLOOR_SPACING * f:
            return None
        if abs(low - f) <= FLOOR_RTOL * f:
            hug = v <= f * (1.0 + FLOOR_BAND)
            first = int(np.argmax(hug))
            covered = float(c.steps[-1] - c.steps[first]) / span if span > 0 else 0.0
            if float(hug[first:].mean()) >= FLOOR_HUG and covered >= min_fraction:
                return k, f, first, covered
            return None
        k += 1
