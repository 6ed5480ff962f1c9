"""TensorBoard output: the gradprobe dashboard, written with tensorboard's own writer.

``tensorboard --logdir RUN_DIR`` shows a *Custom Scalars* dashboard (layout below) with no
extra step. Per-step values of one step go into a single event with one summary value per
tag, so the writer thread does one protobuf per step, not one per tag.
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

LAYOUT: dict[str, dict[str, list[Any]]] = {
    "gradprobe": {
        "Gradient norm vs max_norm": [
            "Multiline",
            ["gradprobe/grad_norm/preclip", "gradprobe/grad_norm/after_clip", "gradprobe/grad_norm/max_norm"],
        ],
        "Loss": ["Multiline", ["gradprobe/loss/train", "gradprobe/loss/eval", r"gradprobe/user/.*loss.*"]],
        "Learning rate": ["Multiline", ["gradprobe/lr"]],
        "GradScaler scale and skipped steps": ["Multiline", ["gradprobe/amp/scale", "gradprobe/amp/skipped"]],
        "State age (steps a carried graph reaches back)": [
            "Multiline",
            ["gradprobe/state/age_steps", "gradprobe/state/graphs_alive"],
        ],
        "Per-layer gradient norms": ["Multiline", [LAYER_GRAD_PREFIX + ".*"]],
        "Update-to-weight ratio": ["Multiline", [LAYER_RATIO_PREFIX + ".*"]],
        "Gradient horizon through time": ["Multiline", [BPTT_PREFIX + ".*horizon"]],
        "Non-finite layers": [
            "Multiline",
            ["gradprobe/nonfinite/grad_layers", "gradprobe/nonfinite/param_layers"],
        ],
        "Time and memory": [
            "Multiline",
            ["gradprobe/time/step_seconds", "gradprobe/time/backward_seconds", "gradprobe/memory/bytes"],
        ],
        "User scalars": ["Multiline", [USER_PREFIX + ".*"]],
    }
}


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


class TensorBoardOutput:
    """Writes gradprobe summaries into ``logdir`` (owned by the writer thread)."""

    def __init__(self, logdir: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self._Summary = Summary
        self.writer = SummaryWriter(log_dir=logdir, flush_secs=1, max_queue=100)
        self.writer.add_custom_scalars(LAYOUT)
        self._file_writer = self.writer._get_file_writer()
        _fast_checksums(self._file_writer)

    def _emit(self, step: int, values: Iterable[tuple[str, float]], walltime: float | None = None) -> None:
        vals = [self._Summary.Value(tag=t, simple_value=float(v)) for t, v in values]
        if vals:
            self._file_writer.add_summary(self._Summary(value=vals), int(step), walltime)

    def steps(self, cols: dict[str, Any]) -> None:
        n = len(cols["step"])
        Value = self._Summary.Value
        columns = []
        for tag, c in STEP_TAGS.items():
            if c not in cols:
                continue
            raw = cols[c]
            none = [v is None for v in raw] if any(v is None for v in raw) else None
            vals = np.asarray([math.nan if v is None else v for v in raw] if none else raw, dtype=np.float64)
            # absent signals are not NaN values: no point is written for them
            with np.errstate(invalid="ignore"):
                skip = np.isnan(vals) if tag in _NAN_IS_ABSENT else (vals < 0) if tag == "gradprobe/nonfinite/param_layers" else None
            if none:
                skip = np.asarray(none) if skip is None else (skip | np.asarray(none))
            columns.append((tag, vals.tolist(), skip.tolist() if skip is not None and skip.any() else None))
        steps = np.asarray(cols["step"], dtype=np.int64).tolist()
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

    def close(self) -> None:
        self.writer.close()
