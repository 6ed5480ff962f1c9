"""MLflow runs -> ``RunLog`` (``source.kind = "mlflow"``), read without MLflow installed.

Two stores hold MLflow runs:

* the **file store** (``mlruns/``, used when ``./mlruns`` exists or with
  ``MLFLOW_ALLOW_FILE_STORE=true``): ``mlruns/<experiment_id>/<run_id>/`` holds
  ``meta.yaml``, ``metrics/<key>`` (lines of ``timestamp value step``; ``value`` may be
  ``nan``/``inf``; a key ``train/loss`` is the nested file ``metrics/train/loss``; very old
  files have no step), ``params/<key>`` and ``tags/<key>`` (one value per file). ``PATH`` may
  be a run folder, an experiment folder, the whole ``mlruns/``, or a folder holding
  ``mlruns/``;
* the **SQLite store** (``sqlite:///mlflow.db``, MLflow 3's default), read with the standard
  library's :mod:`sqlite3`, read-only: tables ``runs``, ``metrics`` (``key, value, timestamp,
  step, is_nan``), ``params``, ``tags``, ``experiments``. MLflow stores NaN as ``0.0`` with
  ``is_nan = 1`` and +-Inf as +-1.7976931348623157e308 (the largest double): both are
  decoded back. ``PATH`` is the database file, or a folder holding ``mlflow.db``.

Every metric record is one record at its ``step`` in log order (the file's line order; the
table's insertion order), so duplicated steps are kept for GP701. A key whose records all
sit at one step (``mlflow.log_metric(key, v)`` without ``step=`` logs every value at step
0) is numbered in logged order instead, and ``source["notes"]`` says so.

Params that name a canonical hyperparameter (``lr``, ``max_norm``, ``weight_decay``,
``batch_size``, ``warmup_steps``, ``momentum``, ``hidden_size``), or the number of outputs a
cross-entropy is over (``vocab_size``, ``num_classes``; see :data:`PARAMS`) go to
``meta["mlflow"]["hyperparameters"]``; the optimizer class, lr, weight decay and momentum
to ``meta["optimizers"]`` (partial), where the rules and the summary read them. A global
gradient-norm clip threshold (Hugging Face's ``max_grad_norm``, Lightning's
``gradient_clip_val`` with the norm algorithm, Keras' ``global_clipnorm``...) means the
framework clipped every training step at it: ``clip_max_norm`` is set on the logged training
steps. Keras' ``clipnorm`` clips each weight's gradient on its own and is not a global
threshold: it is not mapped.

Several runs. A store or experiment holds many runs (an Optuna study logs one per trial);
runs are never merged. :func:`read_mlflow` reads the run with the most logged training
steps (or the one ``run`` names: an id, a unique id prefix or a run name) and lists the
others in ``source["skipped"]``; :func:`read_each` reads them all (``gradprobe analyze``
prints one report per run). Deleted runs (``.trash``, ``lifecycle_stage: deleted``) and runs
without metrics are left out unless named.

Damage. A metric line that does not parse, or a last line cut off before its newline (a
killed writer), is skipped and counted in ``source["skipped"]``; an unreadable or corrupt
database is read up to the damage, or refused with one line when nothing can be read.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator

from gradprobe.readers import mapping as M
from gradprobe.readers.records import TORCH_OPTIMIZERS, RawRecords, build_runlog, to_float, to_step, training_steps
from gradprobe.runlog import LogError, RunLog
from gradprobe.runlog.runlog import open_regular

KIND = "mlflow"
DB_NAME = "mlflow.db"
STORE_DIR = "mlruns"
SQLITE_MAGIC = b"SQLite format 3\x00"
#: MLflow writes +-Inf to SQL stores as the largest double
SQL_INF = sys.float_info.max
#: meta.yaml files are a few hundred bytes; anything far larger is not one
META_MAX_BYTES = 1 << 20
#: a param or tag value is at most 8000 characters in MLflow 3 (6000 before)
VALUE_MAX_CHARS = 8000
#: how many params ``meta["mlflow"]["params"]`` keeps (HF logs ~100 TrainingArguments)
PARAMS_KEPT = 300
#: MLflow's run statuses (the file store writes their numbers)
STATUS = {1: "RUNNING", 2: "SCHEDULED", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}

#: canonical hyperparameter -> param keys that name it, best first (matched on the last part
#: of the key, case-insensitive: ``optimizer/lr``, ``hparams.lr``)
PARAMS: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate", "lr", "opt_learning_rate", "optimizer_lr", "learningrate", "base_lr", "init_lr", "initial_lr",
           "lr0"),
    "max_norm": ("max_grad_norm", "max_norm", "gradient_clip_val", "global_clipnorm", "opt_global_clipnorm",
                 "clip_grad_norm", "grad_clip_norm", "grad_clip", "clip_norm", "max_gradient_norm", "gradient_clipping",
                 "clip_grad"),
    "weight_decay": ("weight_decay", "wd", "opt_weight_decay", "optimizer_weight_decay"),
    "batch_size": ("train_batch_size", "batch_size", "per_device_train_batch_size", "batchsize", "bs"),
    "warmup_steps": ("warmup_steps", "num_warmup_steps", "lr_warmup_steps"),
    "momentum": ("momentum", "opt_momentum"),
    "hidden_size": ("hidden_size", "hidden_dim", "d_model", "n_embd"),
    # the number of outputs a cross-entropy is taken over (its uniform level is ln K): the
    # Hugging Face MLflowCallback logs the model config with the arguments. Not num_labels:
    # every HF config has one (2 by default), language models too
    "vocab_size": ("vocab_size", "n_vocab", "ntokens", "ntoken"),
    "num_classes": ("num_classes", "n_classes", "nclasses", "num_class"),
}
INTEGER_PARAMS = ("batch_size", "warmup_steps", "hidden_size", "vocab_size", "num_classes")
#: param keys naming the optimizer (HF's ``optim`` is ``adamw_torch``, Keras' ``opt_name`` ``SGD``)
OPTIMIZER_PARAMS = ("optimizer", "optimizer_name", "opt_name", "optim", "optimizer_class", "optimizer_type", "opt")
#: Lightning's ``gradient_clip_val`` clips by norm unless ``gradient_clip_algorithm`` says value
CLIP_ALGORITHM_PARAMS = ("gradient_clip_algorithm", "clip_algorithm")


class _Damaged(Exception):
    """A store that cannot be read at all (its message is the one-line error)."""


@dataclass
class RunRef:
    """One MLflow run: where it is and what its metadata says."""

    run_id: str
    store: str  # "file" | "sqlite"
    where: str  # the run folder, or the database file
    name: str | None = None
    experiment_id: str | None = None
    experiment: str | None = None
    status: str | None = None
    lifecycle: str | None = None
    start_time: int | None = None
    trash: bool = False

    def label(self) -> str:
        return f"{self.run_id}" + (f" ({self.name})" if self.name else "")


@dataclass
class _Read:
    ref: RunRef
    raw: RawRecords = field(default_factory=RawRecords)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------ detection ----
def _meta(path: str) -> dict[str, Any] | None:
    """A ``meta.yaml`` as a dict (None: absent, unreadable, not a mapping)."""
    import yaml

    p = os.path.join(path, "meta.yaml")
    try:
        with open_regular(p) as f:
            data = f.read(META_MAX_BYTES + 1)
    except OSError:
        return None
    if len(data) > META_MAX_BYTES:
        return None
    try:
        meta = yaml.safe_load(data.decode("utf-8", "replace"))
    except Exception:  # noqa: BLE001 - any YAML error: not MLflow's meta
        return None
    return meta if isinstance(meta, dict) else None


def _run_meta(path: str) -> dict[str, Any] | None:
    meta = _meta(path) if os.path.isdir(os.path.join(path, "metrics")) else None
    if meta is None or not (meta.get("run_id") or meta.get("run_uuid")):
        return None  # MLflow 3's logged models have metrics/ too, but a model_id, no run id
    return meta


def is_run_dir(path: str) -> bool:
    """A file-store run folder: ``meta.yaml`` with a run id, and ``metrics/``."""
    return os.path.isdir(path) and _run_meta(path) is not None


def _experiment_meta(path: str) -> dict[str, Any] | None:
    meta = _meta(path)
    if meta is None or "experiment_id" not in meta or meta.get("run_id") or meta.get("run_uuid"):
        return None
    return meta


def _subdirs(path: str) -> list[str]:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [os.path.join(path, n) for n in names if os.path.isdir(os.path.join(path, n))]


def is_experiment_dir(path: str) -> bool:
    """A file-store experiment folder: ``meta.yaml`` with an experiment id (no run id)."""
    return os.path.isdir(path) and _experiment_meta(path) is not None


def is_store_dir(path: str) -> bool:
    """A file-store root (``mlruns/``): experiment folders directly inside."""
    return os.path.isdir(path) and any(is_experiment_dir(d) for d in _subdirs(path)
                                       if os.path.basename(d) not in (".trash", "models"))


def is_sqlite(path: str) -> bool:
    """A SQLite database file (by its 16-byte header)."""
    try:
        with open_regular(path) as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def detect_dir(path: str) -> bool:
    """``path`` is an MLflow run, experiment or store folder, or holds ``mlruns/`` or ``mlflow.db``."""
    if is_run_dir(path) or is_experiment_dir(path) or is_store_dir(path):
        return True
    return holds_store(path) is not None


def holds_store(path: str) -> str | None:
    """The ``mlruns/`` or ``mlflow.db`` directly inside ``path`` (a project folder), if any."""
    store = os.path.join(path, STORE_DIR)
    if is_store_dir(store):
        return store
    db = os.path.join(path, DB_NAME)
    if os.path.isfile(db) and is_sqlite(db):
        return db
    return None


# ------------------------------------------------------------------------ file store ----
def _list_file_runs(path: str) -> list[RunRef]:
    """Run folders of a run, experiment or store folder (deleted ones flagged)."""
    if is_run_dir(path):
        return [_file_ref(path, _run_meta(path) or {}, None, trash=os.path.basename(os.path.dirname(path)) == ".trash")]
    experiments: list[tuple[str, dict[str, Any]]] = []
    if is_experiment_dir(path):
        experiments.append((path, _experiment_meta(path) or {}))
    else:
        for d in _subdirs(path):
            base = os.path.basename(d)
            if base == ".trash":
                experiments.append((d, {"name": ".trash", "trash": True}))
            elif base != "models":
                meta = _experiment_meta(d)
                if meta is not None:
                    experiments.append((d, meta))
    refs = []
    for exp_dir, exp in experiments:
        for d in _subdirs(exp_dir):
            meta = _run_meta(d)
            if meta is not None:
                refs.append(_file_ref(d, meta, exp, trash=bool(exp.get("trash"))))
    return refs


def _file_ref(path: str, meta: dict[str, Any], exp: dict[str, Any] | None, *, trash: bool) -> RunRef:
    status = meta.get("status")
    start = meta.get("start_time")
    return RunRef(
        run_id=str(meta.get("run_id") or meta.get("run_uuid") or os.path.basename(path)),
        store="file",
        where=path,
        name=str(meta["run_name"]) if meta.get("run_name") else None,
        experiment_id=str(meta["experiment_id"]) if meta.get("experiment_id") is not None else None,
        experiment=str(exp["name"]) if exp and exp.get("name") and not exp.get("trash") else None,
        status=STATUS.get(status, str(status)) if isinstance(status, int) else (str(status) if status else None),
        lifecycle=str(meta.get("lifecycle_stage")) if meta.get("lifecycle_stage") else None,
        start_time=_time(start),
        trash=trash,
    )


def _time(v: Any) -> int | None:
    """A start time in ms, or None (a meta.yaml or a row may hold anything)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) >= 2**62:
        return None
    return int(v)


def _walk_values(root: str) -> Iterator[tuple[str, str]]:
    """(key, file path) of a ``metrics``/``params``/``tags`` folder, nested keys joined by ``/``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            yield os.path.relpath(p, root).replace(os.sep, "/"), p


def _read_metric_file(key: str, path: str, out: _Read) -> None:
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        out.skipped.append(f"metrics/{key}: unreadable ({exc.strerror or exc})")
        return
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, as MLflow writes it
    bad = 0
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            bad += 1
            continue
        ts, value = to_float(parts[0]), to_float(parts[1])
        step = to_step(parts[2]) if len(parts) == 3 else 0  # MLflow < 1.0 wrote no step
        if ts is None or value is None or step is None:
            bad += 1
            continue
        out.raw.add(key, step, value, wall_time=ts / 1000.0 if math.isfinite(ts) else math.nan)
    if tail.strip():
        out.skipped.append(f"metrics/{key}: last line cut off before its end (a killed writer): skipped")
    if bad:
        out.skipped.append(f"metrics/{key}: {bad} line(s) that are not 'timestamp value step' skipped")


def _read_text_values(root: str, what: str, out: _Read, into: dict[str, str]) -> None:
    if not os.path.isdir(root):
        return
    for key, p in _walk_values(root):
        try:
            with open_regular(p) as f:
                into[key] = f.read(VALUE_MAX_CHARS * 4).decode("utf-8", "replace")[:VALUE_MAX_CHARS].strip()
        except OSError:
            out.skipped.append(f"{what}/{key}: unreadable")


def _read_file_run(ref: RunRef) -> _Read:
    out = _Read(ref)
    for key, p in _walk_values(os.path.join(ref.where, "metrics")):
        _read_metric_file(key, p, out)
    _read_text_values(os.path.join(ref.where, "params"), "params", out, out.params)
    _read_text_values(os.path.join(ref.where, "tags"), "tags", out, out.tags)
    if ref.name is None and out.tags.get("mlflow.runName"):
        ref.name = out.tags["mlflow.runName"]
    return out


# ---------------------------------------------------------------------- SQLite store ----
#: what a damaged database raises: SQLite's errors, and a UnicodeDecodeError (a ValueError)
#: when the damage lands in the schema text SQLite reports back
_SQL_ERRORS = (sqlite3.Error, ValueError)


def _connect(path: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    con = sqlite3.connect(uri, uri=True, timeout=2.0)
    con.text_factory = lambda b: b.decode("utf-8", "replace")
    return con


def _columns(con: sqlite3.Connection, table: str, path: str) -> set[str]:
    try:
        return {str(r[1]) for r in con.execute(f"PRAGMA table_info({table})")}
    except _SQL_ERRORS as exc:
        raise _Damaged(f"{path}: the {table} table cannot be read ({exc})") from None


def _list_sqlite_runs(path: str) -> list[RunRef]:
    try:
        con = _connect(path)
    except _SQL_ERRORS as exc:
        raise _Damaged(f"{path}: cannot open the SQLite database ({exc})") from None
    try:
        try:
            tables = {str(r[0]) for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except _SQL_ERRORS as exc:
            raise _Damaged(f"{path}: not a readable SQLite database ({exc})") from None
        if not {"runs", "metrics"} <= tables:
            raise _Damaged(f"{path}: a SQLite database without MLflow's tables (runs, metrics)")
        cols = _columns(con, "runs", path)
        if "run_uuid" not in cols:
            raise _Damaged(f"{path}: an MLflow database whose runs table has no run_uuid column")
        wanted = [c for c in ("name", "status", "start_time", "lifecycle_stage", "experiment_id") if c in cols]
        experiments: dict[str, str] = {}
        try:  # experiment names are a nicety: a damaged table only loses them
            if "experiments" in tables and {"experiment_id", "name"} <= _columns(con, "experiments", path):
                experiments = {str(i): str(n) for i, n in con.execute("SELECT experiment_id, name FROM experiments")}
        except (_Damaged, *_SQL_ERRORS):
            experiments = {}
        refs = []
        try:
            for row in con.execute(f"SELECT run_uuid{''.join(', ' + c for c in wanted)} FROM runs ORDER BY rowid"):
                rec = dict(zip(["run_uuid", *wanted], row))
                exp = rec.get("experiment_id")
                start = rec.get("start_time")
                refs.append(RunRef(
                    run_id=str(rec["run_uuid"]), store="sqlite", where=path,
                    name=str(rec["name"]) if rec.get("name") else None,
                    experiment_id=str(exp) if exp is not None else None,
                    experiment=experiments.get(str(exp)) if exp is not None else None,
                    status=str(rec["status"]) if rec.get("status") else None,
                    lifecycle=str(rec["lifecycle_stage"]) if rec.get("lifecycle_stage") else None,
                    start_time=_time(start),
                ))
        except _SQL_ERRORS as exc:
            if not refs:
                raise _Damaged(f"{path}: the runs table cannot be read ({exc})") from None
        return refs
    finally:
        con.close()


def _sql_value(value: Any, is_nan: Any) -> float | None:
    if is_nan not in (None, 0, False, "0"):
        return math.nan
    v = to_float(value)
    if v is None:
        return None
    if v >= SQL_INF:
        return math.inf
    if v <= -SQL_INF:
        return -math.inf
    return v


#: rows fetched per round (a corrupt page ends the read there: the rows before it are kept)
_FETCH = 5000


def _read_sqlite_run(ref: RunRef) -> _Read:
    out = _Read(ref)
    try:
        con = _connect(ref.where)
    except _SQL_ERRORS as exc:
        raise _Damaged(f"{ref.where}: cannot open the SQLite database ({exc})") from None
    try:
        cols = _columns(con, "metrics", ref.where)
        if not {"key", "value", "run_uuid"} <= cols:
            raise _Damaged(f"{ref.where}: an MLflow database whose metrics table lacks key, value or run_uuid")
        step = "step" if "step" in cols else "0"
        is_nan = "is_nan" if "is_nan" in cols else "0"
        ts = "timestamp" if "timestamp" in cols else "NULL"
        n = bad = 0
        try:
            cur = con.execute(f"SELECT key, value, {step}, {is_nan}, {ts} FROM metrics WHERE run_uuid = ? ORDER BY rowid",
                              (ref.run_id,))
            while True:
                rows = cur.fetchmany(_FETCH)
                if not rows:
                    break
                for key, value, st, nan, t in rows:
                    v, s = _sql_value(value, nan), to_step(st)
                    if key is None or v is None or s is None:
                        bad += 1
                        continue
                    tf = to_float(t)
                    out.raw.add(str(key), s, v, wall_time=tf / 1000.0 if tf is not None and math.isfinite(tf) else math.nan)
                    n += 1
        except _SQL_ERRORS as exc:
            out.skipped.append(f"{os.path.basename(ref.where)}: the metrics table is damaged after {n} record(s) of this "
                               f"run ({exc}); the rest is skipped")
        if bad:
            out.skipped.append(f"{os.path.basename(ref.where)}: {bad} metric record(s) without a numeric value or step skipped")
        for table, into in (("params", out.params), ("tags", out.tags)):
            try:
                if {"key", "value", "run_uuid"} <= _columns(con, table, ref.where):
                    for k, val in con.execute(f"SELECT key, value FROM {table} WHERE run_uuid = ?", (ref.run_id,)):
                        if k is not None:
                            into[str(k)] = str(val)[:VALUE_MAX_CHARS] if val is not None else ""
            except (_Damaged, *_SQL_ERRORS):
                out.skipped.append(f"{os.path.basename(ref.where)}: the {table} table is damaged; {table} skipped")
    finally:
        con.close()
    if ref.name is None and out.tags.get("mlflow.runName"):
        ref.name = out.tags["mlflow.runName"]
    return out


# --------------------------------------------------------------------------- params ----
def _param(params: dict[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first param whose key (or its last part) is one of ``names``: (key, value)."""
    by_last: dict[str, tuple[str, str]] = {}
    for key, value in params.items():
        last = re.split(r"[/.]", key)[-1].lower()
        by_last.setdefault(last, (key, value))
        by_last.setdefault(key.lower(), (key, value))
    for n in names:
        if n in by_last:
            return by_last[n]
    return None


def _number(text: str) -> float | None:
    v = to_float(text)
    return v if v is not None and math.isfinite(v) else None


def optimizer_class(text: str) -> str | None:
    """The torch optimizer class a param value names (``adamw_torch`` -> ``AdamW``,
    ``<class 'torch.optim.sgd.SGD'>`` -> ``SGD``), or None."""
    low = text.lower()
    best = None
    for cls in sorted(TORCH_OPTIMIZERS, key=len, reverse=True):
        if re.search(r"(?<![a-z])" + cls.lower() + r"(?![a-z])", low) or low.startswith(cls.lower() + "_"):
            best = cls
            break
    return best


def hyperparameters(params: dict[str, str]) -> tuple[dict[str, dict[str, Any]], str | None, str | None]:
    """Canonical hyperparameters the params name: ({name: {"value", "from"}}, optimizer
    class, the param naming it)."""
    out: dict[str, dict[str, Any]] = {}
    for canon, names in PARAMS.items():
        found = _param(params, names)
        if found is None:
            continue
        v = _number(found[1])
        if v is None:
            continue
        if canon == "max_norm":
            algo = _param(params, CLIP_ALGORITHM_PARAMS)
            if found[0].lower().endswith("gradient_clip_val") and algo and "value" in algo[1].lower():
                continue  # Lightning clipping each gradient element by value, not the norm
            if v <= 0:
                continue  # 0 or less: clipping off (HF max_grad_norm=0, nanoGPT grad_clip=0.0)
        out[canon] = {"value": int(v) if canon in INTEGER_PARAMS and v.is_integer() else v,
                      "from": found[0]}
    opt = _param(params, OPTIMIZER_PARAMS)
    cls = optimizer_class(opt[1]) if opt else None
    return out, cls, (opt[0] if opt and cls else None)


# ---------------------------------------------------------------------------- build ----
def _renumber_unstepped(raw: RawRecords) -> list[str]:
    """Keys whose records all sit at one step (``log_metric`` without ``step=``) are numbered
    in logged order; returns the keys renumbered."""
    by_key: dict[str, list[int]] = {}
    for i, name in enumerate(raw.name):
        by_key.setdefault(name, []).append(i)
    renumbered = []
    for name, idx in by_key.items():
        steps = {raw.step[i] for i in idx}
        if len(idx) > 1 and len(steps) == 1:
            for k, i in enumerate(idx):
                raw.step[i] = k
            renumbered.append(name)
    return renumbered


def _build(read: _Read, path: str, extra_skipped: list[str]) -> RunLog:
    ref = read.ref
    notes = list(read.notes)
    renumbered = _renumber_unstepped(read.raw)
    if renumbered:
        shown = ", ".join(repr(k) for k in renumbered[:6]) + (f" ... ({len(renumbered)} keys)" if len(renumbered) > 6 else "")
        notes.append(f"{shown}: every value logged at one step (log_metric without step=): numbered in logged order")
    hparams, opt_class, opt_from = hyperparameters(read.params)
    if ref.status and ref.status not in ("FINISHED",):
        notes.append(f"MLflow run status {ref.status}" + (" (still running, or killed before it ended: the log may stop short)"
                                                          if ref.status == "RUNNING" else ""))
    if ref.lifecycle == "deleted" or ref.trash:
        notes.append("the run is marked deleted in MLflow")
    clip = hparams.get("max_norm")
    if clip is not None:
        notes.append(f"max_norm {clip['value']:g} from param {clip['from']!r}: the training steps are read as clipped at it")
    meta: dict[str, Any] = {"mlflow": {
        "run_id": ref.run_id, "run_name": ref.name, "experiment_id": ref.experiment_id, "experiment": ref.experiment,
        "status": ref.status, "lifecycle_stage": ref.lifecycle, "store": ref.store, "location": ref.where,
        "params": dict(list(read.params.items())[:PARAMS_KEPT]), "hyperparameters": hparams,
        "tags": {k: v for k, v in read.tags.items() if k.startswith("mlflow.") or k.startswith("gradprobe.")},
    }}
    if not len(read.raw):
        raise LogError(f"{path}: MLflow run {ref.label()} has no metrics")
    log = build_runlog(read.raw, kind=KIND, path=path, skipped=read.skipped + extra_skipped, meta=meta,
                       what=f"MLflow run {ref.run_id}", notes=notes,
                       constants={"clip_max_norm": float(clip["value"])} if clip is not None else None)
    _merge_optimizer(log, hparams, opt_class, opt_from)
    log.source["run"] = ref.run_id
    return log


def _merge_optimizer(log: RunLog, hparams: dict[str, dict[str, Any]], cls: str | None, cls_from: str | None) -> None:
    """The optimizer the params describe, merged into what a metric name said (``lr-Adam``)."""
    group = {k: hparams[k]["value"] for k in ("lr", "weight_decay", "momentum") if k in hparams}
    if cls is None and not group:
        return
    opts = log.meta.get("optimizers") or []
    if opts:
        opt = opts[0]
        opt["class"] = opt.get("class") or cls
        pg = (opt.get("param_groups") or [{}])[0]
        for k, v in group.items():
            pg.setdefault(k, v)
        opt["param_groups"] = [pg]
        return
    src = ", ".join(f"{k}={hparams[k]['from']!r}" for k in group) + (f", class={cls_from!r}" if cls_from else "")
    log.meta["optimizers"] = [{"index": 0, "class": cls, "param_groups": [group], "partial": True,
                               "from": f"MLflow params ({src.lstrip(', ')})"}]


# -------------------------------------------------------------------------- reading ----
def _locate(path: str) -> tuple[list[RunRef], str]:
    """The runs at ``path`` and a word for what ``path`` is."""
    if os.path.isfile(path):
        if not is_sqlite(path):
            raise LogError(f"{path}: not an MLflow store (not a SQLite database)")
        return _list_sqlite_runs(path), "database"
    if is_run_dir(path):
        return _list_file_runs(path), "run"
    if is_experiment_dir(path) or is_store_dir(path):
        return _list_file_runs(path), "experiment" if is_experiment_dir(path) else "store"
    inner = holds_store(path)
    if inner is not None:
        return _locate(inner)
    raise LogError(f"{path}: no MLflow run, experiment, mlruns/ or {DB_NAME} here")


def _select(refs: list[RunRef], run: str, path: str) -> RunRef:
    exact = [r for r in refs if r.run_id == run]
    if exact:
        return exact[0]
    named = [r for r in refs if r.name == run]
    prefix = [r for r in refs if len(run) >= 4 and r.run_id.startswith(run)]
    for found in (named, prefix):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise LogError(f"{path}: --run {run!r} matches {len(found)} runs ({', '.join(r.label() for r in found[:6])}); "
                           "give the full run id")
    shown = ", ".join(r.label() for r in refs[:10]) + (f", ... ({len(refs)} in all)" if len(refs) > 10 else "")
    raise LogError(f"{path}: no MLflow run {run!r} here (runs: {shown or 'none'})")


def _read(ref: RunRef) -> _Read:
    return _read_file_run(ref) if ref.store == "file" else _read_sqlite_run(ref)


def _candidates(path: str, run: str | None) -> tuple[list[_Read], list[str]]:
    """The runs to report on (read), and notes on the runs left out."""
    try:
        refs, what = _locate(path)
        if run is not None:
            return [_read(_select(refs, run, path))], []
        live = [r for r in refs if not r.trash and r.lifecycle != "deleted"]
        deleted = len(refs) - len(live)
        if not live and refs and what == "run":
            live = refs  # a deleted run's own folder: read it (the note says it is deleted)
            deleted = 0
        reads = [_read(r) for r in live]
    except _Damaged as exc:
        raise LogError(str(exc)) from None
    with_metrics = [r for r in reads if len(r.raw)]
    empty = [r for r in reads if not len(r.raw)]
    notes = []
    if empty:
        notes.append(f"{len(empty)} MLflow run(s) without metrics not analyzed: "
                     + ", ".join(r.ref.label() for r in empty[:5]) + (" ..." if len(empty) > 5 else ""))
    if deleted:
        notes.append(f"{deleted} deleted MLflow run(s) not analyzed (pass --run ID to read one)")
    if not with_metrics:
        if not refs:
            raise LogError(f"{path}: MLflow {what} without runs")
        damage = [s for r in reads for s in r.skipped]
        if damage:
            raise LogError(f"{path}: no readable metric record in {len(reads)} MLflow run(s) ({'; '.join(damage[:3])})")
        if len(reads) == 1:
            raise LogError(f"{path}: MLflow run {reads[0].ref.label()} has no metrics")
        raise LogError(f"{path}: no MLflow run with metrics here ({len(refs)} run(s), {deleted} deleted)")
    return with_metrics, notes


def read_mlflow(path: str, run: str | None = None) -> RunLog:
    """Reads one run: the one ``run`` names, else the one with the most logged training
    steps (ties: the latest started); the others are listed in ``source["skipped"]``."""
    reads, notes = _candidates(path, run)
    if len(reads) == 1:
        return _build(reads[0], path, notes)
    rules = M.active_rules()
    ranked = sorted(reads, key=lambda r: (training_steps(r.raw, rules), r.ref.start_time or 0), reverse=True)
    chosen, others = ranked[0], ranked[1:]
    listed = ", ".join(f"{r.ref.label()} ({training_steps(r.raw, rules)} steps)" for r in others[:5])
    more = f", ... ({len(others)} in all)" if len(others) > 5 else ""
    notes.insert(0, f"{len(others)} other MLflow run(s) in {path} not analyzed: {listed}{more}; runs are not merged "
                    "(gradprobe analyze prints one report per run; --run ID picks one)")
    log = _build(chosen, path, notes)
    log.meta["mlflow"]["other_runs"] = [{"run_id": r.ref.run_id, "run_name": r.ref.name,
                                         "steps": training_steps(r.raw, rules)} for r in others]
    return log


def read_each(path: str, run: str | None = None) -> list[RunLog]:
    """Every run with metrics at ``path`` (or the one ``run`` names), in store order, one
    RunLog each; notes on the runs left out go to the first."""
    reads, notes = _candidates(path, run)
    logs = []
    for i, r in enumerate(reads):
        logs.append(_build(r, path, notes if i == 0 else []))
    return logs

