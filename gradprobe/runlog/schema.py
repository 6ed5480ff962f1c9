"""The run directory's record schema (documented for users in docs/run-log.md).

A run directory holds::

    gradprobe.json      versioned metadata (schema "gradprobe.run/1"), rewritten atomically
    steps.arrow         one row per step (Arrow IPC stream, LZ4, one record batch per flush)
    layers-<k>.arrow    per-layer gradient and weight norms, one row per step; a new segment
                        <k> starts when the set of watched parameters changes
    samples.arrow       sampled deep-probe statistics in long form
    scalars.arrow       user scalars from ``probe.log(name=value)``
    events.jsonl        rare events: configuration, exceptions, misuse, autocast changes
    events.out.tfevents.*   TensorBoard event files with the gradprobe dashboard

Every stream is append-only; a reader stops at the first unreadable record batch and says
what it skipped, so a killed run's log analyzes as far as it was written.
"""

from __future__ import annotations

import pyarrow as pa

RUN_SCHEMA = "gradprobe.run/1"
META_FILE = "gradprobe.json"
STEPS_FILE = "steps.arrow"
SAMPLES_FILE = "samples.arrow"
SCALARS_FILE = "scalars.arrow"
EVENTS_FILE = "events.jsonl"


def layers_file(segment: int) -> str:
    return f"layers-{segment}.arrow"


#: The recorder keeps one no-grad loss stream per call site of the loss function (see
#: :mod:`gradprobe.probe.forward`): stream 0 (the first call site of the run) is the
#: ``eval_loss`` column, stream ``k`` >= 1 the scalar ``eval_loss/<k>``; an evaluation after the
#: last recorded step is the scalar of its stream (``eval_loss/0`` for stream 0). The metadata's
#: ``eval_streams`` lists every stream: its ``name`` and ``site`` (the call chain, innermost first).
EVAL_STREAM_PREFIX = "eval_loss/"


def eval_stream_name(k: int) -> str:
    return f"{EVAL_STREAM_PREFIX}{k}"


#: Missing per-layer value (no gradient that step, or not measured). Norms are >= 0, and a
#: non-finite norm (inf/nan) is the per-layer non-finite flag, so -1 is unambiguous.
MISSING = -1.0

# Columns of steps.arrow, in order, with their Arrow types and meaning.
STEP_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("step", pa.int64(), "step index: one scaler.update(), or one optimizer.step() per optimizer"),
    ("wall_time", pa.float64(), "unix time when the step closed"),
    ("step_time", pa.float32(), "seconds since the previous step closed (host clock)"),
    ("backward_time", pa.float32(), "host seconds spent inside backward calls this step"),
    ("n_backward", pa.int32(), "backward calls this step"),
    ("loss", pa.float32(), "sum of the root tensors passed to backward, unscaled (NaN: none)"),
    ("loss_nonfinite", pa.bool_(), "a backward root was NaN/Inf"),
    ("loss_fn", pa.float32(), "sum of loss-function outputs computed with grad enabled"),
    ("loss_fn_nonfinite", pa.bool_(), "a loss-function output with grad enabled was NaN/Inf"),
    ("eval_loss", pa.float32(), "mean of loss-function outputs computed without grad at the first call site (stream 0; NaN: none)"),
    ("grad_norm", pa.float32(), "total 2-norm of the gradients after the last backward, before clipping, unscaled"),
    ("step_grad_norm", pa.float32(), "total 2-norm of the gradients the optimizer stepped with (after clipping, whoever clipped), unscaled"),
    ("grad_nonfinite_layers", pa.int32(), "parameters whose gradient norm was NaN/Inf"),
    ("clip_max_norm", pa.float32(), "max_norm of the observed clip_grad_norm_ call (NaN: none)"),
    ("clip_total_norm", pa.float32(), "total norm returned by clip_grad_norm_ (NaN: none)"),
    ("clip_calls", pa.int32(), "clip_grad_norm_ calls observed this step"),
    ("clip_on_scaled", pa.bool_(), "clipping ran on gradients still multiplied by the GradScaler scale"),
    ("lr", pa.float64(), "learning rate of the first parameter group of the first optimizer"),
    ("optimizer_steps", pa.int32(), "optimizer.step() calls that completed"),
    ("scale", pa.float32(), "GradScaler scale after update() (NaN: no scaler)"),
    ("scale_before", pa.float32(), "GradScaler scale the step's backward used (NaN: no scaler)"),
    ("skipped", pa.bool_(), "the GradScaler found inf/NaN gradients and skipped the step"),
    ("scaler_updated", pa.bool_(), "scaler.update() was called this step"),
    ("scale_tampered", pa.bool_(), "the scale was replaced or changed outside update()"),
    ("abandoned", pa.bool_(), "gradients were examined, then discarded without an optimizer step or update"),
    ("param_nonfinite_layers", pa.int32(), "parameters NaN/Inf after the optimizer step (-1: not measured)"),
    ("weight_norm", pa.float32(), "total 2-norm of the parameters after the step (NaN: not measured)"),
    ("state_age", pa.int32(), "steps back the autograd graph of a tensor entering a watched module reaches (max)"),
    ("state_age_module", pa.string(), "module that received the oldest graph (null: none)"),
    ("graphs_alive", pa.int32(), "graphs of steps at least 2 steps old still alive (retained)"),
    ("retain_graph", pa.bool_(), "a backward this step used retain_graph=True"),
    ("memory", pa.int64(), "bytes: CUDA allocated memory on GPU, process RSS on CPU"),
    ("local_grad_norm", pa.float32(), "DistributedDataParallel: this rank's gradient norm before the all-reduce (NaN: not DDP)"),
    ("data_nonfinite", pa.int32(), "data tensors holding NaN/Inf this step: the watched models' first tensor input on training forwards and the float targets of observed loss functions (-1: not measured)"),
    ("sampled", pa.bool_(), "the sampled deep probes ran on this step"),
    ("grad_change", pa.int32(), "how the gradients the optimizer stepped with differ from those the last backward left: 0 unchanged, 1 rescaled uniformly (a clip that fired, a constant factor), 2 changed otherwise (-1: not compared)"),
]

STEPS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in STEP_COLUMNS])

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64()),
        pa.field("probe", pa.dictionary(pa.int32(), pa.string())),
        pa.field("target", pa.dictionary(pa.int32(), pa.string())),
        pa.field("stat", pa.dictionary(pa.int32(), pa.string())),
        pa.field("index", pa.int32()),
        pa.field("value", pa.float64()),
    ]
)

SCALARS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64()),
        pa.field("name", pa.dictionary(pa.int32(), pa.string())),
        pa.field("value", pa.float64()),
    ]
)


def layers_schema(n_layers: int) -> pa.Schema:
    """Wide per-layer table: ``g<i>`` gradient norm before clipping (unscaled), ``w<i>``
    weight norm after the optimizer step; ``MISSING`` where not measured."""
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(f"g{i}", pa.float32()) for i in range(n_layers)]
    fields += [pa.field(f"w{i}", pa.float32()) for i in range(n_layers)]
    return pa.schema(fields)


#: the run's streams, written live: a small record batch per hand-over (~45 steps every 0.5 s
#: on an MLP) on the probe's writer thread, next to the training. LZ4 takes a fifth of zstd's
#: CPU on such a batch (a 45-row batch of steps: 114 vs 601 us) for files ~8% larger, and
#: ``use_threads=False`` keeps Arrow's thread pool (50% more CPU in all, on extra threads) off
#: the cores the training uses. Readers take any codec: older zstd logs read the same.
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
#: tables written whole, once: zstd, the smaller files
TABLE_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")
