"""Overhead of watching a run: baseline vs watched, in one process, alternating blocks.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead.py [--models lstm,mlp,transformer]
        [--rounds 5] [--device cpu|cuda] [--modes ...] [--clip function|hand|none] [--json out.json]

Each model trains in blocks of steps; every round runs one block per mode in a shuffled
order (baseline, gradprobe light = per-step signals only, gradprobe default = per-step
signals + deep probes at the default interval, and the peers: torch.autograd.detect_anomaly,
a naive per-parameter ``p.grad.norm().item()`` probe as Cockpit's GradNorm does, and
``wandb.watch(model, log="all", log_freq=1)`` offline when wandb is installed), and
``baseline-repeat``: the unwatched loop again, timed as if it were one more mode, an A/A
control whose distance from 1.000 is the run's own noise floor.

The figure is the median over rounds of the paired ratio (a mode's seconds per step over the
baseline's in the same round), with a bootstrap 90% interval of that median: the blocks of a
round run within seconds of each other, so a slow phase of a shared machine slows both sides
of a pair, where the ratio of the two overall medians (also written to ``--json``) takes the
full brunt of it. The share of CPU time the hypervisor stole while a model was measured
(``/proc/stat``) is printed with it: figures taken with much CPU stolen are noise. The same
paired ratio is printed for the CPU time of the whole process per step (``time.process_time``:
all threads, PyTorch's workers and gradprobe's writer included; the gradprobe blocks' CPU
figure includes writing the block's last records). Stolen time is not CPU time, so this figure
moves less with the machine's speed; it is a cost, not a wall-clock overhead (work on an idle
core costs CPU and no time). Steady
state: attaching and closing a probe (thread start, file creation, the final flush) happen once per
run and are timed apart and printed separately. A gradprobe block
opens a fresh probe whose schedule has no early burst (``early_until=0``), runs its first
step untimed (every mode does), and times steps 1..n, a multiple of the sampling interval, so
each block samples at exactly the steady-state rate.

Every loop clips at 1.0: with ``clip_grad_norm_`` (``--clip function``, the default), with
the same arithmetic written by hand (``--clip hand``: a rescale no patch sees, which the
probe measures by its effect: one more pass over the gradients per step), or not at all.

With ``--device cuda`` it also counts host-device synchronisations added per step with
``torch.cuda.set_sync_debug_mode("warn")`` (target: zero). It also reports the time Python's
garbage collector took per step in each mode (steps buffered for the writer must not keep
triggering collections of the whole process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn

import gradprobe
from gradprobe.config import ProbeConfig
from gradprobe.schedule import Schedule

INTERVAL = 50


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


class TransformerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def make_case(name: str, device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if name == "lstm":
        model: nn.Module = LSTMNet()
        x = torch.randn(64, 100, 32, generator=g)
        y = torch.randn(64, 100, 1, generator=g)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn: Callable[..., torch.Tensor] = nn.functional.mse_loss
        block = INTERVAL
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x = torch.randn(256, 512, generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.functional.cross_entropy
        block = 4 * INTERVAL
    elif name == "transformer":
        model = TransformerNet()
        x = torch.randn(32, 64, 128, generator=g)
        y = torch.randint(0, 10, (32, 64), generator=g)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(out.reshape(-1, 10), target.reshape(-1))

        block = INTERVAL
    else:
        raise SystemExit(f"unknown model {name}")
    model.to(device)
    return {"model": model, "opt": opt, "x": x.to(device), "y": y.to(device), "loss_fn": loss_fn, "block": block}


#: how the loops clip (``--clip``)
CLIP = {"how": "function"}


def clip_by_hand(params: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_``'s arithmetic written out: what a custom loop or DeepSpeed does."""
    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))


def train_steps(case: dict[str, Any], n: int, *, anomaly: bool = False, naive: bool = False) -> None:
    model, opt, x, y, loss_fn = case["model"], case["opt"], case["x"], case["y"], case["loss_fn"]
    how = CLIP["how"]
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        if anomaly:
            with torch.autograd.detect_anomaly():
                loss = loss_fn(model(x), y)
                loss.backward()
        else:
            loss = loss_fn(model(x), y)
            loss.backward()
        if naive:
            norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
            case.setdefault("naive_sink", []).append(sum(norms))
        if how == "function":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        elif how == "hand":
            clip_by_hand(list(model.parameters()), 1.0)
        opt.step()


#: one-time cost of attaching and closing a probe (seconds), per mode: measured apart from
#: the per-step figure, which is the steady state of a long run
ATTACH_CLOSE: dict[str, list[float]] = {}
#: time spent in Python's garbage collector (seconds) and steps, per mode: what the probe's
#: buffered records cost the process's GC (a full collection with torch imported: ~0.2 s)
GC_TIME: dict[str, list[float]] = {}
_gc_clock = {"t0": 0.0, "total": 0.0}


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_clock["t0"] = time.perf_counter()
    else:
        _gc_clock["total"] += time.perf_counter() - _gc_clock["t0"]


def run_block(case: dict[str, Any], mode: str, tmp: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) per timed step of one block."""
    gc_before = _gc_clock["total"]
    try:
        return _run_block(case, mode, tmp)
    finally:
        GC_TIME.setdefault(mode, [0.0, 0])
        GC_TIME[mode][0] += _gc_clock["total"] - gc_before
        GC_TIME[mode][1] += case["block"]


def _run_block(case: dict[str, Any], mode: str, tmp: str) -> tuple[float, float]:
    n = case["block"]
    if case["x"].is_cuda:
        torch.cuda.synchronize()
    if mode in ("gradprobe-light", "gradprobe-default"):
        # attaching, the first step (the layer table, the run directory's metadata, the
        # writer's TensorBoard file) and closing happen once per run: timed apart. The timed
        # steps 1..n hold exactly n / INTERVAL sampled steps, the steady-state rate.
        t0 = time.perf_counter()
        cfg = ProbeConfig(schedule=Schedule(every=INTERVAL, early_until=0), deep=(mode == "gradprobe-default"))
        probe = gradprobe.watch(case["model"], case["opt"], logdir=tempfile.mkdtemp(dir=tmp), config=cfg)
        t1, t2, c1 = _first_then_timed(case, lambda: train_steps(case, n), after_first=probe.flush)
        # the CPU figure includes the writer's work on the block's last records (written
        # after t2 while a long run would overlap them with training)
        probe.flush()
        c2 = time.process_time()
        t3 = time.perf_counter()
        probe.close()
        ATTACH_CLOSE.setdefault(mode, []).append((t1 - t0) + (time.perf_counter() - t3))
        return (t2 - t1) / n, (c2 - c1) / n
    if mode == "wandb":
        return _run_wandb_block(case, tmp)
    flags = {"baseline": {}, "baseline-repeat": {}, "detect_anomaly": {"anomaly": True}, "naive-item": {"naive": True}}.get(mode)
    if flags is None:
        raise SystemExit(f"unknown mode {mode}")

    def steps() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # detect_anomaly warns on every use
            train_steps(case, n, **flags)

    t1, t2, c1 = _first_then_timed(case, steps)
    return (t2 - t1) / n, (time.process_time() - c1) / n


def _first_then_timed(case: dict[str, Any], steps: Callable[[], None],
                      after_first: Callable[[], None] | None = None) -> tuple[float, float, float]:
    """One untimed first step (every mode runs it), ``after_first``, then ``steps()`` timed:
    (wall start, wall end, CPU start) around the timed steps, the device synchronised at both
    ends."""
    train_steps(case, 1)
    if after_first is not None:
        after_first()
    if case["x"].is_cuda:
        torch.cuda.synchronize()
    c1 = time.process_time()
    t1 = time.perf_counter()
    steps()
    if case["x"].is_cuda:
        torch.cuda.synchronize()
    return t1, time.perf_counter(), c1


def _run_wandb_block(case: dict[str, Any], tmp: str) -> tuple[float, float]:
    """``wandb.watch(model, log="all", log_freq=1)`` in an offline run, one ``run.log`` per
    step (what makes wandb.watch emit its histograms). As for gradprobe, starting the run
    (wandb's service process), the first step and finishing are timed apart; the CPU figure
    is this process's only: wandb's service process (``wandb-core``) is not counted."""
    import wandb

    n = case["block"]
    t0 = time.perf_counter()
    run = wandb.init(mode="offline", dir=tmp, reinit="finish_previous")
    wandb.watch(case["model"], log="all", log_freq=1)
    orig_step = case["opt"].step

    def step_and_log(*a: Any, **k: Any) -> Any:
        out = orig_step(*a, **k)
        run.log({"x": 0.0})
        return out

    case["opt"].step = step_and_log
    try:
        t1, t2, c1 = _first_then_timed(case, lambda: train_steps(case, n))
        c2 = time.process_time()
    finally:
        del case["opt"].step
        wandb.unwatch(case["model"])
        run.finish()
    ATTACH_CLOSE.setdefault("wandb", []).append((t1 - t0) + (time.perf_counter() - t2))
    return (t2 - t1) / n, (c2 - c1) / n


def count_syncs(case: dict[str, Any], tmp: str, steps: int = 2 * INTERVAL) -> dict[str, int]:
    """Host-device synchronisations per mode, counted by torch's sync debug mode."""
    out = {}
    for mode in ("baseline", "gradprobe-default"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if mode == "baseline":
                    train_steps(case, steps)
                else:
                    cfg = ProbeConfig(schedule=Schedule(every=INTERVAL, early_until=0))
                    with gradprobe.watch(case["model"], case["opt"], logdir=tempfile.mkdtemp(dir=tmp), config=cfg):
                        train_steps(case, steps)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out[mode] = sum(1 for x in w if "synchroniz" in str(x.message).lower())
    return out


def _stolen() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None


def paired(mode_times: list[float], base_times: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median over rounds of the per-round ratio mode / baseline, and a bootstrap 90%
    percentile interval of that median (2000 resamples of the rounds)."""
    r = np.asarray(mode_times) / np.asarray(base_times)
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, len(r), size=(2000, len(r)))], axis=1)
    return float(np.median(r)), float(np.percentile(meds, 5)), float(np.percentile(meds, 95))


def print_table(results: dict[str, Any], modes: list[str], key: str, title: str) -> None:
    """One table of paired ratios (``key``: ``paired`` or ``cpu_paired``) per model and mode,
    with the share of CPU stolen while the model was measured."""
    print(f"{title}: median paired ratio over rounds [bootstrap 90% interval]")
    print(f"{'model':<12} " + " ".join(f"{m:>22}" for m in modes if m != "baseline") + "   CPU stolen")
    for name, e in results["models"].items():
        cells = [f"{e[key][m][0]:.3f} [{e[key][m][1]:.3f}-{e[key][m][2]:.3f}]" for m in modes if m != "baseline"]
        stolen = f"{e['stolen_pct']:.0f}%" if e["stolen_pct"] is not None else "n/a"
        print(f"{name:<12} " + " ".join(f"{c:>22}" for c in cells) + f"   {stolen:>10}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lstm,mlp,transformer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="baseline,baseline-repeat,gradprobe-light,gradprobe-default,detect_anomaly,naive-item,wandb")
    ap.add_argument("--json", help="write the figures as JSON to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", choices=("function", "hand", "none"), default="function",
                    help="clip with clip_grad_norm_ (default), by hand (seen by its effect), or not")
    args = ap.parse_args(argv)
    CLIP["how"] = args.clip
    modes = args.modes.split(",")
    if "wandb" in modes:
        try:
            import wandb  # noqa: F401

            os.environ.setdefault("WANDB_SILENT", "true")
        except ImportError:
            modes.remove("wandb")
    rnd = random.Random(args.seed)
    results: dict[str, Any] = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(), "clip": args.clip,
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rounds": args.rounds, "models": {}}
    gc.callbacks.append(_gc_callback)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            case = make_case(name, args.device)
            for mode in modes:  # warm up every code path once
                run_block({**case, "block": 3}, mode, tmp)
            times: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            steal0 = _stolen()
            for r in range(args.rounds):
                order = modes[:]
                rnd.shuffle(order)
                for mode in order:
                    wall, cpu_s = run_block(case, mode, tmp)
                    times[mode].append(wall)
                    cpu[mode].append(cpu_s)
                print(f"{name} round {r + 1}/{args.rounds}: " + ", ".join(f"{m}={times[m][-1] * 1e3:.1f}ms/{cpu[m][-1] * 1e3:.1f}cpu" for m in modes), file=sys.stderr, flush=True)
            steal1 = _stolen()
            base = statistics.median(times["baseline"])
            entry = {"step_ms": {m: statistics.median(v) * 1e3 for m, v in times.items()},
                     "paired": {m: paired(v, times["baseline"], args.seed) for m, v in times.items()},
                     "ratio_of_medians": {m: statistics.median(v) / base for m, v in times.items()},
                     "cpu_ms": {m: statistics.median(v) * 1e3 for m, v in cpu.items()},
                     "cpu_paired": {m: paired(v, cpu["baseline"], args.seed) for m, v in cpu.items()},
                     "block_steps": case["block"],
                     "stolen_pct": (100.0 * (steal1[0] - steal0[0]) / max(steal1[1] - steal0[1], 1)
                                    if steal0 is not None and steal1 is not None else None)}
            if args.device.startswith("cuda"):
                entry["syncs_per_run"] = count_syncs(case, tmp)
            entry["gc_ms_per_step"] = {m: v[0] / max(v[1], 1) * 1e3 for m, v in GC_TIME.items()}
            GC_TIME.clear()
            results["models"][name] = entry
    results["attach_close_ms"] = {m: statistics.median(v) * 1e3 for m, v in ATTACH_CLOSE.items()}
    print_table(results, modes, "paired", "wall-clock time per step")
    print_table(results, modes, "cpu_paired", "CPU time of the whole process per step (all threads; "
                "time stolen by the hypervisor is not CPU time)")
    for m, v in results["attach_close_ms"].items():
        print(f"{m}: attach + close once per run, median {v:.0f} ms (not in the per-step figures)")
    for name, e in results["models"].items():
        print(f"{name}: garbage collector ms per step: " + ", ".join(f"{m} {v:.3f}" for m, v in e["gc_ms_per_step"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
