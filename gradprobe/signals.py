"""Which signals a log provides; rules declare what they require and are skipped otherwise.

A gradprobe run directory provides every per-step signal of docs/run-log.md (a zero in
``state_age`` is a measurement). Logs written by other programs provide only what their
columns hold: their readers list them in ``meta["signals"]``. Sampled signals are present
when the log holds such samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradprobe.runlog import RunLog

#: signal -> what it means (documentation and ``gradprobe rules``)
SIGNALS: dict[str, str] = {
    "loss": "training loss per step",
    "eval_loss": "validation/eval loss (probe.log(val_loss=...), eval loss functions, a log's eval_loss)",
    "grad_norm": "total gradient norm per step",
    "layer_grad": "per-layer gradient norms per step",
    "weights": "weight norms and parameter finiteness after each optimizer step",
    "lr": "learning rate per step",
    "optimizer": "optimizer class and hyperparameters",
    "clip": "observed clip_grad_norm_ calls (max_norm, pre-clip norm)",
    "scaler": "GradScaler scale, skipped steps and configuration (recorded even when absent)",
    "loss_scale": "an AMP loss scale or skipped-step marker from a foreign log",
    "autocast": "autocast dtype in force per module",
    "state_age": "how many steps back a tensor entering a module reaches; retained graphs",
    "memory": "memory per step",
    "timing": "step and backward time per step",
    "events": "exceptions, misuse and configuration events",
    "update_ratio": "sampled per-layer update-to-weight ratios",
    "activations": "sampled activation statistics (scale, saturation, dead units)",
    "gates": "sampled recurrent gate saturation",
    "inputs": "sampled input statistics",
    "targets": "sampled target statistics",
    "data_finiteness": "NaN/Inf entries counted in each step's data (model input, loss targets)",
    "bptt": "sampled gradient-through-time profiles of recurrent modules",
    "duplicates": "raw log records (to find duplicated steps)",
    "ranks": "several ranks' logs of one distributed run (checked across ranks)",
}

RECORDER_SIGNALS = frozenset(
    {"loss", "grad_norm", "layer_grad", "weights", "lr", "optimizer", "clip", "scaler", "autocast",
     "state_age", "memory", "timing", "events"}
)

_SAMPLE_SIGNALS = {
    "update_ratio": ("update",),
    "activations": ("activation",),
    "gates": ("gates",),
    "inputs": ("input", "first_layer"),
    "targets": ("target",),
    "bptt": ("bptt",),
}


def available_signals(log: "RunLog") -> set[str]:
    kind = log.source.get("kind", "gradprobe")
    declared = log.meta.get("signals")
    if declared is not None:
        out = set(declared)
    elif kind == "gradprobe":
        out = set(RECORDER_SIGNALS)
    else:
        out = set()
    st = log.steps
    if len(st):
        if "loss" not in out and (np.isfinite(st["loss"].to_numpy()).any() or st["loss_nonfinite"].any()):
            out.add("loss")
        if np.isfinite(st["eval_loss"].to_numpy()).any():
            out.add("eval_loss")
        if "grad_norm" not in out and (~np.isnan(st["grad_norm"].to_numpy())).any():
            out.add("grad_norm")
        if "lr" not in out and np.isfinite(st["lr"].to_numpy()).any():
            out.add("lr")
        if "data_nonfinite" in st and (st["data_nonfinite"].to_numpy() >= 0).any():
            out.add("data_finiteness")
    if not log.scalars.empty:
        names = set(log.scalars["name"].astype(str))
        if any(("val" in n.lower() or "eval" in n.lower() or "test" in n.lower()) and "loss" in n.lower() for n in names):
            out.add("eval_loss")
    if not log.samples.empty:
        probes = set(log.samples["probe"].astype(str).unique())
        for sig, ps in _SAMPLE_SIGNALS.items():
            if probes.intersection(ps):
                out.add(sig)
    if kind == "gradprobe" and len(log.layer_grad.columns) == 0:
        out.discard("layer_grad")
    return out
