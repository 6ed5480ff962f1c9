"""TensorBoard output: the gradprobe dashboard, written with tensorboard's own writer.

``tensorboard --logdir RUN_DIR`` shows a *Custom Scalars* dashboard (:data:`LAYOUT`) with no
extra step. Per-step values of one step go into a single event with one summary value per
tag, so the writer thread does one protobuf per step, not one per tag.

Readable through a blow-up. TensorBoard scales a chart linearly to its largest value: one
finite spike (a gradient norm of 1e30 before the NaN) flattens everything else to a line at
zero, "ignore outliers" included (smoothing spreads the spike over many points). NaN and Inf
do not rescale a chart (TensorBoard draws them as markers). So the raw values keep their
tags (the Scalars dashboard, and gradprobe's own reader, read them) and the dashboard's
charts of magnitudes that span decades (gradient norms, loss, GradScaler scale, update
ratios) plot their log10 under :data:`LOG10_PREFIX`, where 1e30 is 30 and NaN, Inf and
values <= 0 are left out (the non-finite chart counts them).

Charts only for signals the run has: state age, graphs alive, non-finite counts and skipped
steps are written from the first step that has one (a run without a carried state has no
state-age series at all), and when the run closes the layout is written again with only the
charts that have data (the last layout written is the one TensorBoard shows).
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any, Iterable

import google_crc32c
import numpy as np

# tag -> steps.arrow column (written every step)
STEP_TAGS: dict[str, str] = {
    "gradprobe/grad_norm/preclip": "grad_norm",
    "gradprobe/grad_norm/after_clip": "step_grad_norm",
    "gradprobe/grad_norm/max_norm": "clip_max_norm",
    "gradprobe/loss/train": "loss",
    "gradprobe/loss/eval": "eval_loss",
    "gradprobe/lr": "lr",
    "gradprobe/amp/scale": "scale",
    "gradprobe/amp/skipped": "skipped",
    "gradprobe/state/age_steps": "state_age",
    "gradprobe/state/graphs_alive": "graphs_alive",
    "gradprobe/time/step_seconds": "step_time",
    "gradprobe/time/backward_seconds": "backward_time",
    "gradprobe/memory/bytes": "memory",
    "gradprobe/nonfinite/grad_layers": "grad_nonfinite_layers",
    "gradprobe/nonfinite/param_layers": "param_nonfinite_layers",
    "gradprobe/weights/norm": "weight_norm",
}

#: step tags whose NaN means "not measured this step" (no clip call, no evaluation, no scaler)
_NAN_IS_ABSENT = frozenset({"gradprobe/grad_norm/max_norm", "gradprobe/loss/eval", "gradprobe/amp/scale"})

LAYER_GRAD_PREFIX = "gradprobe/layer_grad_norm/"
LAYER_RATIO_PREFIX = "gradprobe/update_ratio/"
USER_PREFIX = "gradprobe/user/"
BPTT_PREFIX = "gradprobe/bptt/"
FINDINGS_TAG = "gradprobe/findings"

#: the log10 copy of a raw tag: ``gradprobe/log10/grad_norm/preclip`` (gradprobe's reader
#: ignores these: the raw tag is read)
LOG10_PREFIX = "gradprobe/log10/"
#: raw tags whose log10 the dashboard charts (magnitudes that span decades)
LOG10_TAGS = frozenset({
    "gradprobe/grad_norm/preclip", "gradprobe/grad_norm/after_clip", "gradprobe/grad_norm/max_norm",
    "gradprobe/loss/train", "gradprobe/loss/eval", "gradprobe/amp/scale",
})
#: step tags written only from the first step where they are not zero (a run that never
#: carried a state, never had a non-finite parameter, has no such series)
_ZERO_IS_ABSENT = frozenset({"gradprobe/state/age_steps", "gradprobe/state/graphs_alive",
                             "gradprobe/nonfinite/grad_layers", "gradprobe/nonfinite/param_layers"})


def log10_tag(tag: str) -> str:
    return LOG10_PREFIX + tag[len("gradprobe/"):]


#: chart -> the tags (regular expressions) it plots; a chart is shown when one of them has data
CHARTS: dict[str, list[str]] = {
    "Gradient norm vs max_norm (log10)": [log10_tag("gradprobe/grad_norm/preclip"), log10_tag("gradprobe/grad_norm/after_clip"),
                                          log10_tag("gradprobe/grad_norm/max_norm")],
    "Loss (log10)": [log10_tag("gradprobe/loss/train"), log10_tag("gradprobe/loss/eval"), LOG10_PREFIX + r"user/.*loss.*"],
    "Loss": ["gradprobe/loss/train", "gradprobe/loss/eval", r"gradprobe/user/.*loss.*"],
    "Learning rate": ["gradprobe/lr"],
    "GradScaler scale (log10) and skipped steps": [log10_tag("gradprobe/amp/scale"), "gradprobe/amp/skipped"],
    "State age (steps a carried graph reaches back)": ["gradprobe/state/age_steps", "gradprobe/state/graphs_alive"],
    "Per-layer gradient norms (log10)": [LOG10_PREFIX + "layer_grad_norm/.*"],
    "Update-to-weight ratio (log10)": [LOG10_PREFIX + "update_ratio/.*"],
    "Gradient horizon through time": [BPTT_PREFIX + ".*horizon"],
    "Non-finite layers": ["gradprobe/nonfinite/grad_layers", "gradprobe/nonfinite/param_layers"],
    "Step and backward time (s)": ["gradprobe/time/step_seconds", "gradprobe/time/backward_seconds"],
    "Memory (bytes)": ["gradprobe/memory/bytes"],
    "User scalars": [USER_PREFIX + ".*"],
}
#: charts of the layout written when the run starts (before the run shows what it has):
#: those every run has; the layout written at close adds the others that have data
START_CHARTS = ("Gradient norm vs max_norm (log10)", "Loss (log10)", "Learning rate", "Per-layer gradient norms (log10)",
                "Step and backward time (s)", "Memory (bytes)")
#: the raw "Loss" chart is shown only for a loss that is sometimes <= 0 (no log10 there)
_RAW_LOSS_ONLY_IF = "nonpositive loss"


def layout(charts: Any = None) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout of ``charts`` (default: every chart)."""
    names = list(CHARTS) if charts is None else [c for c in CHARTS if c in set(charts)]
    return {"gradprobe": {c: ["Multiline", list(CHARTS[c])] for c in names}}


#: every chart (the documentation and the dashboard test list it)
LAYOUT = layout()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (the checksum tensorboard's own reader verifies)."""
    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _fast_checksums(file_writer: Any) -> None:
    """Frames this writer's records with google-crc32c's C implementation of CRC32C.

    TensorBoard's ``RecordWriter`` checksums every record in pure Python: 68 us for one
    step's event (553 bytes, 16 tags), holding the GIL, on the background thread that
    competes with the training for the CPU; the C implementation takes 0.3 us.
    The framing is ``RecordWriter.write``'s, byte for byte: only this writer's instance gets
    it (nothing global is patched). Where the C implementation or the writer's layout is
    not there (another tensorboard version), the writer is left as it is.
    """
    try:
        record_writer = file_writer.event_writer._async_writer._writer
        sink = record_writer._writer
    except AttributeError:
        return
    if google_crc32c.implementation != "c" or not callable(getattr(sink, "write", None)):
        return

    def write(data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        sink.write(header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data)))

    record_writer.write = write


def _log10(v: float) -> float | None:
    return math.log10(v) if math.isfinite(v) and v > 0 else None


def _is_user_loss(tag: str) -> bool:
    return tag.startswith(USER_PREFIX) and "loss" in tag[len(USER_PREFIX):].lower()


class TensorBoardOutput:
    """Writes gradprobe summaries into ``logdir`` (owned by the writer thread)."""

    def __init__(self, logdir: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self._Summary = Summary
        self.writer = SummaryWriter(log_dir=logdir, flush_secs=1, max_queue=100)
        self.writer.add_custom_scalars(layout(START_CHARTS))
        self._file_writer = self.writer._get_file_writer()
        _fast_checksums(self._file_writer)
        #: tags written with at least one value, and facts the final layout needs
        self.written: set[str] = set()
        self._facts: set[str] = set()
        self._last_step = 0

    def _emit(self, step: int, values: Iterable[tuple[str, float]], walltime: float | None = None) -> None:
        vals = []
        for t, v in values:
            v = float(v)
            vals.append(self._Summary.Value(tag=t, simple_value=v))
            self.written.add(t)
            if t.startswith(LAYER_GRAD_PREFIX) or t.startswith(LAYER_RATIO_PREFIX) or _is_user_loss(t):
                lg = _log10(v)
                if lg is not None:
                    lt = log10_tag(t)
                    vals.append(self._Summary.Value(tag=lt, simple_value=lg))
                    self.written.add(lt)
        if vals:
            self._last_step = max(self._last_step, int(step))
            self._file_writer.add_summary(self._Summary(value=vals), int(step), walltime)

    def charts(self) -> list[str]:
        """The charts that have data so far."""
        import re

        out = []
        for chart, patterns in CHARTS.items():
            if chart == "Loss" and _RAW_LOSS_ONLY_IF not in self._facts:
                continue
            rx = [re.compile(p) for p in patterns]
            if any(r.fullmatch(t) for r in rx for t in self.written):
                out.append(chart)
        return out

    def steps(self, cols: dict[str, Any]) -> None:
        n = len(cols["step"])
        Value = self._Summary.Value
        columns = []
        scale_absent = None
        for tag, c in STEP_TAGS.items():
            if c not in cols:
                continue
            raw = cols[c]
            none = [v is None for v in raw] if any(v is None for v in raw) else None
            vals = np.asarray([math.nan if v is None else v for v in raw] if none else raw, dtype=np.float64)
            if tag in _ZERO_IS_ABSENT and tag not in self.written:
                with np.errstate(invalid="ignore"):
                    if not (vals > 0).any():
                        continue  # not yet a signal of this run
            # absent signals are not NaN values: no point is written for them
            with np.errstate(invalid="ignore"):
                skip = np.isnan(vals) if tag in _NAN_IS_ABSENT else (vals < 0) if tag == "gradprobe/nonfinite/param_layers" else None
            if tag == "gradprobe/amp/scale":
                scale_absent = np.isnan(vals)
            if tag == "gradprobe/amp/skipped" and scale_absent is not None:
                skip = scale_absent  # skipped steps exist only where a GradScaler does
            if none:
                skip = np.asarray(none) if skip is None else (skip | np.asarray(none))
            if skip is not None and skip.all():
                continue
            columns.append((tag, vals.tolist(), skip.tolist() if skip is not None and skip.any() else None))
            self.written.add(tag)
            if tag in LOG10_TAGS:
                with np.errstate(all="ignore"):
                    lg = np.where(np.isfinite(vals) & (vals > 0), np.log10(np.where(vals > 0, vals, 1.0)), np.nan)
                    if tag.startswith("gradprobe/loss/") and (np.isfinite(vals) & (vals <= 0)).any():
                        self._facts.add(_RAW_LOSS_ONLY_IF)
                lskip = np.isnan(lg)
                if not lskip.all():
                    columns.append((log10_tag(tag), lg.tolist(), lskip.tolist() if lskip.any() else None))
                    self.written.add(log10_tag(tag))
        steps = np.asarray(cols["step"], dtype=np.int64).tolist()
        if steps:
            self._last_step = max(self._last_step, max(steps))
        walls = np.asarray(cols["wall_time"], dtype=np.float64).tolist()
        add = self._file_writer.add_summary
        Summary = self._Summary
        for i in range(n):
            if i % 16 == 15:
                time.sleep(0)  # let the training thread take the GIL back (see RunWriter)
            vals = [Value(tag=tag, simple_value=v[i]) for tag, v, skip in columns if skip is None or not skip[i]]
            if vals:
                add(Summary(value=vals), steps[i], walls[i])

    def layers(self, steps: np.ndarray, names: list[str], grad: np.ndarray, every: int, sampled: np.ndarray) -> None:
        for i, s in enumerate(steps):
            if not (sampled[i] or (every > 0 and int(s) % every == 0)):
                continue
            vals = [
                (LAYER_GRAD_PREFIX + name, v)
                for name, v in zip(names, grad[i])
                if not (v == -1.0)
            ]
            self._emit(int(s), vals)

    def scalars(self, steps: np.ndarray, names: list[str], values: np.ndarray) -> None:
        for s, n, v in zip(steps, names, values):
            self._emit(int(s), [(USER_PREFIX + str(n), float(v))])

    def samples(self, rows: list[tuple[int, str, str, str, int, float]]) -> None:
        """Deep-probe samples: scalars for horizons and update ratios, histograms for the
        gradient-through-time profile (bucket t = steps back, count = norm / peak)."""
        profiles: dict[tuple[int, str], list[tuple[int, float]]] = {}
        for step, probe, target, stat, index, value in rows:
            if probe == "bptt" and stat == "profile":
                profiles.setdefault((step, target), []).append((index, value))
            elif probe == "bptt" and stat in ("horizon", "growth_per_step", "lookback"):
                self._emit(step, [(f"{BPTT_PREFIX}{target}/{stat}", value)])
            elif probe == "update" and stat == "ratio":
                self._emit(step, [(LAYER_RATIO_PREFIX + target, value)])
        for (step, target), pts in profiles.items():
            pts.sort()
            norms = np.array([v for _, v in pts], dtype=np.float64)
            finite = norms[np.isfinite(norms)]
            peak = float(finite.max()) if finite.size else 0.0
            if peak <= 0:
                continue
            counts = np.where(np.isfinite(norms), norms / peak, 0.0)
            limits = [float(t) + 0.5 for t, _ in pts]
            self.writer.add_histogram_raw(
                f"{BPTT_PREFIX}{target}/profile",
                min=float(pts[0][0]),
                max=float(pts[-1][0]),
                num=float(counts.sum()),
                sum=float(sum(t * c for (t, _), c in zip(pts, counts))),
                sum_squares=float(sum(t * t * c for (t, _), c in zip(pts, counts))),
                bucket_limits=limits,
                bucket_counts=counts.tolist(),
                global_step=step,
            )

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def write_layout(self) -> None:
        """The layout of the charts that have data, at the last step (it replaces the one
        written at the start: TensorBoard shows the latest)."""
        from torch.utils.tensorboard.summary import custom_scalars

        charts = self.charts()
        if charts:
            self._file_writer.add_summary(custom_scalars(layout(charts)), self._last_step + 1)

    def close(self) -> None:
        try:
            self.write_layout()
        except Exception:  # noqa: BLE001 - the data is written; the start layout stays
            pass
        self.writer.close()


def findings_event(report: Any, step: int | None = None) -> Any:
    """The TensorBoard event holding ``report`` as Markdown text (tag :data:`FINDINGS_TAG`):
    the text plugin's own summary format, built from tensorboard's protos (no torch)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    text = report.to_markdown()
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=FINDINGS_TAG, metadata=meta, tensor=tensor)])
    at = int(report.source.get("steps", 0) or 0) if step is None else int(step)
    return event_pb2.Event(wall_time=time.time(), step=at, summary=summary)


def write_findings(logdir: str, report: Any) -> None:
    """Adds ``report``'s findings to the TensorBoard output of the run directory ``logdir``
    as text (tag :data:`FINDINGS_TAG`, at the report's last step), in an event file of its
    own (``*.findings``) next to the recorder's: called downstream of the recorder, where a
    report is made (``Probe.report``, ``gradprobe run``), open or closed run alike. Never
    raises: the report stands without its TensorBoard copy."""
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        w = EventFileWriter(logdir, filename_suffix=".findings")
        try:
            w.add_event(findings_event(report))
        finally:
            w.close()
    except Exception:  # noqa: BLE001 - the report is still returned
        pass
