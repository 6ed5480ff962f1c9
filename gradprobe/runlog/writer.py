"""The run-directory writer: a background thread that owns every file of a run.

The training thread only hands over host arrays (``put_*``); Arrow record batches, the
JSON event lines and the TensorBoard protobufs are built and written here, off the
training thread. Each hand-over is written and flushed to the OS at once, so a killed
process loses only what the training thread had not handed over yet (at most
``ProbeConfig.flush_seconds``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import tempfile
import threading
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from gradprobe.runlog import schema as S


def json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


#: non-finite floats are written as these strings (strict JSON has no NaN/Infinity)
NONFINITE_STRINGS = frozenset({"NaN", "Infinity", "-Infinity"})
#: prefix of a *string* that would otherwise read back as a float (or starts with it)
STRING_ESCAPE = "\x00"


def dumps(obj: Any) -> str:
    """JSON with NaN/Inf written as strings, so every line stays strict JSON. A string that
    reads "NaN"/"Infinity"/"-Infinity" (or starts with the escape) is written with a leading
    NUL, so that it reads back as the string it was."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        if isinstance(v, str) and (v in NONFINITE_STRINGS or v.startswith(STRING_ESCAPE)):
            return STRING_ESCAPE + v
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(obj), default=json_default, ensure_ascii=False)


def write_json_atomic(path: str, obj: Any) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".gradprobe-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, default=json_default, ensure_ascii=False))
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _Stream:
    """One append-only Arrow IPC stream file."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.file = open(path, "wb")
        self.sink = pa.PythonFile(self.file, mode="w")
        self.writer = pa.ipc.new_stream(self.sink, schema, options=S.IPC_OPTIONS)
        self.schema = schema
        self.file.flush()

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch)
        self.file.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.file.close()


class RunWriter:
    """Owns the files of one run directory; all writes happen on its thread.

    Its Python loops (resolving a batch of steps, building TensorBoard summaries) yield the
    GIL every few steps with ``time.sleep(0)``: a thread waiting for the GIL otherwise waits
    up to the interpreter's switch interval (5 ms), and the training thread takes the GIL
    back after every GIL-releasing call (``backward``) while this thread is busy.

    Args:
        logdir: the run directory (created).
        meta: initial metadata (``gradprobe.json``).
        tensorboard: also write TensorBoard events.
        tb_layers_every: see :class:`gradprobe.config.ProbeConfig`.
        on_error: called with the exception if writing fails (the writer then stops).
        live: the run's :class:`gradprobe.live.LiveChecks` (``stop_on``): fed each batch of
            steps on this thread as it is written; None when the run is never stopped.
    """

    def __init__(
        self,
        logdir: str,
        meta: dict[str, Any],
        *,
        tensorboard: bool = True,
        tb_layers_every: int = 10,
        on_error: Callable[[BaseException], None] | None = None,
        live: Any = None,
    ) -> None:
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.meta = dict(meta)
        self._tb_enabled = tensorboard
        self._tb_layers_every = tb_layers_every
        self._on_error = on_error
        self.live = live
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._layer_names: dict[int, list[str]] = {}
        # a new run in a reused directory starts its own event log (every stream restarts)
        self._events = open(os.path.join(logdir, S.EVENTS_FILE), "w", encoding="utf-8")
        self._tb: Any = None
        self.failed: BaseException | None = None
        write_json_atomic(os.path.join(logdir, S.META_FILE), self.meta)
        self._thread = threading.Thread(target=self._run, name="gradprobe-writer", daemon=True)
        self._thread.start()

    # ---- training-thread side: cheap hand-overs -------------------------------------------
    def put_batch(self, pending: Any) -> None:
        """Hands over a :class:`gradprobe.probe.buffer.PendingBatch` (resolved here)."""
        self._q.put(("batch", pending))

    def put_steps(self, cols: dict[str, Any]) -> None:
        self._q.put(("steps", cols))

    def put_layers(self, segment: int, steps: np.ndarray, grad: np.ndarray, weight: np.ndarray, sampled: np.ndarray) -> None:
        self._q.put(("layers", segment, steps, grad, weight, sampled))

    def put_samples(self, rows: list[tuple[int, str, str, str, int, float]]) -> None:
        if rows:
            self._q.put(("samples", rows))

    def put_scalars(self, rows: list[tuple[int, str, float]]) -> None:
        if rows:
            self._q.put(("scalars", rows))

    def put_event(self, event: dict[str, Any]) -> None:
        self._q.put(("event", event))

    def put_meta(self, meta: dict[str, Any]) -> None:
        self._q.put(("meta", dict(meta)))

    def put_text(self, tag: str, markdown: str, step: int) -> None:
        self._q.put(("text", tag, markdown, step))

    def sync(self, timeout: float = 30.0) -> bool:
        """Blocks until everything handed over so far is written. Returns False on timeout."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self._q.put(("sync", done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._q.put(("close",))
            self._thread.join(timeout)

    # ---- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            msg = self._q.get()
            kind = msg[0]
            if self.failed is not None:
                if kind == "sync":
                    msg[1].set()
                if kind == "close":
                    return
                continue
            try:
                if kind == "close":
                    self._close_files()
                    return
                if kind == "sync":
                    self._flush_files()
                    msg[1].set()
                    continue
                getattr(self, "_on_" + kind)(*msg[1:])
            except BaseException as exc:  # noqa: BLE001 - reported, never raised into training
                self.failed = exc
                if kind == "sync":
                    msg[1].set()
                if self._on_error is not None:
                    try:
                        self._on_error(exc)
                    except Exception:  # noqa: BLE001
                        pass

    def _tensorboard(self) -> Any:
        if self._tb is None and self._tb_enabled:
            from gradprobe.runlog.tensorboard import TensorBoardOutput

            self._tb = TensorBoardOutput(self.logdir)
        return self._tb

    def _stream(self, name: str, schema: pa.Schema) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            st = self._streams[name] = _Stream(os.path.join(self.logdir, name), schema)
        return st

    def _on_batch(self, pending: Any) -> None:
        cols, (steps, grad, weight, sampled), samples, scalars = pending.resolve()
        if len(steps):
            self._on_steps(cols)
            if pending.n_layers:
                self._on_layers(pending.segment, steps, grad, weight, sampled)
        if samples:
            self._on_samples(samples)
        if scalars:
            self._on_scalars(scalars)

    def _on_steps(self, cols: dict[str, Any]) -> None:
        if self.live is not None:  # first: the stop is confirmed after a sync, which waits for this write
            self.live.feed(cols)
        arrays = []
        for name, typ, _ in S.STEP_COLUMNS:
            arrays.append(pa.array(cols[name], type=typ))
        batch = pa.RecordBatch.from_arrays(arrays, schema=S.STEPS_SCHEMA)
        self._stream(S.STEPS_FILE, S.STEPS_SCHEMA).write(batch)
        tb = self._tensorboard()
        if tb is not None:
            tb.steps(cols)

    def _on_layers(self, segment: int, steps: np.ndarray, grad: np.ndarray, weight: np.ndarray, sampled: np.ndarray) -> None:
        n = grad.shape[1]
        schema = S.layers_schema(n)
        arrays = [pa.array(steps, type=pa.int64())]
        arrays += [pa.array(grad[:, i], type=pa.float32()) for i in range(n)]
        arrays += [pa.array(weight[:, i], type=pa.float32()) for i in range(n)]
        self._stream(S.layers_file(segment), schema).write(pa.RecordBatch.from_arrays(arrays, schema=schema))
        tb = self._tensorboard()
        if tb is not None:
            names = self._segment_names(segment, n)
            tb.layers(steps, names, grad, self._tb_layers_every, sampled)

    def _segment_names(self, segment: int, n: int) -> list[str]:
        for seg in self.meta.get("layer_segments", []):
            if seg.get("id") == segment:
                return [layer["name"] for layer in seg["layers"]]
        return [f"layer{i}" for i in range(n)]

    def _on_samples(self, rows: list[tuple[int, str, str, str, int, float]]) -> None:
        cols = list(zip(*rows))
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(cols[0], type=pa.int64()),
                pa.array(cols[1], type=pa.string()).dictionary_encode(),
                pa.array(cols[2], type=pa.string()).dictionary_encode(),
                pa.array(cols[3], type=pa.string()).dictionary_encode(),
                pa.array(cols[4], type=pa.int32()),
                pa.array(cols[5], type=pa.float64()),
            ],
            schema=S.SAMPLES_SCHEMA,
        )
        self._stream(S.SAMPLES_FILE, S.SAMPLES_SCHEMA).write(batch)
        tb = self._tensorboard()
        if tb is not None:
            tb.samples(rows)

    def _on_scalars(self, rows: list[tuple[int, str, float]]) -> None:
        steps, names, values = zip(*rows)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(steps, type=pa.int64()),
                pa.array(names, type=pa.string()).dictionary_encode(),
                pa.array(values, type=pa.float64()),
            ],
            schema=S.SCALARS_SCHEMA,
        )
        self._stream(S.SCALARS_FILE, S.SCALARS_SCHEMA).write(batch)
        tb = self._tensorboard()
        if tb is not None:
            tb.scalars(np.asarray(steps), list(names), np.asarray(values, dtype=np.float64))

    def _on_event(self, event: dict[str, Any]) -> None:
        self._events.write(dumps(event) + "\n")
        self._events.flush()

    def _on_meta(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        write_json_atomic(os.path.join(self.logdir, S.META_FILE), meta)

    def _on_text(self, tag: str, markdown: str, step: int) -> None:
        tb = self._tensorboard()
        if tb is not None:
            tb.text(tag, markdown, step)
            tb.flush()

    def _flush_files(self) -> None:
        self._events.flush()
        for st in self._streams.values():
            st.file.flush()
        if self._tb is not None:
            self._tb.flush()

    def _close_files(self) -> None:
        for st in self._streams.values():
            st.close()
        self._streams.clear()
        self._events.close()
        if self._tb is not None:
            self._tb.close()
