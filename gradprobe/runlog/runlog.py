"""``RunLog``: a recorded run as plain data (pandas frames + metadata).

A ``RunLog`` loads the same whether it comes from a live probe or from disk, and it is all
the rule engine ever sees: rules never touch hooks or tensors. Loading is tolerant: every
append-only stream is read up to its first unreadable record batch, and ``source["skipped"]``
says what was left out. Input that is not a readable log at all raises :class:`LogError`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from gradprobe.runlog import schema as S
from gradprobe.runlog.writer import NONFINITE_STRINGS, STRING_ESCAPE, dumps, write_json_atomic


class LogError(Exception):
    """The input is not a readable log (missing, empty, foreign or corrupt beyond use)."""


_STEP_DEFAULTS: dict[str, Any] = {
    "wall_time": np.nan,
    "step_time": np.nan,
    "backward_time": np.nan,
    "n_backward": 1,
    "loss": np.nan,
    "loss_nonfinite": False,
    "loss_fn": np.nan,
    "loss_fn_nonfinite": False,
    "eval_loss": np.nan,
    "grad_norm": np.nan,
    "step_grad_norm": np.nan,
    "grad_nonfinite_layers": 0,
    "clip_max_norm": np.nan,
    "clip_total_norm": np.nan,
    "clip_calls": 0,
    "clip_on_scaled": False,
    "lr": np.nan,
    "optimizer_steps": 1,
    "scale": np.nan,
    "scale_before": np.nan,
    "skipped": False,
    "scaler_updated": False,
    "scale_tampered": False,
    "abandoned": False,
    "param_nonfinite_layers": -1,
    "weight_norm": np.nan,
    "state_age": 0,
    "state_age_module": None,
    "graphs_alive": 0,
    "retain_graph": False,
    "memory": 0,
    "local_grad_norm": np.nan,
    "data_nonfinite": -1,
    "sampled": False,
    "grad_change": -1,
}

_NUMPY_TYPES = {
    pa.int64(): np.int64,
    pa.int32(): np.int32,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
    pa.bool_(): bool,
}


def _empty_samples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype=np.int64),
            "probe": pd.Series([], dtype=object),
            "target": pd.Series([], dtype=object),
            "stat": pd.Series([], dtype=object),
            "index": pd.Series([], dtype=np.int32),
            "value": pd.Series([], dtype=np.float64),
        }
    )


def _empty_scalars() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype=np.int64),
            "name": pd.Series([], dtype=object),
            "value": pd.Series([], dtype=np.float64),
        }
    )


def normalize_steps(df: pd.DataFrame) -> pd.DataFrame:
    """Adds missing step columns with their 'absent' defaults and canonical dtypes."""
    out = {}
    n = len(df)
    if "step" in df:
        out["step"] = df["step"].to_numpy(dtype=np.int64)
    else:
        out["step"] = np.arange(n, dtype=np.int64)
    for name, typ, _ in S.STEP_COLUMNS[1:]:
        if name in df:
            col = df[name]
            if typ == pa.string():
                out[name] = col.astype(object).where(col.notna(), None).to_numpy(dtype=object)
            else:
                out[name] = col.to_numpy(dtype=_NUMPY_TYPES[typ])
        else:
            default = _STEP_DEFAULTS[name]
            if typ == pa.string():
                out[name] = np.array([default] * n, dtype=object)
            else:
                out[name] = np.full(n, default, dtype=_NUMPY_TYPES[typ])
    return pd.DataFrame(out)


@dataclass
class RunLog:
    """A recorded run.

    Attributes:
        meta: metadata (``gradprobe.json``): run info, models, optimizers, scalers, layers.
        steps: one row per step, columns of ``schema.STEP_COLUMNS``.
        layer_grad: per-layer gradient norm before clipping (unscaled); index ``step``,
            one column per parameter name; ``schema.MISSING`` (-1) where not measured.
        layer_weight: per-layer weight norm after the optimizer step; same shape.
        samples: sampled deep-probe statistics (step, probe, target, stat, index, value).
        scalars: user scalars from ``probe.log`` (step, name, value).
        events: rare events (configuration, exceptions, misuse), as dicts.
        source: where it came from: ``path``, ``kind``, ``steps``, ``skipped`` (list of
            one-line notes on what could not be read).
    """

    meta: dict[str, Any] = field(default_factory=dict)
    steps: pd.DataFrame = field(default_factory=lambda: normalize_steps(pd.DataFrame()))
    layer_grad: pd.DataFrame = field(default_factory=pd.DataFrame)
    layer_weight: pd.DataFrame = field(default_factory=pd.DataFrame)
    samples: pd.DataFrame = field(default_factory=_empty_samples)
    scalars: pd.DataFrame = field(default_factory=_empty_scalars)
    events: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        steps: pd.DataFrame | dict[str, Any] | None = None,
        *,
        meta: dict[str, Any] | None = None,
        layer_grad: pd.DataFrame | dict[str, Any] | None = None,
        layer_weight: pd.DataFrame | dict[str, Any] | None = None,
        samples: Iterable[tuple[int, str, str, str, int, float]] | pd.DataFrame | None = None,
        scalars: Iterable[tuple[int, str, float]] | pd.DataFrame | None = None,
        events: list[dict[str, Any]] | None = None,
        kind: str = "gradprobe",
        path: str = "<memory>",
    ) -> "RunLog":
        """Builds a RunLog from partial data, filling absent signals with their defaults.

        This is how rule tests make synthetic runs (smdebug's idea): give only the columns
        the rule reads.
        """
        sdf = normalize_steps(pd.DataFrame(steps if steps is not None else {}))
        lg = _layer_frame(layer_grad, sdf)
        lw = _layer_frame(layer_weight, sdf)
        if samples is None:
            smp = _empty_samples()
        elif isinstance(samples, pd.DataFrame):
            smp = samples
        else:
            rows = list(samples)
            smp = pd.DataFrame(rows, columns=["step", "probe", "target", "stat", "index", "value"]) if rows else _empty_samples()
        if scalars is None:
            sc = _empty_scalars()
        elif isinstance(scalars, pd.DataFrame):
            sc = scalars
        else:
            rows2 = list(scalars)
            sc = pd.DataFrame(rows2, columns=["step", "name", "value"]) if rows2 else _empty_scalars()
        m = {"schema": S.RUN_SCHEMA}
        m.update(meta or {})
        return cls(
            meta=m,
            steps=sdf,
            layer_grad=lg,
            layer_weight=lw,
            samples=smp,
            scalars=sc,
            events=list(events or []),
            source={"path": path, "kind": kind, "steps": int(len(sdf)), "skipped": []},
        )

    # ---- convenience views ------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return int(len(self.steps))

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_grad.columns)

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind]

    def samples_of(self, probe: str, stat: str | None = None) -> pd.DataFrame:
        df = self.samples
        if df.empty:
            return df
        m = df["probe"] == probe
        if stat is not None:
            m &= df["stat"] == stat
        return df[m]

    def scalar(self, name: str) -> pd.Series:
        """A user scalar as a series indexed by step (last value per step)."""
        df = self.scalars
        if df.empty:
            return pd.Series([], dtype=np.float64)
        sel = df[df["name"] == name]
        return sel.groupby("step")["value"].last()

    # ---- persistence ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunLog":
        """Reads a gradprobe run directory (tolerating a truncated or corrupt tail)."""
        return load_run_dir(os.fspath(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes this RunLog as a run directory (TensorBoard files are not written)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        meta = dict(self.meta)
        meta.setdefault("schema", S.RUN_SCHEMA)
        names = list(self.layer_grad.columns)
        if names:
            existing = meta.get("layer_segments") or []
            known = {layer["name"]: layer for seg in existing for layer in seg.get("layers", [])}
            meta["layer_segments"] = [
                {"id": 0, "first_step": int(self.steps["step"].iloc[0]) if len(self.steps) else 0,
                 "layers": [known.get(n, {"name": n}) for n in names]}
            ]
        else:
            meta["layer_segments"] = []
        write_json_atomic(os.path.join(path, S.META_FILE), meta)
        steps = normalize_steps(self.steps)
        arrays = [pa.array(_strings(steps[n]) if t == pa.string() else steps[n].to_numpy(), type=t) for n, t, _ in S.STEP_COLUMNS]
        _write_table(os.path.join(path, S.STEPS_FILE), pa.RecordBatch.from_arrays(arrays, schema=S.STEPS_SCHEMA))
        if names:
            # steps or layers the weights lack are "not measured"; a NaN norm stays NaN (non-finite)
            lw = self.layer_weight.reindex(index=self.layer_grad.index, columns=names, fill_value=S.MISSING) \
                if not self.layer_weight.empty else None
            sch = S.layers_schema(len(names))
            arrs = [pa.array(self.layer_grad.index.to_numpy(dtype=np.int64), type=pa.int64())]
            arrs += [pa.array(self.layer_grad[n].to_numpy(dtype=np.float32), type=pa.float32()) for n in names]
            arrs += [
                pa.array((lw[n].to_numpy(dtype=np.float32) if lw is not None else np.full(len(self.layer_grad), S.MISSING, np.float32)), type=pa.float32())
                for n in names
            ]
            _write_table(os.path.join(path, S.layers_file(0)), pa.RecordBatch.from_arrays(arrs, schema=sch))
        if not self.samples.empty:
            s = self.samples
            _write_table(
                os.path.join(path, S.SAMPLES_FILE),
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(s["step"].to_numpy(dtype=np.int64)),
                        pa.array(s["probe"].astype(str).tolist(), type=pa.string()).dictionary_encode(),
                        pa.array(s["target"].astype(str).tolist(), type=pa.string()).dictionary_encode(),
                        pa.array(s["stat"].astype(str).tolist(), type=pa.string()).dictionary_encode(),
                        pa.array(s["index"].to_numpy(dtype=np.int32)),
                        pa.array(s["value"].to_numpy(dtype=np.float64)),
                    ],
                    schema=S.SAMPLES_SCHEMA,
                ),
            )
        if not self.scalars.empty:
            s = self.scalars
            _write_table(
                os.path.join(path, S.SCALARS_FILE),
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(s["step"].to_numpy(dtype=np.int64)),
                        pa.array(s["name"].astype(str).tolist(), type=pa.string()).dictionary_encode(),
                        pa.array(s["value"].to_numpy(dtype=np.float64)),
                    ],
                    schema=S.SCALARS_SCHEMA,
                ),
            )
        with open(os.path.join(path, S.EVENTS_FILE), "w", encoding="utf-8") as f:
            for e in self.events:
                f.write(dumps(e) + "\n")


def _layer_frame(data: pd.DataFrame | dict[str, Any] | None, steps: pd.DataFrame) -> pd.DataFrame:
    if data is None:
        return pd.DataFrame(index=pd.Index(steps["step"].to_numpy(), name="step"))
    df = pd.DataFrame(data)
    if "step" in df.columns:
        df = df.set_index("step")
    elif len(df) == len(steps):
        df.index = pd.Index(steps["step"].to_numpy(), name="step")
    df.index.name = "step"
    return df.astype(np.float32)


def _strings(col: pd.Series) -> list[str | None]:
    """A string column as Python strings with None for missing (pandas' string dtype holds
    missing values as NaN, which Arrow will not take as a string)."""
    return [v if isinstance(v, str) else None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            for v in col.tolist()]


def _write_table(path: str, batch: pa.RecordBatch) -> None:
    with open(path, "wb") as f:
        sink = pa.PythonFile(f, mode="w")
        with pa.ipc.new_stream(sink, batch.schema, options=S.TABLE_IPC_OPTIONS) as w:
            w.write_batch(batch)


def open_regular(path: str) -> BinaryIO:
    """Opens ``path`` for binary reading if it is a regular file (links followed); raises
    ``OSError`` otherwise. A log is never a FIFO (``open`` would block until a writer comes)
    nor a device such as ``/dev/zero`` (reading it would never end)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_stream(path: str, skipped: list[str]) -> pa.Table | None:
    """Reads an Arrow IPC stream up to its first unreadable batch."""
    name = os.path.basename(path)
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        skipped.append(f"{name}: unreadable ({exc.strerror or exc})")
        return None
    if not data:
        skipped.append(f"{name}: empty file")
        return None
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(data))
        reader.schema.names  # noqa: B018 - field names that are not UTF-8 fail here, not later
    except (pa.ArrowException, OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        skipped.append(f"{name}: not an Arrow stream ({str(exc).splitlines()[0][:120]})")
        return None
    batches = []
    while True:
        try:
            batch = reader.read_next_batch()
            batch.validate(full=True)  # a damaged batch can decode with buffers too short for its rows
            batches.append(batch)
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError) as exc:
            rows = sum(b.num_rows for b in batches)
            skipped.append(
                f"{name}: truncated or corrupt after {len(batches)} record batches ({rows} rows); "
                f"the rest was skipped ({str(exc).splitlines()[0][:100]})"
            )
            break
    try:
        return pa.Table.from_batches(batches, schema=reader.schema)
    except (pa.ArrowException, ValueError) as exc:
        skipped.append(f"{name}: inconsistent batches ({str(exc)[:100]})")
        return None


#: event fields that hold text: a message that reads "NaN" stays a string
_EVENT_TEXT_FIELDS = frozenset({"kind", "where", "type", "message", "module", "class", "detail", "what", "how", "location",
                                "error", "dtype", "output_dtype", "device", "part", "state_age_module", "signal", "name"})


#: the columns of samples.arrow and scalars.arrow as read back (dictionary strings as plain)
_SAMPLE_FIELDS = pa.schema([("step", pa.int64()), ("probe", pa.string()), ("target", pa.string()), ("stat", pa.string()),
                            ("index", pa.int32()), ("value", pa.float64())])
_SCALAR_FIELDS = pa.schema([("step", pa.int64()), ("name", pa.string()), ("value", pa.float64())])


def _cast(col: Any, typ: pa.DataType) -> Any:
    return col if col.type.equals(typ) else col.cast(typ)  # a safe cast: overflow raises


def conform(tbl: pa.Table, schema: pa.Schema, name: str, skipped: list[str], *, all_required: bool) -> pa.Table | None:
    """``tbl`` with the columns of ``schema`` cast to their types (a stream written by
    something else, or damaged: columns missing, duplicated, of another type, with nulls).

    A column that is absent or cannot be cast is dropped and named in ``skipped``; with
    ``all_required`` the whole table is skipped instead (None). Nulls in numeric and boolean
    step columns become that column's 'absent' default; rows with a null in a required
    column are dropped.
    """
    cols, names, bad = [], [], []
    have = tbl.column_names
    for fld in schema:
        n = have.count(fld.name)
        if n != 1:
            if n or all_required:
                bad.append(f"{fld.name} {'missing' if not n else f'{n} times'}")
            continue
        try:
            col = _cast(tbl.column(fld.name), fld.type)
        except (pa.ArrowException, ValueError, TypeError):
            bad.append(f"{fld.name}: {tbl.schema.field(fld.name).type}")
            continue
        if col.null_count and not all_required and fld.type != pa.string() and fld.name in _STEP_DEFAULTS:
            col = col.fill_null(pa.scalar(_STEP_DEFAULTS[fld.name], type=fld.type))
        cols.append(col)
        names.append(fld.name)
    if bad:
        shown = ", ".join(bad)[:160]
        if all_required:
            skipped.append(f"{name}: not the expected columns ({shown}); skipped")
            return None
        skipped.append(f"{name}: columns missing or of an unexpected type ignored ({shown})")
    out = pa.Table.from_arrays(cols, names=names) if cols else pa.table({})
    if out.num_rows:
        if all_required:
            kept = out.drop_null()
        elif "step" in names and out.column("step").null_count:
            import pyarrow.compute as pc

            kept = out.filter(pc.is_valid(out.column("step")))
        else:
            kept = out
        if kept.num_rows < out.num_rows:
            skipped.append(f"{name}: {out.num_rows - kept.num_rows} row(s) with missing values skipped")
        out = kept
    return out


def _parse_json_value(v: Any, text: bool = False) -> Any:
    """The writer stores non-finite floats as the strings "NaN", "Infinity", "-Infinity"
    (strict JSON): turn them back into floats, in nested lists and objects too (not in
    ``text`` fields); a string the writer escaped (a leading NUL) is that string."""
    if isinstance(v, str):
        if v.startswith(STRING_ESCAPE):
            return v[1:]
        if not text and v in NONFINITE_STRINGS:
            return float(v.replace("Infinity", "inf"))
        return v
    if isinstance(v, list):
        return [_parse_json_value(x, text) for x in v]
    if isinstance(v, dict):
        return {k: _parse_json_value(x, text) for k, x in v.items()}
    return v


def read_events(path: str, skipped: list[str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return events
    bad = 0
    try:
        with open_regular(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        skipped.append(f"{S.EVENTS_FILE}: unreadable ({exc.strerror or exc})")
        return events
    for raw in lines:
        try:
            e = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            bad += 1
            continue
        if isinstance(e, dict):
            events.append(e)
        else:
            bad += 1
    if bad:
        skipped.append(f"{S.EVENTS_FILE}: {bad} unreadable line(s) skipped")
    return events


#: The shape of every metadata field the analysis reads (``gradprobe.json`` as the probe
#: writes it). A field of another type (a hand-edited or corrupt file) is dropped on load and
#: named in ``source["skipped"]``, so the analysis sees a log with less information rather
#: than failing on it.
_META_LISTS = ("models", "recurrent", "optimizers", "scalers", "layer_segments", "eval_streams")
_META_DICTS = ("autocast", "probe_failures", "config")
_META_INTS = ("rank", "world_size", "steps", "pid")
_META_STRINGS = ("schema", "device", "memory_kind", "mode", "created", "closed", "gradprobe_version", "torch_version", "python")
#: within list entries: field -> type it must have (absent is fine)
_ENTRY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "models": {"name": (str,), "class": (str,)},
    "recurrent": {"module": (str,), "class": (str,)},
    "optimizers": {"class": (str,), "param_groups": (list,)},
    "scalers": {"class": (str,)},
    "layer_segments": {"layers": (list,)},
    "eval_streams": {"name": (str,), "site": (list,)},
}
#: within list entries: integer fields (an integral float is taken, anything else dropped)
_ENTRY_INTS: dict[str, tuple[str, ...]] = {
    "recurrent": ("hidden_size", "lookback", "num_layers", "input_size"),
    "models": ("parameters",),
    "scalers": ("growth_interval",),
    "eval_streams": ("first_step",),
}


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def sanitize_meta(meta: dict[str, Any], skipped: list[str]) -> dict[str, Any]:
    """Drops metadata fields whose type is not the one the probe writes (see
    ``_META_*``); returns the cleaned copy and notes what went in ``skipped``."""
    if not meta:
        return meta
    meta = dict(meta)
    bad: list[str] = []
    for key in _META_LISTS:
        if key not in meta:
            continue
        v = meta[key]
        if not isinstance(v, list):
            bad.append(key)
            del meta[key]
            continue
        kept = []
        for entry in v:
            if not isinstance(entry, dict):
                bad.append(f"{key}[]")
                continue
            entry = dict(entry)
            for fld, types in _ENTRY_FIELDS.get(key, {}).items():
                if fld in entry and not isinstance(entry[fld], types):
                    if entry[fld] is not None:
                        bad.append(f"{key}[].{fld}")
                    del entry[fld]
            for fld in _ENTRY_INTS.get(key, ()):
                if fld in entry and entry[fld] is not None:
                    as_int = _as_int(entry[fld])
                    if as_int is None:
                        bad.append(f"{key}[].{fld}")
                        del entry[fld]
                    else:
                        entry[fld] = as_int
            if key == "optimizers" and "param_groups" in entry:
                entry["param_groups"] = [g for g in entry["param_groups"] if isinstance(g, dict)]
            if key == "eval_streams" and "site" in entry:
                entry["site"] = [x for x in entry["site"] if isinstance(x, str)]
            if key == "layer_segments" and "layers" in entry:
                entry["layers"] = [layer for layer in entry["layers"] if isinstance(layer, dict)]
            kept.append(entry)
        meta[key] = kept
    for key in _META_DICTS:
        if key in meta and not isinstance(meta[key], dict):
            bad.append(key)
            del meta[key]
    if isinstance(meta.get("autocast"), dict):
        clean = {}
        for module, entry in meta["autocast"].items():
            if isinstance(entry, dict) and isinstance(entry.get("dtype", ""), str):
                clean[module] = entry
            else:
                bad.append("autocast{}")
        meta["autocast"] = clean
    for key in _META_INTS:
        if key in meta and meta[key] is not None:
            v = _as_int(meta[key])
            if v is None:
                bad.append(key)
                del meta[key]
            else:
                meta[key] = v
    for key in _META_STRINGS:
        if key in meta and meta[key] is not None and not isinstance(meta[key], str):
            bad.append(key)
            del meta[key]
    if "loss_functions" in meta and not (isinstance(meta["loss_functions"], list)
                                         and all(isinstance(x, str) for x in meta["loss_functions"])):
        bad.append("loss_functions")
        del meta["loss_functions"]
    if bad:
        shown = ", ".join(dict.fromkeys(bad))
        skipped.append(f"{S.META_FILE}: fields of an unexpected type ignored ({shown[:200]})")
    return meta


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, S.META_FILE)) or os.path.exists(os.path.join(path, S.STEPS_FILE))
    )


def load_run_dir(path: str) -> RunLog:
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise LogError(f"{path}: not a gradprobe run directory")
    skipped: list[str] = []
    meta: dict[str, Any] = {}
    meta_path = os.path.join(path, S.META_FILE)
    has_meta = os.path.exists(meta_path)
    if has_meta:
        try:
            with open_regular(meta_path) as f:
                loaded = json.loads(f.read().decode("utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError("not an object")
            meta = loaded
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            skipped.append(f"{S.META_FILE}: unreadable metadata ({str(exc).splitlines()[0][:80]}); run information is missing")
    meta = sanitize_meta(meta, skipped)
    schema_name = str(meta.get("schema", S.RUN_SCHEMA if not meta else ""))
    if meta and not schema_name.startswith("gradprobe.run/"):
        raise LogError(f"{path}: {S.META_FILE} is not gradprobe run metadata (schema {schema_name!r})")
    if meta and schema_name != S.RUN_SCHEMA:
        major = schema_name.split("/")[-1]
        if major != S.RUN_SCHEMA.split("/")[-1]:
            raise LogError(f"{path}: run log schema {schema_name!r} is newer than this gradprobe understands ({S.RUN_SCHEMA})")

    steps_path = os.path.join(path, S.STEPS_FILE)
    if not os.path.exists(steps_path):
        if not has_meta:
            raise LogError(f"{path}: not a gradprobe run directory (no {S.META_FILE} or {S.STEPS_FILE})")
        steps_df = normalize_steps(pd.DataFrame())
    else:
        tbl = read_stream(steps_path, skipped)
        if tbl is None:
            if not meta:
                raise LogError(f"{path}: {skipped[-1] if skipped else 'unreadable run log'}")
            steps_df = normalize_steps(pd.DataFrame())
        else:
            conformed = conform(tbl, S.STEPS_SCHEMA, S.STEPS_FILE, skipped, all_required=False)
            steps_df = normalize_steps(conformed.to_pandas() if conformed is not None and conformed.num_columns else pd.DataFrame())
    if not meta and steps_df.empty:
        raise LogError(f"{path}: not a readable gradprobe log ({'; '.join(skipped) or 'no data'})")

    grads, weights = [], []
    for seg in meta.get("layer_segments", []) or []:
        try:
            seg_id = int(seg["id"])
            names = [str(layer["name"]) for layer in seg["layers"]]
        except (KeyError, TypeError, ValueError):
            skipped.append(f"{S.META_FILE}: malformed layer segment skipped")
            continue
        lp = os.path.join(path, S.layers_file(seg_id))
        if not os.path.exists(lp):
            continue
        tbl = read_stream(lp, skipped)
        if tbl is None or tbl.num_rows == 0:
            continue
        n = (tbl.num_columns - 1) // 2
        if n != len(names) or tbl.num_columns != 1 + 2 * n:
            skipped.append(f"{S.layers_file(seg_id)}: {n} layers on disk but {len(names)} in metadata; skipped")
            continue
        tbl = conform(tbl.rename_columns(S.layers_schema(n).names), S.layers_schema(n), S.layers_file(seg_id), skipped,
                      all_required=True)
        if tbl is None or tbl.num_rows == 0:
            continue
        idx = pd.Index(tbl.column(0).to_numpy(), name="step")
        g = np.column_stack([tbl.column(1 + i).to_numpy(zero_copy_only=False) for i in range(n)]) if n else np.empty((len(idx), 0), np.float32)
        w = np.column_stack([tbl.column(1 + n + i).to_numpy(zero_copy_only=False) for i in range(n)]) if n else np.empty((len(idx), 0), np.float32)
        grads.append(pd.DataFrame(g, index=idx, columns=names))
        weights.append(pd.DataFrame(w, index=idx, columns=names))
    if grads:
        layer_grad = pd.concat(grads).fillna(S.MISSING) if len(grads) > 1 else grads[0]
        layer_weight = pd.concat(weights).fillna(S.MISSING) if len(weights) > 1 else weights[0]
        layer_grad = layer_grad[~layer_grad.index.duplicated(keep="last")]
        layer_weight = layer_weight[~layer_weight.index.duplicated(keep="last")]
    else:
        layer_grad = pd.DataFrame(index=pd.Index([], name="step", dtype=np.int64))
        layer_weight = pd.DataFrame(index=pd.Index([], name="step", dtype=np.int64))

    samples = _empty_samples()
    sp = os.path.join(path, S.SAMPLES_FILE)
    if os.path.exists(sp):
        tbl = read_stream(sp, skipped)
        if tbl is not None and tbl.num_rows:
            tbl = conform(tbl, _SAMPLE_FIELDS, S.SAMPLES_FILE, skipped, all_required=True)
        if tbl is not None and tbl.num_rows:
            samples = tbl.to_pandas()
            for c in ("probe", "target", "stat"):
                samples[c] = samples[c].astype(object)
    scalars = _empty_scalars()
    scp = os.path.join(path, S.SCALARS_FILE)
    if os.path.exists(scp):
        tbl = read_stream(scp, skipped)
        if tbl is not None and tbl.num_rows:
            tbl = conform(tbl, _SCALAR_FIELDS, S.SCALARS_FILE, skipped, all_required=True)
        if tbl is not None and tbl.num_rows:
            scalars = tbl.to_pandas()
            scalars["name"] = scalars["name"].astype(object)
    events = read_events(os.path.join(path, S.EVENTS_FILE), skipped)
    for e in events:
        for k, v in list(e.items()):
            e[k] = _parse_json_value(v, text=k in _EVENT_TEXT_FIELDS)
    return RunLog(
        meta=meta,
        steps=steps_df,
        layer_grad=layer_grad,
        layer_weight=layer_weight,
        samples=samples,
        scalars=scalars,
        events=events,
        source={"path": path, "kind": "gradprobe", "steps": int(len(steps_df)), "skipped": skipped},
    )


def finite_or_none(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
