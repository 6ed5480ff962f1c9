"""What ``gradprobe run`` adds to a training script's start, measured where the user feels it.

    python benchmarks/startup.py [--rounds 15] [--json FILE]

A script whose first lines are ``import torch`` is started two ways, interleaved round by
round (the order alternating): ``python SCRIPT`` and ``gradprobe run --no-report SCRIPT`` (the
installed console script, as a user types it). At the line right after its own
``import torch`` the script writes two numbers and exits:

* wall: seconds from just before the parent starts the process (``time.time()``) to that
  line, so the interpreter's start, gradprobe's own imports, its set-up of the run and the
  script's ``import torch`` all count;
* CPU: the process's own CPU time at that line (``time.process_time()``), which a busy
  machine disturbs less than wall time.

Bytecode: an installed package has its ``.pyc`` files (pip compiles them at install), so the
children run with ``PYTHONDONTWRITEBYTECODE`` removed from their environment and the caches
warmed by the first starts; ``--as-env`` keeps the environment's setting (this development
machine sets it, so every gradprobe module is compiled from source at every start: the
pessimistic case, torch's own bytecode being cached either way).

Each figure is the median over the rounds; the difference is the median of the per-round
paired differences, with its 25th-75th percentile range. The modules gradprobe itself has
imported by that line are listed (one extra run with ``GRADPROBE_BENCH_MODULES`` set), so a
heavy import (pandas, pyarrow, tensorboard, plotly) that creeps back into the start is named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

#: the script: the same for both ways of starting it
SCRIPT = """
import os, sys, time
import torch
t_wall, t_cpu = time.time(), time.process_time()
heavy, gp = [], []
if os.environ.get("GRADPROBE_BENCH_MODULES"):
    names = ("pandas", "pyarrow", "tensorboard", "plotly", "rich", "typer", "click", "psutil", "yaml")
    heavy = sorted(m for m in names if m in sys.modules)
    gp = sorted(m for m in sys.modules if m.startswith("gradprobe"))
with open(os.environ["GRADPROBE_BENCH_OUT"], "w") as f:
    f.write(repr((t_wall, t_cpu, heavy, gp)))
"""

#: the heavy modules that gradprobe run must not import before they are needed
HEAVY = ("pandas", "pyarrow", "tensorboard", "plotly")


def gradprobe_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m gradprobe``."""
    exe = os.path.join(os.path.dirname(sys.executable), "gradprobe")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "gradprobe"]


def start(cmd: list[str], env: dict[str, str], out: str) -> tuple[float, float, list[str], list[str]]:
    """(wall seconds to the line after ``import torch``, CPU seconds there, heavy modules
    loaded, gradprobe modules loaded) of one start."""
    if os.path.exists(out):
        os.remove(out)
    t0 = time.time()
    proc = subprocess.run(cmd, env={**env, "GRADPROBE_BENCH_OUT": out}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-800:]}")
    with open(out) as f:
        t_wall, t_cpu, mods, gp = eval(f.read(), {"__builtins__": {}})  # noqa: S307 - our own repr of floats and strings
    return t_wall - t0, t_cpu, mods, gp


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="pairs of starts (default 15)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--as-env", action="store_true", help="keep PYTHONDONTWRITEBYTECODE as the environment has it")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    if not args.as_env:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="gradprobe-startup-") as tmp:
        script = os.path.join(tmp, "train.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        out = os.path.join(tmp, "line.txt")
        ways = {
            "python": [sys.executable, script],
            "gradprobe run": [*gradprobe_command(), "run", "--no-report", "--logdir", os.path.join(tmp, "runs"), script],
        }
        for cmd in ways.values():  # warm the page cache for both
            start(cmd, env, out)
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        for i in range(args.rounds):
            for name in (list(ways) if i % 2 == 0 else list(reversed(ways))):
                wall, cpu, _, _ = start(ways[name], env, out)
                rows[name].append((wall, cpu))
        _, _, heavy, gp_mods = start(ways["gradprobe run"], {**env, "GRADPROBE_BENCH_MODULES": "1"}, out)
    for k, idx in (("wall", 0), ("cpu", 1)):
        a = [r[idx] for r in rows["python"]]
        b = [r[idx] for r in rows["gradprobe run"]]
        d = [y - x for x, y in zip(a, b)]
        fig = {"python_s": statistics.median(a), "gradprobe_run_s": statistics.median(b),
               "diff_s": statistics.median(d), "diff_p25_s": percentile(d, 0.25), "diff_p75_s": percentile(d, 0.75)}
        results[k] = fig
        print(f"{k:4s} at the line after import torch: python {fig['python_s']:.3f} s  gradprobe run "
              f"{fig['gradprobe_run_s']:.3f} s  difference {fig['diff_s']:+.3f} s "
              f"[{fig['diff_p25_s']:+.3f}, {fig['diff_p75_s']:+.3f}]", flush=True)
    results["loaded_at_that_line"] = heavy
    results["gradprobe_modules"] = gp_mods
    print(f"loaded by then (of {', '.join(HEAVY)}, rich, typer, click, psutil, yaml): {', '.join(heavy) or 'none'}")
    print(f"gradprobe modules loaded by then: {len(gp_mods)}")
    results["_env"] = {"python": sys.version.split()[0], "rounds": args.rounds, "cpus": os.cpu_count(),
                       "PYTHONDONTWRITEBYTECODE": env.get("PYTHONDONTWRITEBYTECODE", ""),
                       "load_average": os.getloadavg()}
    print(f"python {results['_env']['python']}, {args.rounds} rounds, PYTHONDONTWRITEBYTECODE="
          f"{env.get('PYTHONDONTWRITEBYTECODE') or '(unset)'} in the children, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
