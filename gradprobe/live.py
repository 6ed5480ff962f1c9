"""Stopping a doomed run early (``--stop-on``, ``watch(..., stop_on=...)``), with its diagnosis.

Only a *final* finding may stop a run: one its rule declares further training cannot undo
(``Rule.final_when``: parameters that stay NaN, a loss non-finite for a sustained stretch, a
carried graph whose age grows every step...). Two halves:

* **Live checks** (:class:`LiveChecks`), one small incremental check per final rule
  (:data:`LIVE_CHECKS`, keyed by rule code). They read the step columns the recorder already
  hands to its writer thread, on that thread (:meth:`gradprobe.runlog.writer.RunWriter`
  feeds them each batch after writing it): host values only, no device read, nothing on the
  training thread. Each keeps O(1) state and, when the final condition of its rule holds on
  the steps seen so far, sets a flag and the candidate (rule, step).
* **The stop** (:class:`Stopper`), on the training thread at the next step boundary: a bool
  read on the healthy path. When the flag is up, the log is flushed and the full rule engine
  runs once on the log as it stands; the run stops only if the report holds a finding with
  ``final=True`` at or above ``stop_on``, so "only final findings stop a run" holds by
  construction. When the engine does not confirm, training goes on, the disagreement is
  recorded in the run log's metadata (``live_checks.unconfirmed``) and that check asks
  again only on twice the evidence (:meth:`LiveCheck.back_off`).

The stop raises :class:`RunStopped` at the step boundary (outside every guard: it reaches the
user's ``optimizer.step()``/``scaler.update()`` call). It is a ``SystemExit`` with code 3
(:data:`EXIT_STOPPED`): a user's ``except Exception:`` does not swallow it, and a process it
ends exits 3 under any launcher (``gradprobe run``, a torchrun worker, ``mp.spawn``) with
no traceback. The callbacks (Lightning, Hugging Face, Optuna) set ``raise_at_boundary``
False and poll instead, to end their loops gracefully.

The thresholds below mirror the rules' (``tests/test_early_stop.py`` holds them equal); the
live checks add only a minimum of evidence where a rule's final condition can hold on the
first few steps of a run that is not doomed (see each check).
"""

from __future__ import annotations

import abc
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["EXIT_STOPPED", "LIVE_CHECKS", "NOT_LIVE", "STOP_FLUSH_STEPS", "STOP_FLUSH_STEPS_MAX", "STOP_LEVELS", "LiveCheck", "LiveChecks", "RunStopped",
           "StopDecision", "Stopper", "check_stop_on", "total_steps_hint"]

#: ``stop_on`` values: the least severe final finding that stops the run (``never``: none)
STOP_LEVELS = ("error", "warning", "never")
#: the exit status of a process a stop ended: distinct from 0, from 1 (an uncaught exception),
#: 2 (usage) and from the signal statuses (128 + n)
EXIT_STOPPED = 3
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
#: under ``stop_on``, closed steps are handed to the writer (and so to the live checks)
#: besides every ``flush_seconds``, on a step bound: this many at first, then as many as were
#: handed over so far (16, 16, 32, 64, 128...), up to :data:`STOP_FLUSH_STEPS_MAX`. On a fast
#: loop (0.3 ms a step) the time bound alone would leave a fault unseen for ~1600 steps. The
#: doubling start sees a fault of the first steps (a NaN batch, an absurd learning rate: most
#: doomed runs) within tens of steps, also in a run whose whole training lasts a fraction of
#: a second, for ~4 extra hand-overs per run
STOP_FLUSH_STEPS = 16
#: the step bound in steady state: a fault is seen within 256 steps; a hand-over every 16
#: steps would cost a 1 ms step a few per cent (the writer thread holds the GIL meanwhile)
STOP_FLUSH_STEPS_MAX = 256


def check_stop_on(value: Any) -> str:
    """``value`` as a stop level, or ValueError naming the choices."""
    text = "never" if value is None else str(getattr(value, "value", value))
    if text not in STOP_LEVELS:
        raise ValueError(f"stop_on must be one of {', '.join(STOP_LEVELS)}, not {value!r}")
    return text


# ================================================================== the decision ======
@dataclass
class StopDecision:
    """Why and where a run stopped.

    Attributes:
        step: the last step the run completed (the stop came at the boundary after it).
        steps: steps completed (``step + 1`` unless steps were skipped).
        finding: the final :class:`~gradprobe.report.Finding` that stopped it.
        report: the :class:`~gradprobe.report.Report` built at the stop.
        rank: the rank of a distributed run (None: not distributed).
        total_steps: how many steps the script meant to run, when it says (None: unknown).
        steps_left: how many of those it had left (None: unknown).
        total_from: where ``total_steps`` came from (``watch(total_steps=)``, ``OneCycleLR``...).
        trigger: the live check that asked (``{"code", "step"}``).
        wall_time: when it stopped (unix time).
        note: what the framework does with the request (Lightning's ``min_steps``), if any.
    """

    step: int
    steps: int
    finding: Any
    report: Any
    rank: int | None = None
    total_steps: int | None = None
    steps_left: int | None = None
    total_from: str | None = None
    trigger: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    note: str | None = None

    def describe(self) -> str:
        """One line: where it stopped, what stopped it, how much was left."""
        f = self.finding
        who = f" rank {self.rank}" if self.rank is not None else ""
        left = ""
        if self.steps_left is not None and self.total_steps is not None:
            left = f"; {self.steps_left} of {self.total_steps} steps left"
        text = (f"gradprobe stopped the run{who} after step {self.step}: {f.code} {f.rule} ({f.severity}, final: "
                f"further training cannot undo it){left}")
        return text + (f". {self.note}" if self.note else "")

    def to_json(self) -> dict[str, Any]:
        """What the run log (``gradprobe.json`` ``stopped``, the ``stopped`` event) and the
        report (``source.stopped``) keep of it."""
        f = self.finding
        out: dict[str, Any] = {
            "step": int(self.step),
            "steps": int(self.steps),
            "code": f.code,
            "rule": f.rule,
            "severity": f.severity,
            "title": f.title,
            "first_step": f.first_step,
            "rank": self.rank,
            "total_steps": self.total_steps,
            "steps_left": self.steps_left,
            "total_from": self.total_from,
            "trigger": dict(self.trigger),
            "wall_time": self.wall_time,
        }
        if self.note:
            out["note"] = self.note
        return out


class RunStopped(SystemExit):
    """Raised at a step boundary when gradprobe stops a doomed run (``stop_on``).

    A ``SystemExit`` (so a ``BaseException``): ``except Exception:`` in a training loop does
    not swallow it, gradprobe's own guards let it through, and a process it ends exits with
    status 3 (:data:`EXIT_STOPPED`) and no traceback, whatever launched it. Catch it to save a
    checkpoint or move on to the next configuration.

    Attributes:
        decision: the :class:`StopDecision` (step, finding, report, rank, steps left).
        report: the :class:`~gradprobe.report.Report` built at the stop.
        finding: the final finding that stopped the run.
        step: the last step the run completed.
        rank: the rank of a distributed run (None: not distributed).
    """

    def __init__(self, decision: StopDecision) -> None:
        super().__init__(EXIT_STOPPED)
        self.decision = decision
        self.report = decision.report
        self.finding = decision.finding
        self.step = decision.step
        self.rank = decision.rank

    def __str__(self) -> str:
        return self.decision.describe()


# ================================================================ the live checks =====
#: GP401: a loss non-finite through the last this-many steps (and a tenth of the run) has
#: stopped training (``rules.nonfinite.SUSTAINED_NONFINITE``)
SUSTAINED_NONFINITE = 20
SUSTAINED_FRACTION = 0.1
#: GP403: measured steps in a row, from the first one, whose parameters stayed non-finite
#: before the check asks. The rule calls non-finite weights final when they never recovered;
#: a loop that reloads a checkpoint on a NaN loss repairs them at the next step, so one step
#: is no evidence yet, three in a row are (nothing in the loop repairs them).
LIVE_PARAM_STEPS = 3
#: GP101: the state's age grows every step when the age at the last aged step is >= 80% of
#: the steps elapsed since the first (``rules.recurrent``). That also holds on the first
#: steps of a state detached every k steps (age 1, 2, ..., k), so the check asks only once
#: the graph reaches this many steps back: a backward then walks 32 steps of graphs (33x a
#: healthy step's work), past any plausible detach interval counted in optimizer steps.
AGE_UNBOUNDED_FRACTION = 0.8
LIVE_MIN_AGE = 32
#: GP103: graphs of earlier steps alive reach 8 and rose on at least half of the steps
#: (``rules.recurrent.GRAPHS_ALIVE``, ``GRAPHS_RISING``)
GRAPHS_ALIVE = 8
GRAPHS_RISING = 0.5
#: GP302: not one scaled step succeeded, at least 8 were skipped and the scale fell 8+
#: halvings below float16's range, 2**16 (``analysis.amp.LONG_BURST_HALVINGS``, ``FP16_MAX_SCALE``)
LONG_BURST_HALVINGS = 8
FP16_MAX_SCALE = 2.0**16
#: GP305: the last this-many scaled steps were overflows discarded without update() at a
#: scale that never moved (``rules.scaler_misuse.FINAL_DISCARDED_TAIL``)
FINAL_DISCARDED_TAIL = 3


class Batch:
    """One writer batch of step columns as numpy arrays, built once for every check.

    numpy is imported where it is used in this module, not at its top: ``gradprobe run``
    imports it (for :class:`RunStopped`) before the script, which must start light."""

    def __init__(self, cols: dict[str, Any]) -> None:
        self.cols = cols
        self.n = len(cols["step"])
        self._cache: dict[tuple[str, str], Any] = {}

    def col(self, name: str, dtype: str = "float64") -> Any:
        import numpy as np

        arr = self._cache.get((name, dtype))
        if arr is None:
            arr = self._cache[(name, dtype)] = np.asarray(self.cols[name], dtype=dtype)
        return arr

    @property
    def steps(self) -> Any:
        return self.col("step", "int64")

    def loss(self) -> tuple[Any, Any]:
        """(rows that computed a training loss, rows whose loss was non-finite), as the
        rules read them (``RunContext.loss`` and the non-finite timeline)."""
        import numpy as np

        loss = self.col("loss").copy()
        lfn = self.col("loss_fn")
        flagged = self.col("loss_nonfinite", "bool")
        fill = np.isnan(loss) & ~flagged & ~np.isnan(lfn)
        loss[fill] = lfn[fill]
        bad = flagged | self.col("loss_fn_nonfinite", "bool") | np.isinf(loss)
        return np.isfinite(loss) | bad, bad

    def scaled(self) -> Any:
        """Rows a GradScaler scaled (a scale was recorded)."""
        import numpy as np

        return np.isfinite(self.col("scale_before")) | np.isfinite(self.col("scale"))


class LiveCheck(abc.ABC):
    """The final condition of one rule, followed step by step (O(1) state).

    ``feed(batch)`` returns the step at which the condition holds on everything seen so far,
    or None. ``level`` multiplies the evidence asked for: :meth:`back_off` doubles it after
    the engine did not confirm a request.
    """

    code: ClassVar[str]
    #: what the check follows, for the docs and the test of the registry
    follows: ClassVar[str]

    def __init__(self) -> None:
        self.level = 1
        self.retired = False  # the rule's final condition can no longer hold in this run

    @abc.abstractmethod
    def feed(self, b: Batch) -> int | None:
        """The step at which the condition holds on everything fed so far, or None."""

    def back_off(self) -> None:
        self.level *= 2


class SustainedNonfiniteLoss(LiveCheck):
    """GP401: the loss non-finite on every step that computed one, through the last 20 steps
    and a tenth of the steps so far."""

    code = "GP401"
    follows = "the run of trailing steps whose loss was NaN/Inf"

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0  # rows seen (the run's length so far)
        self.tail = 0  # trailing rows with a loss, all non-finite

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        with_loss, bad = b.loss()
        self.rows += b.n
        idx = np.flatnonzero(with_loss)
        if idx.size:
            good = np.flatnonzero(~bad[idx])
            self.tail = (self.tail + idx.size) if not good.size else int(idx.size - 1 - good[-1])
        if self.tail >= SUSTAINED_NONFINITE * self.level and self.tail >= SUSTAINED_FRACTION * self.rows:
            return int(b.steps[-1])
        return None


class PersistentNonfiniteParameters(LiveCheck):
    """GP403: the parameters non-finite after an optimizer step and on every measured step
    since (3 in a row before asking); a measured step with finite parameters retires it."""

    code = "GP403"
    follows = "measured steps in a row, from the first, with NaN/Inf parameters"

    def __init__(self) -> None:
        super().__init__()
        self.bad_run = 0

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        if self.retired:
            return None
        counts = b.col("param_nonfinite_layers", "int64")
        measured = counts >= 0
        bad = counts > 0
        rows = np.flatnonzero(measured)
        if not rows.size:
            return None
        if self.bad_run == 0:
            first = np.flatnonzero(bad[rows])
            if not first.size:
                return None
            rows = rows[first[0]:]
        if not bad[rows].all():
            self.retired = True  # the rule's persistence can never be 1 again
            return None
        self.bad_run += int(rows.size)
        if self.bad_run >= LIVE_PARAM_STEPS * self.level:
            return int(b.steps[rows[-1]])
        return None


class UnboundedStateAge(LiveCheck):
    """GP101 (silent form): the age of the state carried into a module grows every step (the
    age at the last aged step >= 80% of the steps since the first), and reaches 32 steps.
    The crash form needs no live check: the run ends by itself."""

    code = "GP101"
    follows = "the first aged step, the number of aged steps and the last age"

    def __init__(self) -> None:
        super().__init__()
        self.first: int | None = None
        self.aged = 0

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        ages = b.col("state_age", "int64")
        rows = np.flatnonzero(ages >= 1)
        if not rows.size:
            return None
        steps = b.steps
        if self.first is None:
            self.first = int(steps[rows[0]])
        self.aged += int(rows.size)
        last_age = int(ages[rows[-1]])
        elapsed = int(steps[rows[-1]]) - self.first + 1
        if self.aged >= 2 and last_age >= AGE_UNBOUNDED_FRACTION * elapsed and last_age >= LIVE_MIN_AGE * self.level:
            return int(steps[rows[-1]])
        return None


class RisingRetainedGraphs(LiveCheck):
    """GP103: graphs of earlier steps alive reach 8 and rose on at least half of the steps."""

    code = "GP103"
    follows = "steps, rises of graphs_alive, and its maximum"

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.rises = 0
        self.top = 0
        self.prev: int | None = None

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        alive = b.col("graphs_alive", "int64")
        if not alive.size:
            return None
        seq = alive if self.prev is None else np.concatenate([[self.prev], alive])
        self.rises += int((np.diff(seq) > 0).sum())
        self.rows += int(alive.size)
        self.prev = int(alive[-1])
        self.top = max(self.top, int(alive.max()))
        if self.rows > 1 and self.top >= GRAPHS_ALIVE * self.level and self.rises / (self.rows - 1) >= GRAPHS_RISING:
            return int(b.steps[-1])
        return None


class NoScaledStepSucceeded(LiveCheck):
    """GP302 (its final form): not one scaled step succeeded, at least 8 were skipped, and
    the scale fell 8+ halvings below 2**16 (and stays above 1, where another form fires)."""

    code = "GP302"
    follows = "scaled steps skipped, whether any succeeded, the lowest scale"

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0
        self.low = math.inf

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        if self.retired:
            return None
        rows = np.flatnonzero(b.scaled())
        if not rows.size:
            return None
        skipped = b.col("skipped", "bool")[rows]
        if not skipped.all():
            self.retired = True  # a scaled step succeeded: this form can never hold again
            return None
        self.skipped += int(rows.size)
        scales = np.concatenate([b.col("scale_before")[rows], b.col("scale")[rows]])
        scales = scales[np.isfinite(scales)]
        if scales.size:
            self.low = min(self.low, float(scales.min()))
        below = math.log2(FP16_MAX_SCALE / self.low) if 0 < self.low < math.inf else 0.0
        if (self.skipped >= LONG_BURST_HALVINGS * self.level and self.low > 1.0
                and below >= LONG_BURST_HALVINGS):
            return int(b.steps[rows[-1]])
        return None


class DiscardedOverflowsAtFixedScale(LiveCheck):
    """GP305: the last 3 scaled steps were overflows discarded without ``scaler.update()``,
    and the scale never moved while discarding."""

    code = "GP305"
    follows = "the run of trailing discarded overflows and the scales they were discarded at"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.tail = 0
        self.low = math.inf
        self.high = -math.inf

    def feed(self, b: Batch) -> int | None:
        import numpy as np

        scaled = b.scaled()
        rows = np.flatnonzero(scaled)
        if not rows.size:
            return None
        grad_bad = (b.col("grad_nonfinite_layers", "int64") > 0) | np.isinf(b.col("grad_norm"))
        abandoned = b.col("abandoned", "bool")
        not_updated = ~b.col("scaler_updated", "bool") & (b.col("optimizer_steps", "int64") == 0)
        discarded = scaled & grad_bad & ~b.col("skipped", "bool") & (abandoned | not_updated)
        # the rule does not count a last row discarded only by not being updated (the run may
        # have ended there): until the next batch, neither does this check
        discarded[-1] &= bool(abandoned[-1])
        d = discarded[rows]
        if d.any():
            sb = b.col("scale_before")[rows][d]
            sb = sb[np.isfinite(sb)]
            if sb.size:
                self.low, self.high = min(self.low, float(sb.min())), max(self.high, float(sb.max()))
        self.count += int(d.sum())
        kept = np.flatnonzero(~d)
        self.tail = (self.tail + int(d.size)) if not kept.size else int(d.size - 1 - kept[-1])
        need = FINAL_DISCARDED_TAIL * self.level
        if self.count >= FINAL_DISCARDED_TAIL and self.tail >= need and self.low == self.high:
            return int(b.steps[rows[-1]])
        return None


#: rule code -> its live check: every rule that declares ``final_when`` has one here or a
#: reason in :data:`NOT_LIVE` (tests/test_early_stop.py holds the registry complete)
LIVE_CHECKS: dict[str, type[LiveCheck]] = {
    c.code: c for c in (UnboundedStateAge, RisingRetainedGraphs, NoScaledStepSucceeded, DiscardedOverflowsAtFixedScale,
                        SustainedNonfiniteLoss, PersistentNonfiniteParameters)
}
#: rule code -> why its final condition is not followed live (none at present)
NOT_LIVE: dict[str, str] = {}


class LiveChecks:
    """Every live check of one run; fed on the writer thread.

    Attributes:
        pending: a check asked for a stop and the training thread has not looked yet (read
            at every step boundary: a plain attribute, set here, cleared there).
        candidate: ``(code, step)`` of the request.
        seconds, steps, batches: time spent in :meth:`feed`, steps and batches fed (the
            benchmark's cost figure; also written to the run's metadata).
        failed: the error that switched the checks off (a bug here never stops the writer).
        after_feed: called with the steps fed so far after each batch (the stop's hand-over
            bound, :meth:`Stopper.ramp`); a fault in it switches the checks off too.
    """

    def __init__(self) -> None:
        self.checks = {code: cls() for code, cls in LIVE_CHECKS.items()}
        self.pending = False
        self.candidate: tuple[str, int] | None = None
        self.enabled = True
        self.seconds = 0.0
        self.steps = 0
        self.batches = 0
        self.failed: str | None = None
        self.after_feed: Any = None
        self._lock = threading.Lock()

    def feed(self, cols: dict[str, Any]) -> None:
        """One written batch of step columns (``RunWriter._on_steps``). Never raises."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        try:
            self.steps += len(cols.get("step") or ())
            b = Batch(cols)
            if b.n:
                for code, check in self.checks.items():
                    step = check.feed(b)
                    if step is not None and not self.pending:
                        with self._lock:
                            self.candidate = (code, step)
                            self.pending = True
            if self.after_feed is not None:
                self.after_feed(self.steps)
        except Exception as exc:  # noqa: BLE001 - a fault here must not stop the run log
            self.enabled = False
            self.failed = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.batches += 1
            self.seconds += time.perf_counter() - t0

    def take(self) -> tuple[str, int] | None:
        """The pending request, cleared (training thread)."""
        with self._lock:
            cand, self.candidate, self.pending = self.candidate, None, False
        return cand

    def back_off(self, code: str) -> None:
        check = self.checks.get(code)
        if check is not None:
            check.back_off()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": round(self.seconds, 6), "steps": self.steps, "batches": self.batches,
                               "levels": {c: k.level for c, k in self.checks.items() if k.level != 1}}
        if self.failed:
            out["failed"] = self.failed
        return out


# ================================================================== steps left ========
def total_steps_hint(explicit: int | None, optimizers: list[Any], done: int,
                     explicit_from: str = "watch(total_steps=)") -> tuple[int | None, int | None, str | None]:
    """How many steps the script meant to run and how many it had done, when it says:
    ``watch(total_steps=)`` (or a callback's: Lightning's ``max_steps`` or
    ``estimated_stepping_batches``, Hugging Face's ``state.max_steps``), else, looked up once
    at the stop, a ``OneCycleLR`` stepping a watched optimizer (its ``total_steps``: it
    raises past them), a Lightning ``Trainer`` or a Hugging Face ``Trainer`` alive in the
    process. Returns ``(total, done, where it came from)``; ``(None, None, None)`` when
    nothing says."""
    if explicit is not None and explicit > 0:
        return int(explicit), int(done), explicit_from
    import gc

    kinds: list[tuple[type, str]] = []
    sched = sys.modules.get("torch.optim.lr_scheduler")
    if sched is not None and hasattr(sched, "OneCycleLR"):
        kinds.append((sched.OneCycleLR, "onecycle"))
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        m = sys.modules.get(mod)
        if m is not None and isinstance(getattr(m, "Trainer", None), type):
            kinds.append((m.Trainer, "lightning"))
    tr = sys.modules.get("transformers.trainer")
    if tr is not None and isinstance(getattr(tr, "Trainer", None), type):
        kinds.append((tr.Trainer, "hf"))
    if not kinds:
        return None, None, None
    classes = tuple(k for k, _ in kinds)
    watched = {id(o) for o in optimizers}
    for obj in gc.get_objects():
        if not issubclass(type(obj), classes):  # type(): isinstance would read __class__ (lazy module shims warn)
            continue
        try:
            found = _total_of(obj, kinds, watched)
        except Exception:  # noqa: BLE001 - a hint only
            found = None
        if found is not None:
            return found
    return None, None, None


def _total_of(obj: Any, kinds: list[tuple[type, str]], watched: set[int]) -> tuple[int, int, str] | None:
    kind = next(k for cls, k in kinds if issubclass(type(obj), cls))
    if kind == "onecycle":
        if id(getattr(obj, "optimizer", None)) not in watched:
            return None
        # the stop comes inside optimizer.step(), before this batch's scheduler.step(): the
        # scheduler has counted one step fewer than the optimizer made
        return int(obj.total_steps), min(int(obj.last_epoch) + 1, int(obj.total_steps)), "OneCycleLR total_steps"
    if kind == "lightning":
        total = lightning_total_steps(obj)
        return None if total is None else (total, int(obj.global_step), "Lightning Trainer")
    state = getattr(obj, "state", None)
    total = getattr(state, "max_steps", 0) or 0
    if total > 0:
        return int(total), int(state.global_step), "Trainer state.max_steps"
    return None


def lightning_total_steps(trainer: Any) -> int | None:
    """A Lightning ``Trainer``'s planned optimizer steps: ``max_steps`` when set, else
    ``estimated_stepping_batches`` when finite."""
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    try:
        est = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - not set up yet, or no length
        return None
    return int(est) if math.isfinite(est) and est > 0 else None


# ===================================================================== the stop =======
class Stopper:
    """A probe's stop: the live checks it feeds its writer, and the step-boundary gate.

    Args:
        probe: the :class:`~gradprobe.probe.core.Probe` (its log, metadata, rank, step).
        stop_on: ``"error"`` or ``"warning"``.

    Attributes:
        checks: the :class:`LiveChecks` (fed on the writer thread).
        raise_at_boundary: raise :class:`RunStopped` at the step boundary (``watch``,
            ``gradprobe run``); False for the callbacks, which :meth:`poll` and end their
            loops themselves.
        announce: print one line on stderr at the stop (``gradprobe run`` prints its own).
        decision: the :class:`StopDecision` once stopped.
        unconfirmed: the requests the engine did not confirm.
    """

    def __init__(self, probe: Any, stop_on: str) -> None:
        self.probe = probe
        self.stop_on = check_stop_on(stop_on)
        self.checks = LiveChecks()
        self.raise_at_boundary = True
        self.announce = True
        self.note: str | None = None
        #: where the probe's ``total_steps`` came from (the callbacks set the framework's)
        self.total_from = "watch(total_steps=)"
        self.decision: StopDecision | None = None
        self.unconfirmed: list[dict[str, Any]] = []
        self.confirm_seconds = 0.0
        self.failed: str | None = None
        self.checks.after_feed = self.ramp
        threading.Thread(target=_warm_writer, name="gradprobe-stop-warmup", daemon=True).start()

    # ---- writer thread ------------------------------------------------------------------
    def ramp(self, fed: int) -> None:
        """The probe's hand-over step bound after ``fed`` steps reached the checks: as many
        as were fed (doubling from :data:`STOP_FLUSH_STEPS`), at most
        :data:`STOP_FLUSH_STEPS_MAX` and the configuration's ``flush_steps``. The probe
        starts at :data:`STOP_FLUSH_STEPS` under ``stop_on`` and reads the bound when a step
        closes (one int, written here, read there)."""
        probe = self.probe
        if hasattr(probe, "_flush_steps"):
            ceiling = min(STOP_FLUSH_STEPS_MAX, int(probe.config.flush_steps))
            probe._flush_steps = max(1, min(ceiling, max(STOP_FLUSH_STEPS, fed)))

    # ---- training thread ----------------------------------------------------------------
    def gate(self) -> None:
        """At a step boundary, outside every guard: one attribute read on the healthy path;
        raises :class:`RunStopped` when the engine confirms a request."""
        if not self.checks.pending or not self.raise_at_boundary:
            return
        decision = self.poll()
        if decision is not None:
            raise RunStopped(decision)

    def poll(self) -> StopDecision | None:
        """Confirms a pending request with the engine (callbacks call this at their step
        end). Returns the decision once the run must stop (again on every later call), else
        None. Never raises: a fault here switches stopping off and training goes on."""
        if self.decision is not None:
            return self.decision
        if not self.checks.pending or self.failed is not None:
            return None
        cand = self.checks.take()
        if cand is None:
            return None
        t0 = time.perf_counter()
        try:
            return self._confirm(*cand)
        except Exception as exc:  # noqa: BLE001 - gradprobe failures never kill the run
            self.failed = f"{type(exc).__name__}: {exc}"[:300]
            self.checks.enabled = False
            try:
                self.probe.guard.fail("stop", exc)
            except Exception:  # noqa: BLE001
                pass
            return None
        finally:
            self.confirm_seconds += time.perf_counter() - t0

    def _confirm(self, code: str, step: int) -> StopDecision | None:
        from gradprobe.engine import analyze_runlog
        from gradprobe.runlog.runlog import RunLog

        probe = self.probe
        probe.flush()
        report = analyze_runlog(RunLog.load(probe.logdir))
        limit = _SEVERITY_RANK[self.stop_on]
        final = [f for f in report.findings if f.final and _SEVERITY_RANK.get(f.severity, 9) <= limit]
        done = int(probe.step)
        if not final:
            same = [f for f in report.findings if f.code == code]
            entry: dict[str, Any] = {"code": code, "step": int(step), "checked_at": done,
                                     "engine": ([f"{f.code} {f.severity}" + (" final" if f.final else " not final")
                                                 for f in same] or [f"no {code} finding"])}
            self.unconfirmed.append(entry)
            self.checks.back_off(code)
            probe.meta.setdefault("live_checks", {})["unconfirmed"] = list(self.unconfirmed)
            probe.ctx.meta_dirty = True
            return None
        finding = final[0]
        total, done_by_script, source = total_steps_hint(getattr(probe, "total_steps", None), _optimizers_of(probe),
                                                         done, self.total_from)
        left = None
        if total is not None:
            left = max(0, int(total) - int(done_by_script if done_by_script is not None else done))
        world = int(getattr(probe, "world_size", 1) or 1)
        decision = StopDecision(
            step=max(done - 1, 0), steps=done, finding=finding, report=report,
            rank=int(probe.rank) if world > 1 else None, total_steps=total, steps_left=left, total_from=source,
            trigger={"code": code, "step": int(step)}, wall_time=time.time(), note=self.note,
        )
        self.decision = decision
        record = decision.to_json()
        report.source["stopped"] = dict(record)
        probe.meta["stopped"] = record
        probe.meta.setdefault("live_checks", {})["unconfirmed"] = list(self.unconfirmed)
        probe.writer.put_event({"kind": "stopped", **record})
        probe.ctx.meta_dirty = True
        probe.flush()
        if self.announce:
            try:
                sys.stderr.write(f"{decision.describe()}\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - a closed stream
                pass
        return decision

    def stats(self) -> dict[str, Any]:
        out = self.checks.stats()
        out["stop_on"] = self.stop_on
        out["confirm_seconds"] = round(self.confirm_seconds, 6)
        if self.unconfirmed:
            out["unconfirmed"] = list(self.unconfirmed)
        if self.failed:
            out["stop_failed"] = self.failed
        return out


def _warm_writer() -> None:
    """The writer's first ``pyarrow.array`` imports pandas (pyarrow checks every input against
    pandas types): 0.4-2 s holding the GIL, during which no step reaches the checks, so a
    fault in the first seconds of a run would be seen that much later. Under ``stop_on`` the
    import is done at once, while the script starts, off the training thread."""
    try:
        import pyarrow

        pyarrow.array([0.0])
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def _optimizers_of(probe: Any) -> list[Any]:
    try:
        return [o.optimizer for o in probe.discovery.optimizers]
    except Exception:  # noqa: BLE001
        return []
