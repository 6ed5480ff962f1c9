"""Raw scalar records of a foreign log -> :class:`~gradprobe.runlog.RunLog` (shared by the
TensorBoard, Hugging Face and Lightning readers).

Every reader only turns its format into :class:`RawRecords` (name, step, value, and where
known epoch, wall time and origin, in the order the log holds them); :func:`build_runlog`
does the rest once for all formats:

* names are mapped to columns with :mod:`gradprobe.readers.mapping`;
* one row per *logged* step (the log's own step numbers; rows exist only for steps that
  logged a mapped value);
* a step logged several times keeps its last value, and every raw record is kept in
  ``meta["raw_records"]`` with a summary in ``meta["duplicates"]`` (for GP701);
* NaN in ``grad_norm``/``eval_loss`` means "not logged", so a *logged* non-finite value
  there is stored as ``+inf`` (with ``grad_nonfinite_layers = 1`` for the gradient: at least
  one parameter's gradient was non-finite); a non-finite loss sets ``loss_nonfinite``;
* AMP skipped steps are inferred where the log justifies it (see :func:`infer_skipped`);
* ``meta["signals"]`` lists what the log provides;
* ``source["notes"]`` says how the log was read (a perplexity converted, a loss read from
  an error metric, a per-epoch series left out), ``source["unmapped"]`` names what feeds no
  column, and a log without a training loss says in ``source["skipped"]`` that the rules
  judging the loss did not run: such a report never calls the run healthy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gradprobe.readers import mapping as M
from gradprobe.runlog import MISSING, LogError, RunLog
from gradprobe.runlog.schema import STEP_COLUMNS

_TYPES = {n: t for n, t, _ in STEP_COLUMNS}
_INT_DEFAULTS = {"grad_nonfinite_layers": 0, "param_nonfinite_layers": -1, "state_age": 0, "graphs_alive": 0,
                 "memory": 0, "n_backward": 1, "clip_calls": 0, "optimizer_steps": 1, "data_nonfinite": -1}
#: columns where NaN means "not logged": a logged non-finite value is kept as +inf
_NAN_IS_ABSENT = ("grad_norm", "step_grad_norm", "eval_loss", "clip_total_norm", "weight_norm")
#: columns whose presence means a training step happened (eval-only rows do not count)
TRAINING_COLUMNS = ("loss", "grad_norm", "lr", "step_grad_norm", "scale")
#: how many example duplicated steps ``meta["duplicates"]`` lists per stream
DUPLICATE_EXAMPLES = 10


@dataclass
class RawRecords:
    """Scalar records in log order. ``epoch``/``wall_time`` are NaN where unknown."""

    name: list[str] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    epoch: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    origin: list[str | None] = field(default_factory=list)

    def add(self, name: str, step: int, value: float, *, epoch: float = math.nan, wall_time: float = math.nan,
            origin: str | None = None) -> None:
        self.name.append(name)
        self.step.append(int(step))
        self.value.append(float(value))
        self.epoch.append(float(epoch))
        self.wall_time.append(float(wall_time))
        self.origin.append(origin)

    def extend(self, other: "RawRecords", rename: dict[str, str] | None = None) -> None:
        names = other.name if not rename else [rename.get(n, n) for n in other.name]
        self.name.extend(names)
        self.step.extend(other.step)
        self.value.extend(other.value)
        self.epoch.extend(other.epoch)
        self.wall_time.extend(other.wall_time)
        self.origin.extend(other.origin)

    def __len__(self) -> int:
        return len(self.name)

    def names(self) -> list[str]:
        return list(dict.fromkeys(self.name))


def to_float(v: Any) -> float | None:
    """A log value as a float (NaN/Infinity spelled as strings too); None if not a number."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        try:
            return float(s)
        except ValueError:
            return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


#: steps beyond this are not step numbers (and would not fit the int64 step column)
MAX_STEP = 2**53


def to_step(v: Any) -> int | None:
    """A log's step value as an int, or None if it is not a plausible step number."""
    f = to_float(v)
    if f is None or not math.isfinite(f) or abs(f) > MAX_STEP:
        return None
    return int(f)


def step_counts(raw: RawRecords) -> dict[str, int]:
    """Distinct steps each name was logged at (breaks ties between names of one column)."""
    if not len(raw):
        return {}
    df = pd.DataFrame({"name": raw.name, "step": raw.step})
    return {str(k): int(v) for k, v in df.groupby("name", sort=False)["step"].nunique().items()}


def training_steps(raw: RawRecords, rules: list[M.Rule] | None = None) -> int:
    """Distinct steps that logged a mapped training value (how runs are compared)."""
    res = M.resolve(raw.names(), rules, counts=step_counts(raw))
    names = {n for c, n in res.columns.items() if c in TRAINING_COLUMNS}
    names |= set(res.layers)
    return len({s for n, s in zip(raw.name, raw.step) if n in names})


def _stream(raw: RawRecords, arrays: dict[str, np.ndarray], name: str, epoch_by_step: pd.Series | None) -> tuple[pd.Series, dict[str, Any]]:
    mask = arrays["name"] == name
    steps = arrays["step"][mask]
    values = arrays["value"][mask]
    epochs = arrays["epoch"][mask].copy()
    if epoch_by_step is not None and np.isnan(epochs).any():
        fill = np.isnan(epochs)
        epochs[fill] = epoch_by_step.reindex(steps[fill]).to_numpy(dtype=np.float64)
    origins = [o for o, m in zip(raw.origin, mask) if m]
    record: dict[str, Any] = {"name": name, "step": steps.tolist()}
    if not np.isnan(epochs).all():
        record["epoch"] = [None if math.isnan(e) else (int(e) if float(e).is_integer() else float(e)) for e in epochs]
    if any(o is not None for o in origins):
        record["origin"] = origins
    series = pd.Series(values, index=steps).groupby(level=0).last()
    return series, record


def _duplicates(record: dict[str, Any]) -> dict[str, Any] | None:
    steps = pd.Series(record["step"])
    counts = steps.value_counts()
    dup = counts[counts > 1].sort_index()
    if dup.empty:
        return None
    out: dict[str, Any] = {
        "name": record["name"],
        "records": int(len(steps)),
        "distinct_steps": int(len(counts)),
        "duplicated_steps": int(len(dup)),
        "extra_records": int((dup - 1).sum()),
        "examples": [[int(s), int(c)] for s, c in dup.head(DUPLICATE_EXAMPLES).items()],
    }
    if "origin" in record:
        out["origins"] = sorted({str(o) for o in record["origin"] if o is not None})
    return out


def infer_skipped(steps: np.ndarray, grad_norm: np.ndarray | None, lr: np.ndarray | None,
                  scale: np.ndarray | None) -> tuple[np.ndarray, dict[str, int]]:
    """Marks logged steps that an AMP loss scaler skipped, where the log justifies it.

    * **Loss scale drops.** A dynamic loss scaler (``torch.amp.GradScaler``, DeepSpeed,
      Apex) lowers its scale exactly when it skips a step for inf/NaN gradients, so a logged
      scale below the previous logged scale marks a skip (at least one skipped step since
      the previous logged value, attributed to the step where the drop is seen).
    * **Non-finite gradient norm with an unchanged learning rate.** Hugging Face's Trainer
      logs ``grad_norm`` after unscaling; on an overflow it is inf/NaN, the optimizer step is
      skipped and the lr scheduler is *not* advanced (``optimizer_step_was_skipped``). So a
      non-finite ``grad_norm`` whose lr equals the lr of the neighbouring logged step (the
      previous one for transformers < 4.47, which logs the lr after the scheduler step; the
      next one for later versions, which log the lr the step used) marks a skip, provided
      the two steps are consecutive and the schedule otherwise moves: the lr changes on at
      least half of the other consecutive pairs (with a constant lr an unchanged lr carries
      no information, and nothing is inferred).

    Returns:
        (skipped mask, counts per evidence: ``from_scale``, ``from_lr``).
    """
    n = len(steps)
    skipped = np.zeros(n, dtype=bool)
    counts = {"from_scale": 0, "from_lr": 0}
    if scale is not None:
        prev = math.nan
        for i in range(n):
            v = scale[i]
            if not math.isfinite(v):
                continue
            if math.isfinite(prev) and v < prev:
                skipped[i] = True
                counts["from_scale"] += 1
            prev = v
    if grad_norm is not None and lr is not None and n >= 3:
        bad = np.isinf(grad_norm)  # logged non-finite norms are stored as +inf
        if bad.any():
            consecutive = np.diff(steps) == 1
            both = np.isfinite(lr[:-1]) & np.isfinite(lr[1:]) & consecutive
            same = both & (lr[:-1] == lr[1:])
            involved = bad[:-1] | bad[1:]
            others = both & ~involved
            if others.sum() >= 3 and (others & ~same).sum() >= 0.5 * others.sum():
                for i in np.flatnonzero(bad):
                    before = i > 0 and same[i - 1]
                    after = i < n - 1 and same[i]
                    if (before or after) and not skipped[i]:
                        skipped[i] = True
                        counts["from_lr"] += 1
    return skipped, counts


#: torch.optim classes (checked by name: reading a log never imports torch)
TORCH_OPTIMIZERS = frozenset({"ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "NAdam",
                              "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam"})


def _optimizer_class(name: str | None) -> str | None:
    """An optimizer class named by a metric (Lightning's ``lr-<ClassName>``), or None.

    Lightning names the column after the optimizer's class, or after the scheduler's
    ``name`` when the user set one; only CamelCase names (class names) are taken."""
    if not name:
        return None
    if name in TORCH_OPTIMIZERS or re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
        return name
    return None


def build_runlog(raw: RawRecords, *, kind: str, path: str, skipped: list[str] | None = None,
                 meta: dict[str, Any] | None = None, rules: list[M.Rule] | None = None,
                 what: str = "log", notes: list[str] | None = None,
                 constants: dict[str, float] | None = None) -> RunLog:
    """Builds the RunLog of a foreign log from its raw records.

    ``constants``: columns known to hold one value on every training step though no record
    logs them (the clip threshold an MLflow run's params name), set on the rows where a
    training value was logged.

    Raises:
        LogError: no record has a name that maps to a column.
    """
    skipped = list(skipped or [])
    res = M.resolve(raw.names(), rules, counts=step_counts(raw))
    data_columns = {c: n for c, n in res.columns.items() if c != "epoch"}
    if not data_columns and not res.layers:
        raise LogError(f"{path}: no recognised metric in this {what} ({_found(raw.names())}); "
                       f"map your names with ${M.ENV_VAR} or gradprobe.readers.register_tag (docs/readers.md)")
    arrays = {
        "name": np.array(raw.name, dtype=object),
        "step": np.array(raw.step, dtype=np.int64),
        "value": np.array(raw.value, dtype=np.float64),
        "epoch": np.array(raw.epoch, dtype=np.float64),
    }
    epoch_by_step = None
    if "epoch" in res.columns:
        m = arrays["name"] == res.columns["epoch"]
        epoch_by_step = pd.Series(arrays["value"][m], index=arrays["step"][m]).groupby(level=0).last()

    series: dict[str, pd.Series] = {}
    raw_records: dict[str, dict[str, Any]] = {}
    for col, name in data_columns.items():
        series[col], raw_records[col] = _stream(raw, arrays, name, epoch_by_step)
        if col in res.transforms:
            series[col] = _convert(series[col], res.transforms[col])
    mapping_notes = list(notes or [])
    for col in [c for c in series if c != "loss" and "loss" in series]:
        m = res.matches.get(data_columns[col])
        loss_match = res.matches.get(data_columns["loss"])
        if m is not None and m.aggregate and loss_match is not None and not loss_match.aggregate \
                and _epoch_indexed(series[col].index.to_numpy(), series["loss"].index.to_numpy()):
            mapping_notes.append(f"{col}: {data_columns[col]!r} is logged once per epoch at the epoch's number, not at "
                                 f"a training step, so it is not aligned with the per-step loss and is not used")
            del series[col], raw_records[col]
            res.unused[data_columns[col]] = "per-epoch values at epoch numbers, not aligned with the per-step loss"
            del data_columns[col]
            res.columns.pop(col, None)
    layer_series: dict[str, pd.Series] = {}
    for name, layer in res.layers.items():
        s, rec = _stream(raw, arrays, name, epoch_by_step)
        layer_series[layer] = s
        raw_records[f"layer_grad/{layer}"] = rec

    all_steps = sorted(set().union(*[set(s.index) for s in list(series.values()) + list(layer_series.values())]))
    idx = np.array(all_steps, dtype=np.int64)
    cols: dict[str, Any] = {"step": idx}
    for col, s in series.items():
        v = s.reindex(idx).to_numpy(dtype=np.float64)
        logged = np.zeros(len(idx), dtype=bool)
        logged[np.searchsorted(idx, s.index.to_numpy(dtype=np.int64))] = True
        typ = str(_TYPES[col])
        if col == "loss":
            cols["loss_nonfinite"] = logged & ~np.isfinite(v)
            cols[col] = v
        elif col in _NAN_IS_ABSENT:
            bad = logged & ~np.isfinite(v)
            v = np.where(bad, np.inf, v)
            cols[col] = v
            if col == "grad_norm" and "grad_nonfinite_layers" not in series:
                cols["grad_nonfinite_layers"] = bad.astype(np.int32)
        elif typ == "bool":
            cols[col] = np.where(np.isnan(v), False, v > 0.5)
        elif typ.startswith("int"):
            cols[col] = np.where(np.isfinite(v), np.round(np.nan_to_num(v)), _INT_DEFAULTS.get(col, 0)).astype(np.int64)
        else:
            cols[col] = v
    trained = np.zeros(len(idx), dtype=bool)
    for col in TRAINING_COLUMNS:
        if col in series:
            trained[np.searchsorted(idx, series[col].index.to_numpy(dtype=np.int64))] = True
    for col, value in (constants or {}).items():
        if col not in series:
            cols[col] = np.where(trained, value, np.nan)
    if "clip_max_norm" in cols and "clip_calls" not in series:
        cols["clip_calls"] = np.isfinite(cols["clip_max_norm"]).astype(np.int32)

    inferred = {"from_scale": 0, "from_lr": 0}
    if "skipped" not in series:
        mask, inferred = infer_skipped(idx, cols.get("grad_norm"), cols.get("lr"), cols.get("scale"))
        if mask.any():
            cols["skipped"] = mask

    layer_grad = None
    if layer_series:
        lg = pd.DataFrame({layer: s.reindex(idx) for layer, s in layer_series.items()}, index=idx)
        logged_mask = pd.DataFrame({layer: pd.Series(True, index=s.index).reindex(idx, fill_value=False)
                                    for layer, s in layer_series.items()}, index=idx)
        lg = lg.where(logged_mask, MISSING)  # logged NaN stays NaN (non-finite), absent is MISSING
        lg.insert(0, "step", idx)
        layer_grad = lg

    signals = {"duplicates"}
    for col in ("loss", "grad_norm", "lr", "eval_loss"):
        if col in series:
            signals.add(col)
    if "scale" in series or "skipped" in series or any(inferred.values()):
        signals.add("loss_scale")
    if layer_series:
        signals.add("layer_grad")
    if "clip_max_norm" in series or "clip_max_norm" in (constants or {}):
        signals.add("clip")
    if "memory" in series:
        signals.add("memory")
    if "step_time" in series:
        signals.add("timing")
    if "state_age" in series:
        signals.add("state_age")
    if "weight_norm" in series and "param_nonfinite_layers" in series:
        signals.add("weights")

    duplicates = {c: d for c, rec in raw_records.items() if (d := _duplicates(rec)) is not None}
    out_meta: dict[str, Any] = {
        "source_format": kind,
        "logged_steps_only": True,
        "signals": sorted(signals),
        "names": res.describe(),
        "raw_records": raw_records,
        "duplicates": duplicates,
        "skipped_inferred": inferred,
        "optimizers": [],
        "scalers": [],
        "layer_segments": [],
        # what one loss record is: the loss of the step it was logged at ("step": Lightning's
        # self.log, TensorBoard's add_scalar), or an average over many ("average": a name
        # that says so, epoch_loss, avg_loss, running_loss; a reader that knows, e.g. Hugging
        # Face averaging its logging_steps, says so in ``meta``)
        "loss_records": "average" if (m := res.matches.get(res.columns.get("loss", ""))) is not None
        and m.aggregate else "step",
    }
    opt = _optimizer_class(res.optimizer)
    if opt is not None:
        lr = cols.get("lr")
        first = lr[np.isfinite(lr)] if lr is not None else np.array([])
        out_meta["optimizers"] = [{
            "index": 0,
            "class": opt,
            "param_groups": [{"lr": float(first[0])}] if first.size else [{}],
            "partial": True,
            "from": f"metric name {res.columns['lr']!r}",
        }]
    out_meta.update(meta or {})
    if layer_series:
        out_meta["layer_segments"] = [{"id": 0, "first_step": int(idx[0]) if len(idx) else 0,
                                       "layers": [{"name": n} for n in layer_series]}]
    with np.errstate(over="ignore", invalid="ignore"):  # huge logged values become inf in float32 columns
        log = RunLog.build(pd.DataFrame(cols), meta=out_meta, layer_grad=layer_grad, kind=kind, path=path)
    if "loss" not in series:
        skipped.append(_no_loss_note(res, data_columns))
    log.source["skipped"] = skipped
    log.source["notes"] = mapping_notes + res.notes()
    unmapped = list(res.unmapped) + list(res.not_mapped)
    log.source["unmapped"] = unmapped[:UNMAPPED_LISTED]
    if len(unmapped) > UNMAPPED_LISTED:
        log.source["notes"].append(f"{len(unmapped)} names not mapped; the first {UNMAPPED_LISTED} are listed in unmapped")
    return log


#: how many names the report lists in ``source["unmapped"]`` (a log with one scalar per
#: parameter has thousands; the whole list stays in ``meta["names"]``)
UNMAPPED_LISTED = 100


def _found(names: list[str]) -> str:
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"found: {shown or 'nothing'}"


def _no_loss_note(res: M.Resolution, columns: dict[str, str]) -> str:
    """Why a log without a training loss is not called healthy: the rules that judge the
    loss did not run, and which names might have been the loss."""
    read = ", ".join(f"{c} from {n!r}" for c, n in columns.items())
    others = list(res.unmapped) + list(res.not_mapped)
    shown = ", ".join(others[:8]) + (f", ... ({len(others)} in all)" if len(others) > 8 else "")
    unmapped = f"; not recognised: {shown}" if others else ""
    return (f"no training loss in this log (read: {read}{unmapped}): the rules that judge the loss did not run, "
            f"so this report cannot call the run healthy; map the loss with ${M.ENV_VAR} (docs/readers.md)")


def _epoch_indexed(steps: np.ndarray, loss_steps: np.ndarray) -> bool:
    """Steps that are epoch numbers (0, 1, 2... or 1, 2, 3...), far fewer than the loss's
    steps and ending well before them (Keras logs ``epoch_*`` at the epoch number while its
    ``batch_loss`` counts iterations; Lightning logs ``*_epoch`` at the global step)."""
    if steps.size == 0 or loss_steps.size < 2 * steps.size:
        return False
    first = int(steps[0])
    return first in (0, 1) and bool((steps == np.arange(first, first + steps.size)).all()) \
        and int(steps[-1]) * 2 < int(loss_steps.max())


def _convert(values: pd.Series, transform: str) -> pd.Series:
    """A perplexity (``ln``) or a loss in bits (``bits``) as a loss in nats."""
    v = values.to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(v) if transform == "ln" else v * math.log(2.0)
    return pd.Series(out, index=values.index)
