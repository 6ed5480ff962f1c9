"""Writers of real-format foreign logs for the reader tests: each uses the format's own
writer where it is installed (HF's ``TrainerState.save_to_json``, Lightning's CSV experiment
writer, TensorBoard's writer through torch's ``SummaryWriter``, MLflow's client)."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
from typing import Any, Iterator

from torch.utils.tensorboard import SummaryWriter


def write_state(path: str, history: list[dict[str, Any]], **header: Any) -> str:
    """Writes a trainer state the way ``TrainerState.save_to_json`` does (bare NaN/Infinity)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        from transformers import TrainerState
    except ImportError:  # same format: json.dumps(asdict(state), indent=2, sort_keys=True)
        state = {"global_step": header.get("global_step", 0), "log_history": history, "logging_steps": 1, **header}
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return path
    state = TrainerState(**{"logging_steps": 1, **header})
    state.log_history = history
    state.save_to_json(path)
    return path



def train_history(n: int = 20, *, eval_every: int = 5, lr0: float = 1e-3, decay: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in range(1, n + 1):
        lr = lr0 * (1 - (s - 1) / n) if decay else lr0
        out.append({"epoch": s / 8, "grad_norm": 0.5 + 0.01 * s, "learning_rate": lr, "loss": 4.0 - 0.05 * s, "step": s})
        if eval_every and s % eval_every == 0:
            out.append({"epoch": s / 8, "eval_loss": 4.1 - 0.05 * s, "eval_runtime": 0.01, "step": s})
    out.append({"epoch": n / 8, "step": n, "total_flos": 1e6, "train_loss": 3.6, "train_runtime": 1.2,
                "train_samples_per_second": 100.0, "train_steps_per_second": 10.0})
    return out



def write_metrics(log_dir: str, rows: list[tuple[int, dict[str, Any]]]) -> str:
    """Writes ``metrics.csv`` like ``CSVLogger`` (sparse rows, sorted header, CRLF)."""
    os.makedirs(log_dir, exist_ok=True)
    try:
        from lightning.fabric.loggers.csv_logs import _ExperimentWriter
    except ImportError:
        keys = sorted({k for _, m in rows for k in m} | {"step"})
        path = os.path.join(log_dir, "metrics.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for step, m in rows:
                w.writerow({**m, "step": step})
        return path
    writer = _ExperimentWriter(log_dir)
    for i, (step, m) in enumerate(rows):
        writer.log_metrics(m, step)
        if i % 7 == 6:
            writer.save()  # the header grows as new keys appear, as in a real fit
    writer.save()
    return writer.metrics_file_path



def fit_rows(steps_per_epoch: int = 8, epochs: int = 3, lr: float = 0.01) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for e in range(epochs):
        for b in range(steps_per_epoch):
            s = e * steps_per_epoch + b
            rows.append((s, {"lr-Adam": lr}))
            rows.append((s, {"epoch": e, "train_loss_step": 5.0 / (s + 1), "grad_2.0_norm_total": 2.0 + s,
                             "grad_2.0_norm/net.0.weight": 1.0 + s, "grad_2.0_norm/net.0.bias": 0.5}))
        last = (e + 1) * steps_per_epoch - 1
        rows.append((last, {"epoch": e, "val_loss": 3.0 - e}))
        rows.append((last, {"epoch": e, "train_loss_epoch": 4.0 - e}))
    return rows



def write_run(logdir: str, series: dict[str, list[tuple[int, float]]], *, suffix: str = "") -> str:
    """Writes scalars with SummaryWriter; returns the event file's path."""
    w = SummaryWriter(log_dir=logdir, filename_suffix=suffix)
    events = sorted((step, tag, value) for tag, pts in series.items() for step, value in pts)
    for step, tag, value in events:
        w.add_scalar(tag, value, global_step=step)
    w.close()
    files = sorted(glob.glob(os.path.join(logdir, "*tfevents*")), key=os.path.getmtime)
    return files[-1]



def hf_style(n: int = 20, eval_every: int = 5) -> dict[str, list[tuple[int, float]]]:
    """The tags transformers' TensorBoardCallback writes (logging_steps=1)."""
    return {
        "train/loss": [(s, 4.0 - 0.05 * s) for s in range(1, n + 1)],
        "train/grad_norm": [(s, 0.5 + 0.01 * s) for s in range(1, n + 1)],
        "train/learning_rate": [(s, 1e-3 * (1 - s / (n + 1))) for s in range(1, n + 1)],
        "train/epoch": [(s, s / 8) for s in range(1, n + 1)],
        "eval/loss": [(s, 4.1 - 0.05 * s) for s in range(eval_every, n + 1, eval_every)],
        "eval/runtime": [(s, 0.01) for s in range(eval_every, n + 1, eval_every)],
        "train/train_loss": [(n, 3.5)],
    }


# ------------------------------------------------------------------------------ MLflow ----
@contextlib.contextmanager
def mlflow_store(uri: str) -> Iterator[Any]:
    """MLflow pointed at ``uri`` (``file:<dir>`` or ``sqlite:///<db>``) for the block; MLflow 3
    writes a file store only when asked (``MLFLOW_ALLOW_FILE_STORE``)."""
    import mlflow

    old_uri = mlflow.get_tracking_uri()
    old_env = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = old_env


def train_logged_to_mlflow(mlflow: Any, *, lr: float = 0.05, steps: int = 40, seed: int = 0, loss_key: str = "train/loss",
                           run_name: str | None = None, max_norm: float | None = None, eval_every: int = 10,
                           experiment: str | None = None) -> str:
    """A real tiny regression trained with SGD, logged the way a user's loop logs to MLflow:
    params, and per step the loss, the lr and the gradient norm (``clip_grad_norm_``'s
    return), an eval loss every ``eval_every`` steps. A huge ``lr`` diverges to inf/NaN.
    Returns the run id."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w = torch.randn(4, 1)
    x_val = torch.randn(64, 4)
    exp_id = None
    if experiment is not None:  # not set_experiment: it would stay active for the next test
        found = mlflow.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else mlflow.create_experiment(experiment)
    with mlflow.start_run(run_name=run_name, experiment_id=exp_id) as run:
        params = {"lr": lr, "optimizer": "SGD", "batch_size": 32}
        if max_norm is not None:
            params["max_grad_norm"] = max_norm
        mlflow.log_params(params)
        for step in range(steps):
            x = torch.randn(32, 4)
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else float("inf"))
            opt.step()
            metrics = {loss_key: loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": norm.item()}
            if eval_every and (step + 1) % eval_every == 0:
                with torch.no_grad():
                    metrics["val_loss"] = float(torch.nn.functional.mse_loss(model(x_val), x_val @ w))
            mlflow.log_metrics(metrics, step=step)
        return run.info.run_id


# ------------------------------------------------------------------- TensorFlow-style ----
def write_tf2_run(logdir: str, series: dict[str, list[tuple[int, float]]]) -> str:
    """Writes scalars as TensorFlow 2 writes them (``tf.summary.scalar``, Keras' TensorBoard
    callback), with TensorBoard's own event writer: a ``DT_FLOAT`` scalar tensor in
    ``tensor_content`` with ``scalars`` plugin metadata, in an ``*.v2`` file (the protos
    TensorFlow 2.21 wrote, checked once against real ``tf.summary`` and Keras files; TensorFlow
    itself is not a test dependency: installed, it makes TensorBoard's reader import it, 10 s a
    process). Returns the file's path."""
    import struct
    import time

    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    w = EventFileWriter(logdir, filename_suffix=".v2")
    for step, tag, value in sorted((s, t, v) for t, pts in series.items() for s, v in pts):
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                        tensor_content=struct.pack("<f", value))
        w.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)])))
    w.close()
    return sorted(glob.glob(os.path.join(logdir, "*tfevents*.v2")), key=os.path.getmtime)[-1]
