"""Speed and peak memory of the whole `gradprobe analyze` command on large logs.

    python benchmarks/analyze_speed.py [--steps 1000000] [--layers 200 --layer-steps 100000]

Writes two synthetic run directories (a 1,000,000-step log with a few layers and deep-probe
samples, and a 200-layer x 100,000-step log), then times `gradprobe analyze DIR --format json`
in a fresh subprocess (interpreter start and imports included) and reads its peak RSS from
`getrusage(RUSAGE_CHILDREN)`. Target on the 2-core dev machine: under 10 s and 2 GB each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthetic(n: int, layers: int, seed: int = 0) -> "object":
    import gradprobe

    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = (2.0 * np.exp(-t / max(n / 5, 1)) + 0.1 + 0.02 * rng.standard_normal(n)).astype(np.float32)
    grad = np.abs(1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)
    grad[n // 2] = 1e4  # one spike, so the rules have something to look at
    steps = {
        "step": t,
        "wall_time": 1.7e9 + t * 0.01,
        "step_time": np.full(n, 0.01, np.float32),
        "backward_time": np.full(n, 0.004, np.float32),
        "loss": loss,
        "loss_fn": loss,
        "grad_norm": grad,
        "step_grad_norm": np.minimum(grad, 1.0),
        "clip_max_norm": np.ones(n, np.float32),
        "clip_total_norm": grad,
        "clip_calls": np.ones(n, np.int32),
        "lr": np.full(n, 1e-3),
        "weight_norm": np.linspace(10, 11, n).astype(np.float32),
        "param_nonfinite_layers": np.zeros(n, np.int32),
        "memory": np.full(n, 5e8, np.int64),
        "sampled": (t % 50 == 0),
    }
    names = [f"block{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(layers)]
    lg = {name: np.abs(grad / np.sqrt(layers) * (1 + 0.1 * rng.standard_normal(n))).astype(np.float32) for name in names}
    lw = {name: np.full(n, 3.0, np.float32) for name in names}
    samples = []
    for s in range(0, n, 50 * max(1, n // 200_000)):
        for name in names[:8]:
            samples.append((s, "update", name, "ratio", 0, 1e-3))
    meta = {
        "optimizers": [{"index": 0, "class": "Adam", "param_groups": [{"lr": 1e-3, "weight_decay": 0.0, "eps": 1e-8}]}],
        "layer_segments": [{"id": 0, "first_step": 0, "layers": [{"name": nm, "module": nm.rsplit(".", 1)[0]} for nm in names]}],
    }
    return gradprobe.RunLog.build(steps, meta=meta, layer_grad=lg, layer_weight=lw, samples=samples)


_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t0
print(json.dumps({"rc": p.returncode, "seconds": dt, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stdout": p.stdout, "stderr": p.stderr[-2000:]}))
"""


def measure(path: str) -> dict[str, float]:
    """Wall time and peak RSS of one `gradprobe analyze` process, measured by a fresh
    intermediate process whose only child it is (so RUSAGE_CHILDREN is exact)."""
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "gradprobe", "analyze", path, "--format", "json", "--fail-on", "never"]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"analyze failed ({res['rc']}): {res['stderr']}")
    report = json.loads(res["stdout"])
    return {"seconds": round(res["seconds"], 2), "peak_rss_mb": round(res["peak_kb"] / 1024, 1),
            "steps": report["source"]["steps"], "findings": len(report["findings"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--layer-steps", type=int, default=100_000)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("long", args.steps, 4), ("wide", args.layer_steps, args.layers)]
        for name, n, layers in cases:
            d = os.path.join(tmp, name)
            t0 = time.perf_counter()
            synthetic(n, layers).save(d)
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            print(f"{name}: wrote {n} steps x {layers} layers ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            out[name] = measure(d)
            print(f"{name}: {out[name]}", file=sys.stderr)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
