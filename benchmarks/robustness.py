"""The robustness suite's measurements at scale, with the figures printed.

    python benchmarks/robustness.py [--kill-trials 24] [--fuzz-examples 300]
        [--long-steps 100000] [--traced-steps 20000] [--only kill,fuzz,leaks,long] [--json out.json]

* **kill**: SIGKILL a watched training script at seeded random moments (``gradprobe.watch`` in
  the script or ``gradprobe run`` around it; half the trials stuck between steps, where only
  the flusher thread hands records over). A trial survives when ``gradprobe analyze`` reads
  the log (exit 0/1), its steps are contiguous from 0 and every step closed more than 1 s
  before the kill is on disk. Also: the most recent-history any trial lost.
* **fuzz**: every fuzz target of ``tests/robustness/fuzz.py`` (arbitrary bytes as each run
  file, truncations, wrong JSON types, NaN/Inf/huge values, unicode names, symlink trees,
  rank directories, foreign formats) through ``gradprobe analyze`` in-process: examples
  tried, contract violations (a traceback, a hang, exit 2 without one clean line, an invalid
  report), and how the examples ended (exit 0/1: a report; exit 2: not a readable log).
* **leaks**: the leak scenarios of ``tests/robustness/harness.py`` (hooks, patches,
  saved-tensors hooks, threads, file descriptors, signal handlers, objects kept alive).
* **long**: a tiny model trained ``--long-steps`` steps under ``gradprobe.watch`` in a fresh
  process: RSS growth from 10% of the run to its end and the most records held between
  hand-overs; and ``--traced-steps`` steps under ``tracemalloc``: growth of the memory
  allocated by gradprobe's own code.

The same code runs in the test suite (``tests/robustness/``) with fewer trials and examples.
Takes ~15 minutes with the defaults on a 2-core machine; ``--quick`` runs a small version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_kill(trials: int) -> dict[str, Any]:
    from tests.robustness import harness as H

    results = []
    for seed in range(trials):
        with tempfile.TemporaryDirectory(prefix="gp-kill-") as d:
            t = H.kill_trial(seed, d)
        results.append(t)
        state = "ok" if t.survived else "FAILED: " + "; ".join(t.problems)
        print(f"  kill trial {seed:3d} ({t.mode:5s}, {'stuck' if t.hang else 'running'}, killed at {t.delay:4.2f} s): "
              f"{t.logged_steps}/{t.closed_steps} steps on disk, {t.required_steps} due, lost {t.lost_seconds:.2f} s  {state}",
              flush=True)
    survived = sum(t.survived for t in results)
    return {"tried": len(results), "survived": survived, "max_lost_seconds": max((t.lost_seconds for t in results), default=0.0),
            "median_lost_seconds": statistics.median([t.lost_seconds for t in results]) if results else 0.0,
            "failures": [{"seed": t.seed, "problems": t.problems} for t in results if not t.survived]}


def run_fuzz(examples: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.robustness import fuzz as FZ
    from tests.robustness import harness as H

    H.template_run()
    out = {}
    for target, (strategy, _) in sorted(FZ.TARGETS.items()):
        failures: list[str] = []

        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: dict[str, Any]) -> None:
            try:
                FZ.run_target(target, case)
            except H.AnalyzeContractError as exc:
                failures.append(str(exc).splitlines()[0][:300])

        t0 = time.perf_counter()
        check()
        exits = FZ.EXITS[target]
        out[target] = {"examples": FZ.TRIED[target], "violations": len(failures), "exit_0_or_1": exits[0] + exits[1],
                       "exit_2": exits[2], "seconds": round(time.perf_counter() - t0, 1), "first_violations": failures[:3]}
        print(f"  fuzz {target:14s} {FZ.TRIED[target]:5d} examples, {len(failures)} violations "
              f"(report: {exits[0] + exits[1]}, exit 2: {exits[2]})", flush=True)
    return out


def run_leaks() -> dict[str, Any]:
    from tests.robustness import harness as H

    with tempfile.TemporaryDirectory(prefix="gp-leaks-") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = H.leak_report(d)
    for c in checks:
        print(f"  leak check {c.name:18s} {'passed' if c.passed else 'FAILED: ' + '; '.join(c.problems)}", flush=True)
    return {"checks": len(checks), "passed": sum(c.passed for c in checks),
            "failures": {c.name: c.problems for c in checks if not c.passed}}


def run_long(steps: int, traced_steps: int) -> dict[str, Any]:
    from tests.robustness import harness as H

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gp-long-") as d:
        t0 = time.perf_counter()
        rss = H.long_run(steps, os.path.join(d, "rss"), trace=False)
        out["rss"] = {"steps": steps, "rss_growth_bytes": rss["rss_growth"], "rss_start_bytes": rss["points"][0]["rss"],
                      "max_pending_records": rss["max_pending_records"], "flush_steps": rss["flush_steps"],
                      "log_bytes": rss["log_bytes"], "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  long run {steps} steps: RSS {rss['points'][0]['rss'] / 2**20:.1f} MiB at step {rss['points'][0]['step']}, "
              f"growth to the end {rss['rss_growth'] / 2**20:+.2f} MiB; at most {rss['max_pending_records']} records "
              f"between hand-overs (flush_steps {rss['flush_steps']}); log {rss['log_bytes'] / 2**20:.1f} MiB", flush=True)
        if traced_steps:
            t0 = time.perf_counter()
            tr = H.long_run(traced_steps, os.path.join(d, "traced"), trace=True)
            peak = max(p["gradprobe_bytes"] for p in tr["points"])
            out["traced"] = {"steps": traced_steps, "gradprobe_growth_bytes": tr["gradprobe_growth"],
                             "gradprobe_peak_bytes": peak, "seconds": round(time.perf_counter() - t0, 1),
                             "points": [(p["step"], p["gradprobe_bytes"]) for p in tr["points"]]}
            print(f"  traced run {traced_steps} steps: gradprobe's own allocations "
                  f"{tr['points'][0]['gradprobe_bytes'] / 1024:.0f} KiB at step {tr['points'][0]['step']}, "
                  f"growth to the end {tr['gradprobe_growth'] / 1024:+.0f} KiB, peak {peak / 1024:.0f} KiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-trials", type=int, default=24)
    p.add_argument("--fuzz-examples", type=int, default=300, help="examples per fuzz target")
    p.add_argument("--long-steps", type=int, default=100_000)
    p.add_argument("--traced-steps", type=int, default=20_000)
    p.add_argument("--only", default="kill,fuzz,leaks,long")
    p.add_argument("--quick", action="store_true", help="4 kill trials, 30 examples per target, 10,000 / 2,000 steps")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.kill_trials, args.fuzz_examples, args.long_steps, args.traced_steps = 4, 30, 10_000, 2_000
    parts = set(args.only.split(","))
    figures: dict[str, Any] = {}
    t0 = time.perf_counter()
    if "kill" in parts:
        print(f"SIGKILL trials ({args.kill_trials}):", flush=True)
        figures["kill"] = run_kill(args.kill_trials)
    if "fuzz" in parts:
        print(f"gradprobe analyze fuzzing ({args.fuzz_examples} examples per target):", flush=True)
        figures["fuzz"] = run_fuzz(args.fuzz_examples)
    if "leaks" in parts:
        print("leak checks:", flush=True)
        figures["leaks"] = run_leaks()
    if "long" in parts:
        print("long runs:", flush=True)
        figures["long"] = run_long(args.long_steps, args.traced_steps)

    print("\nsummary")
    if "kill" in figures:
        k = figures["kill"]
        print(f"  kill trials survived: {k['survived']}/{k['tried']} (most history lost: {k['max_lost_seconds']:.2f} s, "
              f"median {k['median_lost_seconds']:.2f} s)")
    if "fuzz" in figures:
        f = figures["fuzz"]
        total = sum(v["examples"] for v in f.values())
        bad = sum(v["violations"] for v in f.values())
        per_target = ", ".join(f"{k} {v['examples']}" for k, v in f.items())
        print(f"  fuzz examples tried: {total} ({per_target}); contract violations: {bad}")
    if "leaks" in figures:
        print(f"  leak checks passed: {figures['leaks']['passed']}/{figures['leaks']['checks']}")
    if "long" in figures:
        r = figures["long"]["rss"]
        line = f"  long run: {r['steps']} steps, RSS growth {r['rss_growth_bytes'] / 2**20:+.2f} MiB"
        if "traced" in figures["long"]:
            tr = figures["long"]["traced"]
            line += f"; gradprobe allocations over {tr['steps']} traced steps {tr['gradprobe_growth_bytes'] / 1024:+.0f} KiB"
        print(line)
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    ok = (figures.get("kill", {}).get("survived", 0) == figures.get("kill", {}).get("tried", 0)
          and not any(v["violations"] for v in figures.get("fuzz", {}).values())
          and figures.get("leaks", {}).get("passed", 0) == figures.get("leaks", {}).get("checks", 0))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
