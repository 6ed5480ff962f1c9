"""Where a watched run's time goes: the training thread's time inside gradprobe, sampled.

    python benchmarks/attribution.py [--models lstm,mlp,transformer] [--blocks 6] [--rate 200]

``overhead.py`` measures the overhead end to end, as a difference of two timings of the
whole step; on a shared machine whose speed moves by 10-30% from one second to the next
(CPU stolen by the hypervisor) that difference is noisier than the few percent it measures.
This script measures the probe's share directly. It trains each of ``overhead.py``'s models
under ``gradprobe.watch`` (default profile: per-step signals + deep probes every 50 steps,
no early burst) in a child process sampled by py-spy (``pip install py-spy``), wall-clock,
idle threads included, and splits the training thread's samples in two:

- inside gradprobe: the innermost gradprobe frame of the stack is gradprobe's own work
  (hooks, step closing, sampled probes), including the torch ops it calls;
- outside: no gradprobe frame, or the innermost one is one of ``gradprobe/probe/patches.py``'s
  wrappers calling the function it wraps (the user's ``backward``, ``clip_grad_norm_``, loss
  function, GradScaler call: the user's own work).

It prints ``1 + inside / outside`` with its binomial standard error, the gradprobe entry
points that took the time, and the CPU seconds of gradprobe's background threads (writer,
flusher, TensorBoard's event writer: every Python thread but the main one) per second of
training: work that competes with
PyTorch's threads for the cores.

Both sides of the split are sampled in the same seconds, so a slow phase of the machine
scales both alike: the ratio is stable to a few tenths of a percent where the end-to-end
figure moves by several percent. What it cannot see: costs the probe causes inside the
user's own ops (caches it evicts, background threads taking a core from an OpenMP region).
And the reverse: the first parallel op after a stretch of Python pays for waking PyTorch's
worker threads (under ``OMP_WAIT_POLICY=PASSIVE``); when that op is gradprobe's per-step data
check, the wake-up is counted inside gradprobe although the user's next op would otherwise
have paid it.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INTERVAL = 50
PATCHES = "(gradprobe/probe/patches.py:"


def child(model: str, blocks: int) -> None:
    """The sampled process: one watched run of ``model``, then its threads' CPU seconds."""
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import overhead

    import gradprobe
    from gradprobe.config import ProbeConfig
    from gradprobe.schedule import Schedule

    case = overhead.make_case(model, "cpu")
    overhead.train_steps(case, 3)
    cfg = ProbeConfig(schedule=Schedule(every=INTERVAL, early_until=0), deep=True)
    with tempfile.TemporaryDirectory() as tmp:
        with gradprobe.watch(case["model"], case["opt"], logdir=tmp, config=cfg):
            overhead.train_steps(case, 1)
            t0 = time.perf_counter()
            overhead.train_steps(case, blocks * case["block"])
            wall = time.perf_counter() - t0
            threads = _thread_cpu()
    print("threads", wall, *(f"{name}={cpu:.3f}" for name, cpu in threads.items()), flush=True)


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each Python thread but the main one, by name (``/proc/self/task``)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t is threading.main_thread() or t.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def split(raw: str) -> tuple[int, int, collections.Counter[str]]:
    """(outside, inside, inside by entry point) from py-spy's raw output."""
    outside = inside = 0
    where: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if not any(f.startswith("train_steps ") for f in frames):
            continue  # another thread, or the process starting and closing
        n = int(count)
        gp = [i for i, f in enumerate(frames) if "(gradprobe/" in f]
        if not gp:
            outside += n
            continue
        last = frames[gp[-1]]
        # a patches.py wrapper calling what it wraps (a Python callee, or the clip helper's
        # _foreach_norm spy calling the C original): the user's work
        if _passthrough(last, gp[-1] + 1 < len(frames)):
            outside += n
            continue
        inside += n
        where[frames[gp[0]].split(" (")[0] + " > " + last.split(" (")[0]] += n
    return outside, inside, where


def _passthrough(frame: str, has_callee: bool) -> bool:
    return PATCHES in frame and (has_callee or frame.split(" (")[0].endswith(".foreach_norm"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lstm,mlp,transformer")
    ap.add_argument("--blocks", type=int, default=6, help="blocks of overhead.py's size per model (LSTM/Transformer: 50 steps, MLP: 200)")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.blocks)
        return 0
    if shutil.which("py-spy") is None:
        print("attribution.py needs py-spy on PATH: pip install py-spy", file=sys.stderr)
        return 2
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "raw.txt")
            cmd = ["py-spy", "record", "--idle", "--threads", "--nonblocking", "--format", "raw",
                   "--rate", str(args.rate), "-o", raw, "--", sys.executable, os.path.abspath(__file__),
                   "--child", model, "--blocks", str(args.blocks)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(raw):
                print(f"{model}: py-spy failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            with open(raw) as f:
                outside, inside, where = split(f.read())
        threads = next((ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("threads ")), None)
        print(f"{model}: training thread samples outside gradprobe {outside}, inside {inside}: "
              f"{1 + inside / max(outside, 1):.4f}x (+-{inside ** 0.5 / max(outside, 1):.4f})")
        for entry, n in where.most_common(8):
            print(f"    {n:6d}  {entry}")
        if threads:
            wall = float(threads[0])
            cpu = dict(t.rsplit("=", 1) for t in threads[1:])
            bg = {k: float(v) for k, v in cpu.items()}
            print(f"    background threads: {sum(bg.values()) / wall * 100:.2f}% of a core during training ("
                  + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(bg.items())) + f"; {wall:.1f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
