"""Every CUDA check of the recorder in one command, with a table at the end.

    python benchmarks/gpu_check.py [--budget 420] [--json out.json]

On one GPU it takes under 8 minutes (``--budget`` seconds for the overhead rounds, the rest
~1 min) and checks:

* **overhead** of the default profile vs the unwatched loop on the LSTM and the Transformer
  of ``benchmarks/overhead.py`` (the same blocks, paired ratios and A/A control; target
  <= 1.02x);
* **host syncs added per step**, counted with ``torch.cuda.set_sync_debug_mode("warn")``
  on the training thread (target 0; syncs on gradprobe's writer thread, which waits for its
  own copy, are listed apart);
* **bit-identical parameters** watched vs unwatched (deterministic algorithms on; an LSTM
  with dropout and an MLP with SGD momentum);
* a **float16 GradScaler** run whose skipped steps are recorded exactly;
* **DistributedDataParallel over NCCL**, world size 1: steps recorded, the local gradient
  norm (before the all-reduce) equal to the reduced one;
* **CUDA memory** recorded (``memory_kind`` ``cuda_allocated``, the allocator's figure);
* **clipping by its effect** on the GPU: a clip written by hand and ``clip_grad_norm_``
  give the same post-clip norms and the run's clip is named with its ``max_norm``.

Exit status: 0 when every check passes, 1 otherwise. On a machine without CUDA it says so
and exits 0. ``--device cpu`` runs the same harness on the CPU (what needs CUDA is reported
as n/a), to test the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable

#: paired median ratio (default profile over unwatched) the overhead checks must meet
OVERHEAD_TARGET = 1.02
#: the overhead blocks' rounds: at least, at most (each round is one block per mode)
MIN_ROUNDS, MAX_ROUNDS = 3, 25
#: steps of the sync count, bit-identity, scaler, DDP and memory runs
CHECK_STEPS = 60


def _row(name: str, result: str, target: str, ok: bool | None) -> dict[str, Any]:
    return {"check": name, "result": result, "target": target, "status": "n/a" if ok is None else "pass" if ok else "FAIL"}


# --------------------------------------------------------------------------- overhead ------
def check_overhead(bench: Any, device: str, budget: float, tmp: str, models: list[str], *,
                   min_rounds: int = MIN_ROUNDS, block: int | None = None) -> list[dict[str, Any]]:
    """Blocks of benchmarks/overhead.py (baseline, baseline-repeat, gradprobe-default) in a
    shuffled order per round, rounds until the model's share of ``budget`` is spent."""
    rows = []
    modes = ["baseline", "baseline-repeat", "gradprobe-default"]
    rnd = random.Random(0)
    for name in models:
        case = bench.make_case(name, device)
        if block is not None:
            case["block"] = block
        for mode in modes:  # warm-up: every code path once (cuDNN plans, the writer, ...)
            bench.run_block({**case, "block": 3}, mode, tmp)
        times: dict[str, list[float]] = {m: [] for m in modes}
        deadline = time.perf_counter() + budget / len(models)
        while len(times["baseline"]) < MAX_ROUNDS and (len(times["baseline"]) < min_rounds or time.perf_counter() < deadline):
            order = modes[:]
            rnd.shuffle(order)
            for mode in order:
                times[mode].append(bench.run_block(case, mode, tmp)[0])
        med, lo, hi = bench.paired(times["gradprobe-default"], times["baseline"])
        aa = bench.paired(times["baseline-repeat"], times["baseline"])
        rows.append(_row(
            f"overhead {name} (default profile)",
            f"{med:.3f}x [{lo:.3f}-{hi:.3f}], A/A {aa[0]:.3f}, {len(times['baseline'])} rounds, "
            f"{statistics.median(times['baseline']) * 1e3:.2f} ms/step unwatched",
            f"<= {OVERHEAD_TARGET}x", med <= OVERHEAD_TARGET))
    return rows


# --------------------------------------------------------------------------- syncs ---------
@contextlib.contextmanager
def _sync_warnings(found: list[tuple[str, str]]):
    """Records (thread name, where) of each synchronisation warning of torch's sync debug
    mode while the block runs."""
    import torch

    orig = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message).lower():
            found.append((threading.current_thread().name, f"{filename}:{lineno}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = orig


def check_syncs(bench: Any, device: str, tmp: str, models: list[str]) -> list[dict[str, Any]]:
    """Synchronisations per step on the training thread: watched (default profile, its first
    step sampled) minus unwatched, over the same steps."""
    import gradprobe
    from gradprobe.config import ProbeConfig
    from gradprobe.schedule import Schedule

    if not device.startswith("cuda"):
        return [_row("host syncs added per step", "needs CUDA", "0", None)]
    rows = []
    for name in models:
        case = bench.make_case(name, device)
        bench.train_steps(case, 3)
        counts = {}
        other: list[tuple[str, str]] = []
        for mode in ("baseline", "watched"):
            found: list[tuple[str, str]] = []
            with _sync_warnings(found):
                if mode == "baseline":
                    bench.train_steps(case, CHECK_STEPS)
                else:
                    cfg = ProbeConfig(schedule=Schedule(every=bench.INTERVAL, early_until=0))
                    with gradprobe.watch(case["model"], case["opt"], logdir=tempfile.mkdtemp(dir=tmp), config=cfg):
                        bench.train_steps(case, CHECK_STEPS)
            counts[mode] = sum(1 for t, _ in found if t == threading.main_thread().name)
            if mode == "watched":
                other = [(t, w) for t, w in found if t != threading.main_thread().name]
        added = (counts["watched"] - counts["baseline"]) / CHECK_STEPS
        detail = f"{added:.3f} ({counts['watched']} watched, {counts['baseline']} unwatched in {CHECK_STEPS} steps)"
        if other:
            detail += f"; {len(other)} on other threads (e.g. {other[0][0]} at {other[0][1]})"
        rows.append(_row(f"host syncs added per step, {name}", detail, "0", added <= 0))
    return rows


# ------------------------------------------------------------------------ bit identity -----
@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels for the block (cuBLAS's workspace is set when the script starts:
    ``CUBLAS_WORKSPACE_CONFIG`` counts only before CUDA is initialised)."""
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _bit_run(kind: str, device: str, logdir: str | None) -> list[Any]:
    import torch
    import torch.nn as nn

    import gradprobe

    torch.manual_seed(0)
    if kind == "lstm":
        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lstm = nn.LSTM(8, 32, num_layers=2, dropout=0.2, batch_first=True)
                self.head = nn.Linear(32, 1)

            def forward(self, x: Any) -> Any:
                return self.head(self.lstm(x)[0])

        model: nn.Module = Net().to(device)
        opt: Any = torch.optim.Adam(model.parameters(), lr=1e-3)
        shape = (16, 20, 8)
    else:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        shape = (64, 32)
    g = torch.Generator(device="cpu").manual_seed(1)
    probe = gradprobe.watch(model, opt, logdir=logdir, profile="full") if logdir else None
    try:
        for _ in range(CHECK_STEPS // 2):
            x = torch.randn(*shape, generator=g).to(device)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        if probe is not None:
            probe.close()
    return [p.detach().cpu().clone() for p in model.parameters()] + [torch.randn(3, device=device).cpu()]


def check_bit_identical(device: str, tmp: str) -> list[dict[str, Any]]:
    import torch

    rows = []
    for kind in ("lstm", "mlp"):
        with _deterministic():
            a, b = _bit_run(kind, device, None), _bit_run(kind, device, None)
            w = _bit_run(kind, device, tempfile.mkdtemp(dir=tmp))
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            rows.append(_row(f"bit-identical parameters, {kind}", "the unwatched run itself is not deterministic here", "equal", None))
            continue
        same = len(w) == len(a) and all(torch.equal(x, y) for x, y in zip(a, w))
        rows.append(_row(f"bit-identical parameters, {kind} (every step sampled)", "equal" if same else "DIFFERENT", "equal", same))
    return rows


# ------------------------------------------------------------------------- GradScaler ------
def check_scaler(device: str, tmp: str) -> list[dict[str, Any]]:
    """float16 autocast with a GradScaler that starts far too high: the steps it skips are
    the steps recorded as skipped."""
    import torch
    import torch.nn as nn

    import gradprobe

    torch.manual_seed(0)
    dev = torch.device(device)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**40, growth_interval=5)
    expected = []
    logdir = tempfile.mkdtemp(dir=tmp)
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir, profile="light"):
        for _ in range(CHECK_STEPS):
            x = torch.randn(64, 32, device=dev)
            with torch.autocast(dev.type, dtype=torch.float16):
                loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = scaler.get_scale()  # a sync of the check's own, after the step's work
            scaler.step(opt)
            scaler.update()
            expected.append(scaler.get_scale() < before)
    log = gradprobe.RunLog.load(logdir)
    got = log.steps["skipped"].tolist()
    ok = got == expected and 0 < sum(expected) < len(expected)
    return [_row("float16 GradScaler: skipped steps recorded", f"{sum(got)} recorded, {sum(expected)} skipped of {len(expected)}",
                 "equal, > 0", ok)]


# ---------------------------------------------------------------------------- DDP ---------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_ddp(device: str, tmp: str) -> list[dict[str, Any]]:
    """DistributedDataParallel over NCCL (gloo with ``--device cpu``), world size 1, in this
    process: every step recorded, the local gradient norm equal to the reduced one."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    import gradprobe

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        return [_row("DDP over NCCL, world size 1", "NCCL not available in this torch", "recorded", False)]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        dev = torch.device(device)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(dev)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        logdir = tempfile.mkdtemp(dir=tmp)
        with gradprobe.watch(ddp, opt, logdir=logdir, profile="light"):
            for _ in range(CHECK_STEPS // 2):
                opt.zero_grad()
                ddp(torch.randn(32, 16, device=dev)).pow(2).mean().backward()
                opt.step()
        st = gradprobe.RunLog.load(logdir).steps
    finally:
        dist.destroy_process_group()
    local, total = st["local_grad_norm"].to_numpy(), st["grad_norm"].to_numpy()
    ok = len(st) == CHECK_STEPS // 2 and bool(np.isfinite(local).all()) and bool(np.allclose(local, total, rtol=1e-4))
    return [_row(f"DDP over {backend.upper()}, world size 1", f"{len(st)} steps; local/reduced norm max ratio "
                 f"{float(np.nanmax(local / total)) if len(st) else float('nan'):.6f}", "recorded, local = reduced", ok)]


# ------------------------------------------------------------------------- memory ---------
def check_memory(device: str, tmp: str) -> list[dict[str, Any]]:
    """The memory column is the CUDA allocator's figure: it follows what the loop allocates."""
    import torch
    import torch.nn as nn

    import gradprobe

    if not device.startswith("cuda"):
        return [_row("CUDA memory recorded", "needs CUDA", "cuda_allocated", None)]
    dev = torch.device(device)
    model = nn.Linear(256, 256).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    held, seen = [], []
    logdir = tempfile.mkdtemp(dir=tmp)
    with gradprobe.watch(model, opt, logdir=logdir, profile="light"):
        for i in range(CHECK_STEPS // 2):
            if i % 5 == 0:
                held.append(torch.empty(8 * 2**20, device=dev))  # 32 MiB more every 5 steps
            opt.zero_grad()
            model(torch.randn(64, 256, device=dev)).sum().backward()
            opt.step()
            seen.append(torch.cuda.memory_allocated(dev))
    log = gradprobe.RunLog.load(logdir)
    mem = log.steps["memory"].to_numpy()
    grew = mem[-1] - mem[0]
    ok = log.meta.get("memory_kind") == "cuda_allocated" and grew >= 0.8 * (seen[-1] - seen[0]) > 0
    return [_row("CUDA memory recorded", f"{log.meta.get('memory_kind')}: {mem[0] / 2**20:.0f} -> {mem[-1] / 2**20:.0f} MiB "
                 f"(allocator {seen[0] / 2**20:.0f} -> {seen[-1] / 2**20:.0f} MiB)", "cuda_allocated, follows the allocator", ok)]


# -------------------------------------------------------------------- clip by effect ------
def check_clip_effect(device: str, tmp: str) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    import torch.nn as nn

    import gradprobe
    from gradprobe.probe.rescaling import CLIP, classify_log

    dev = torch.device(device)
    max_norm = 0.05

    def by_hand(params: list[Any]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        with torch.no_grad():
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)

    def run(clip: Callable[[list[Any]], Any]) -> Any:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        logdir = tempfile.mkdtemp(dir=tmp)
        g = torch.Generator(device="cpu").manual_seed(2)
        with gradprobe.watch(model, opt, logdir=logdir, profile="light"):
            for _ in range(CHECK_STEPS // 2):
                x = torch.randn(64, 16, generator=g).to(dev)
                opt.zero_grad()
                (model(x).pow(2).mean() * 100).backward()
                clip(list(model.parameters()))
                opt.step()
        return gradprobe.RunLog.load(logdir)

    hand = run(by_hand)
    patched = run(lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm))
    rh, rp = classify_log(hand), classify_log(patched)
    same = bool(np.allclose(hand.steps["step_grad_norm"], patched.steps["step_grad_norm"], rtol=1e-4))
    ok = rh.kind == rp.kind == CLIP and same and abs((rh.max_norm or 0) / max_norm - 1) < 1e-3
    return [_row("clipping by its effect (by hand vs clip_grad_norm_)",
                 f"{rh.kind} at {rh.max_norm or float('nan'):.4g} / {rp.kind} at {rp.max_norm or float('nan'):.4g}; "
                 f"post-clip norms {'equal' if same else 'DIFFER'}", f"clip at {max_norm}, equal", ok)]


# ---------------------------------------------------------------------------- main --------
def _load_overhead() -> Any:
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead.py")
    spec = importlib.util.spec_from_file_location("gradprobe_overhead_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    widths = [max(len(str(r[k])) for r in rows + [{"check": "check", "result": "result", "target": "target", "status": "status"}])
              for k in ("check", "result", "target", "status")]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(header)
    print(line.format("check", "result", "target", "status"))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(r["check"], r["result"], r["target"], r["status"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to test the harness")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the overhead rounds (both models)")
    ap.add_argument("--models", default="lstm,transformer", help="models of benchmarks/overhead.py to time")
    ap.add_argument("--json", help="write the table as JSON to this file")
    ap.add_argument("--min-rounds", type=int, default=MIN_ROUNDS, help=argparse.SUPPRESS)  # harness tests
    ap.add_argument("--block", type=int, default=None, help=argparse.SUPPRESS)  # harness tests: steps per block
    args = ap.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (bit-identity check)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}): nothing to check; run it on a machine with a GPU.")
        return 0
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
        header = f"gradprobe GPU checks on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        header = f"gradprobe GPU checks, harness test on the CPU (torch {torch.__version__}): CUDA-only checks are n/a"
    t0 = time.perf_counter()
    bench = _load_overhead()
    models = [m for m in args.models.split(",") if m]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (
            ("syncs", lambda: check_syncs(bench, args.device, tmp, models)),
            ("bit-identical", lambda: check_bit_identical(args.device, tmp)),
            ("scaler", lambda: check_scaler(args.device, tmp)),
            ("ddp", lambda: check_ddp(args.device, tmp)),
            ("memory", lambda: check_memory(args.device, tmp)),
            ("clip", lambda: check_clip_effect(args.device, tmp)),
            ("overhead", lambda: check_overhead(bench, args.device, args.budget, tmp, models,
                                                min_rounds=args.min_rounds, block=args.block)),
        ):
            t = time.perf_counter()
            try:
                got = fn()
            except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
                got = [_row(name, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}", "-", False)]
            print(f"gpu_check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            rows += got
    print_table(rows, f"{header}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
