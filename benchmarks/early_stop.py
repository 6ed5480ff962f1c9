"""Stopping a doomed run early (``--stop-on``): what the live checks cost, how soon a fault is
stopped, and what the calibration corpus gains.

    python benchmarks/early_stop.py                       # all three parts
    python benchmarks/early_stop.py --parts cost,latency  # skip the corpus (~1 min)
    python benchmarks/early_stop.py --parts corpus --items nan_log_zero_bce,cyclic_lr_mlp
    python benchmarks/early_stop.py --parts corpus --lengths corpus_programs.json --json out.json

(a) **cost**: two small models (an MLP and a 1-layer LSTM on sequences of 32) each train
``--steps`` healthy steps under ``gradprobe.watch``, ``--repeats`` times with
``stop_on="never"`` and with ``stop_on="error"``, interleaved. The live checks time
themselves (``LiveChecks.seconds``: every call, on the writer thread); the figure is their
time per step against the watched step time, target <= 1%. The step times of both settings
also hold what ``stop_on`` adds besides (the more frequent hand-overs to the writer). The
training thread's share, the step-boundary gate, is timed apart (``Stopper.gate`` on the
healthy path, a million calls).

(b) **latency**: a tiny regression trains under ``gradprobe.watch(stop_on="error",
total_steps=20000)`` and a fault is injected at step ``--fault-step``: a NaN batch (the
parameters go NaN at that step), or an absurd learning rate set at that step (the weights blow
up to Inf within a few steps). For each, ``--repeats`` runs: steps and seconds from the fault
(the fault step's close time in the log) to the stop, and the live check that asked.

(c) **corpus**: every runnable item of the calibration corpus (``benchmarks/corpus/programs``,
labels in ``programs.json``) runs as ``python -m gradprobe run --stop-on error``, each with a
time limit (``--timeout``). Per item: stopped (step S of N, the compute saved as the steps not
run) or not, its exit status, and every live request the engine did not confirm
(``gradprobe.json`` ``live_checks.unconfirmed``). The healthy items must show zero stops. A
stopped item's length N is, in this order: its steps in ``--lengths FILE`` (a
``benchmarks/corpus.py --json`` output, or any JSON mapping ids to step counts), the total the
script said (the stop record's ``total_steps``: a ``OneCycleLR``...), else a full run without
``--stop-on``, one at a time (``--full`` runs every faulty item full length, for the seconds
saved too). An item that was not stopped ran its full length. ``tests/test_early_stop_slow.py``
runs this part on the faulty items and asserts no request goes unconfirmed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROGRAMS_DIR = os.path.join(ROOT, "benchmarks", "corpus", "programs")
PROGRAMS = os.path.join(ROOT, "benchmarks", "corpus", "programs.json")
#: the corpus programs are tiny CPU runs of seconds; three minutes means one has hung
PROGRAM_TIMEOUT_S = 180
#: two programs at a time: the development machine and CI have two cores
WORKERS = 2


# ============================================================================== cost ====
def _mlp() -> tuple[Any, Any, Any]:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 1))
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    return model, (lambda m: torch.nn.functional.mse_loss(m(x), y)), torch.optim.Adam(model.parameters(), lr=1e-3)


def _lstm() -> tuple[Any, Any, Any]:
    import torch

    class Seq(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(8, 32, batch_first=True)
            self.head = torch.nn.Linear(32, 1)

        def forward(self, x: Any) -> Any:
            return self.head(self.rnn(x)[0])

    model = Seq()
    x, y = torch.randn(16, 32, 8), torch.randn(16, 32, 1)
    return model, (lambda m: torch.nn.functional.mse_loss(m(x), y)), torch.optim.Adam(model.parameters(), lr=1e-3)


def _cost_run(make: Any, steps: int, stop_on: str) -> tuple[float, Any]:
    """Seconds per step of one healthy watched run; the live checks (None under ``never``)."""
    import torch

    import gradprobe

    torch.manual_seed(0)
    model, loss_of, opt = make()
    with tempfile.TemporaryDirectory() as tmp:
        probe = gradprobe.watch(model, opt, logdir=os.path.join(tmp, "run"), stop_on=stop_on)
        with probe:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = loss_of(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
            wall = time.perf_counter() - t0
    return wall / steps, (probe.stopper.checks if probe.stopper is not None else None)


def measure_cost(steps: int, repeats: int = 3) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    out = []
    for name, make in (("mlp", _mlp), ("lstm", _lstm)):
        never, error, live, batches = [], [], [], []
        for _ in range(repeats):  # interleaved, so that load on the machine falls on both
            never.append(_cost_run(make, steps, "never")[0])
            per_step, checks = _cost_run(make, steps, "error")
            error.append(per_step)
            live.append(checks.seconds / max(checks.steps, 1))
            batches.append(checks.batches)
        step, step_never, live_s = statistics.median(error), statistics.median(never), statistics.median(live)
        out.append({"model": name, "steps": steps, "repeats": repeats, "step_ms": step * 1e3,
                    "step_never_ms": step_never * 1e3, "step_ms_all": [v * 1e3 for v in error],
                    "step_never_ms_all": [v * 1e3 for v in never], "live_us_per_step": live_s * 1e6,
                    "live_fraction": live_s / step, "batches": int(statistics.median(batches)),
                    "live_us_per_batch": live_s * steps / max(statistics.median(batches), 1) * 1e6})
    # the training thread's share on the healthy path: the gate's attribute read
    from gradprobe.live import Stopper

    class _Host:
        pass

    gate = Stopper(_Host(), "error").gate
    n = 1_000_000
    out.append({"model": "gate", "gate_ns": timeit.timeit(gate, number=n) / n * 1e9})
    return out


# =========================================================================== latency ====
def _latency_run(fault: str, fault_step: int, seed: int) -> dict[str, Any]:
    import torch

    import gradprobe

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 8)
    y = x.sum(1, keepdim=True)
    total = 20000
    with tempfile.TemporaryDirectory() as tmp:
        logdir = os.path.join(tmp, "run")
        try:
            with gradprobe.watch(model, opt, logdir=logdir, stop_on="error", total_steps=total):
                for step in range(total):
                    xb = x
                    if step == fault_step:
                        if fault == "nan_batch":
                            xb = x * float("nan")
                        else:  # absurd_lr
                            for g in opt.param_groups:
                                g["lr"] = 1e6
                    loss = torch.nn.functional.mse_loss(model(xb), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        except gradprobe.RunStopped as exc:
            d = exc.decision
            log = gradprobe.RunLog.load(logdir)
            st = log.steps.set_index("step")
            fault_wall = float(st.loc[fault_step, "wall_time"])
            return {"fault": fault, "stopped": True, "stop_step": d.step, "steps_after_fault": d.step - fault_step,
                    "seconds_after_fault": d.wall_time - fault_wall, "code": d.finding.code,
                    "trigger": d.trigger.get("code"), "trigger_step": d.trigger.get("step"),
                    "steps_left": d.steps_left}
    return {"fault": fault, "stopped": False}


def measure_latency(fault_step: int, repeats: int) -> list[dict[str, Any]]:
    return [_latency_run(fault, fault_step, seed) for fault in ("nan_batch", "absurd_lr") for seed in range(repeats)]


# ============================================================================ corpus ====
def load_programs() -> dict[str, dict[str, Any]]:
    with open(PROGRAMS, encoding="utf-8") as f:
        doc = json.load(f)
    removed = {r["id"] for r in doc.get("removed", [])}
    return {k: v for k, v in doc["items"].items() if k not in removed and v.get("label") in ("healthy", "faulty")}


def run_item(item_id: str, stop_on: str | None, timeout: float = PROGRAM_TIMEOUT_S) -> dict[str, Any]:
    """``gradprobe run [--stop-on X]`` on one corpus program: exit status, seconds, steps
    recorded, the stop and the unconfirmed live requests from the run directories, and the
    final findings of its report (at the stop, or at the end of a run not stopped)."""
    script = os.path.join(PROGRAMS_DIR, f"{item_id}.py")
    tmp = tempfile.mkdtemp(prefix=f"early-stop-{item_id}-")
    try:
        report_path = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "gradprobe", "run", "--format", "json", "--output", report_path, "--logdir",
               os.path.join(tmp, "run")]
        if stop_on:
            cmd += ["--stop-on", stop_on]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        # its own process group: a program past its time limit is killed with its children
        proc = subprocess.Popen(cmd + [script], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"id": item_id, "error": f"ran past {timeout:.0f}s"}
        seconds = time.perf_counter() - t0
        steps, stopped, unconfirmed = 0, None, []
        for meta_path in glob.glob(os.path.join(tmp, "run", "**", "gradprobe.json"), recursive=True):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            steps += int(meta.get("steps") or 0)
            stopped = stopped or meta.get("stopped")
            unconfirmed += (meta.get("live_checks") or {}).get("unconfirmed") or []
        final: list[str] = []
        if os.path.exists(report_path):
            with open(report_path, encoding="utf-8") as f:
                final = [f"{x['code']} {x['severity']}" for x in json.load(f).get("findings", []) if x.get("final")]
        return {"id": item_id, "exit": proc.returncode, "seconds": seconds, "steps": steps, "stopped": stopped,
                "unconfirmed": unconfirmed, "final": final}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_lengths(path: str) -> dict[str, dict[str, float]]:
    """Step counts (and seconds, when given) of full runs, by item id, from a JSON file: a
    ``benchmarks/corpus.py --json`` output (``items``: ``id`` with ``steps``/``n_steps``, and
    ``seconds``), or a mapping ``id -> steps`` or ``id -> {"steps": ..., "seconds": ...}``."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    entries = doc.get("items", doc) if isinstance(doc, dict) else doc
    if isinstance(entries, dict):
        entries = [{"id": k, **(v if isinstance(v, dict) else {"steps": v})} for k, v in entries.items()]
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        if not isinstance(e, dict) or "id" not in e:
            continue
        steps = next((e[k] for k in ("steps", "n_steps", "length") if isinstance(e.get(k), (int, float))), None)
        if steps:
            out[str(e["id"])] = {"steps": int(steps), "seconds": e.get("seconds") if not e.get("error") else None}
    return out


def _pool(jobs: list[tuple[str, str | None]], workers: int, timeout: float, progress: bool,
          runs: dict[tuple[str, str | None], dict[str, Any]]) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(run_item, i, s, timeout): (i, s) for i, s in jobs}
        for n, fut in enumerate(concurrent.futures.as_completed(futs), 1):
            key = futs[fut]
            runs[key] = r = fut.result()
            if progress:
                what = r.get("error") or (f"stopped after step {r['stopped']['step']}" if r.get("stopped")
                                          else f"exit {r['exit']}, {r['steps']} steps")
                print(f"[{n}/{len(jobs)}] {key[0]} {'--stop-on error' if key[1] else 'full run'} "
                      f"({r.get('seconds') or 0:.1f}s): {what}", file=sys.stderr, flush=True)


def measure_corpus(items: dict[str, dict[str, Any]], workers: int = WORKERS, progress: bool = True,
                   timeout: float = PROGRAM_TIMEOUT_S, lengths: dict[str, dict[str, float]] | None = None,
                   full: bool = False) -> list[dict[str, Any]]:
    """Every item under ``--stop-on error``; then, one at a time, the faulty items stopped
    whose length nothing else gives (all faulty items with ``full``)."""
    lengths = lengths or {}
    runs: dict[tuple[str, str | None], dict[str, Any]] = {}
    _pool([(i, "error") for i in items], workers, timeout, progress, runs)

    def known(item_id: str) -> int | None:
        if item_id in lengths:
            return int(lengths[item_id]["steps"])
        stop = runs[(item_id, "error")].get("stopped")
        return int(stop["total_steps"]) if stop and stop.get("total_steps") else None

    again = [i for i, e in items.items() if e["label"] == "faulty"
             and (full or (runs[(i, "error")].get("stopped") and known(i) is None))]
    _pool([(i, None) for i in again], 1, timeout, progress, runs)
    out = []
    for item_id, entry in items.items():
        s, whole = runs[(item_id, "error")], runs.get((item_id, None))
        row: dict[str, Any] = {"id": item_id, "label": entry["label"], "exit": s.get("exit"), "error": s.get("error"),
                               "stopped": s.get("stopped"), "unconfirmed": s.get("unconfirmed", []),
                               "seconds": s.get("seconds"), "steps": s.get("steps"), "final": s.get("final", [])}
        if whole is not None:
            row.update(full_exit=whole.get("exit"), full_steps=whole.get("steps"), full_seconds=whole.get("seconds"),
                       full_error=whole.get("error"), length_from="full run")
        elif item_id in lengths:
            row.update(full_steps=lengths[item_id]["steps"], full_seconds=lengths[item_id].get("seconds"),
                       length_from="--lengths")
        elif s.get("stopped") and s["stopped"].get("total_steps"):
            row.update(full_steps=s["stopped"]["total_steps"], length_from=s["stopped"].get("total_from"))
        elif not s.get("stopped") and not s.get("error"):
            row.update(full_steps=s.get("steps"), full_seconds=s.get("seconds"), length_from="ran to its end")
        out.append(row)
    return out


# ============================================================================ output ====
def print_cost(rows: list[dict[str, Any]]) -> None:
    print("\n(a) cost on healthy runs (CPU, 1 thread; medians of interleaved runs)\n")
    print("| model | steps x runs | step, stop_on='never' | step, stop_on='error' | live checks per step | share of the step | hand-overs per run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] == "gate":
            continue
        print(f"| {r['model']} | {r['steps']} x {r['repeats']} | {r['step_never_ms']:.3f} ms | {r['step_ms']:.3f} ms | "
              f"{r['live_us_per_step']:.2f} us | {r['live_fraction']:.3%} | {r['batches']} |")
    for r in rows:
        if r["model"] == "gate":
            print(f"\nstep-boundary gate on the training thread, healthy path: {r['gate_ns']:.0f} ns per call")


def print_latency(rows: list[dict[str, Any]], fault_step: int) -> None:
    print(f"\n(b) fault at step {fault_step} of 20000 -> stop (tiny regression, watch(stop_on='error'))\n")
    print("| fault | stopped | steps after the fault, median (max) | seconds after the fault, median (max) | "
          "finding | live check that asked |")
    print("|---|---|---|---|---|---|")
    for fault in sorted({r["fault"] for r in rows}):
        rs = [r for r in rows if r["fault"] == fault]
        ok = [r for r in rs if r["stopped"]]
        if not ok:
            print(f"| {fault} | 0/{len(rs)} | | | | |")
            continue
        steps = [r["steps_after_fault"] for r in ok]
        secs = [r["seconds_after_fault"] for r in ok]
        print(f"| {fault} | {len(ok)}/{len(rs)} | {statistics.median(steps):.0f} ({max(steps)}) | "
              f"{statistics.median(secs):.2f} ({max(secs):.2f}) | {', '.join(sorted({r['code'] for r in ok}))} | "
              f"{', '.join(sorted({str(r['trigger']) for r in ok}))} |")


def print_corpus(rows: list[dict[str, Any]]) -> None:
    print("\n(c) calibration corpus under gradprobe run --stop-on error (faulty items)\n")
    faulty = [r for r in rows if r["label"] == "faulty"]
    healthy = [r for r in rows if r["label"] == "healthy"]
    print("| item | stopped after step | of N steps | steps saved | seconds (stopped / full) | rule | exit | N from | "
          "final findings in its report |")
    print("|---|---|---|---|---|---|---|---|---|")
    saved_steps = total_steps = 0
    for r in sorted(faulty, key=lambda r: r["id"]):
        stop, n = r["stopped"], r.get("full_steps")
        err = r.get("error") or r.get("full_error")
        if err:
            print(f"| {r['id']} | error: {err} | | | | | | | |")
            continue
        secs = f"{r['seconds']:.1f}" + (f" / {r['full_seconds']:.1f}" if r.get("full_seconds") else "")
        if stop:
            saved = f"{1 - stop['steps'] / n:.0%}" if n else "?"
            if n:
                saved_steps, total_steps = saved_steps + max(n - stop["steps"], 0), total_steps + n
            print(f"| {r['id']} | {stop['step']} | {n or '?'} | {saved} | {secs} | {stop['code']} {stop['rule']} | "
                  f"{r['exit']} | {r.get('length_from') or '?'} | {', '.join(r['final']) or '-'} |")
        else:
            total_steps += n or 0
            print(f"| {r['id']} | not stopped | {n or '?'} | 0% | {secs} | - | {r['exit']} | ran to its end | "
                  f"{', '.join(r['final']) or 'none'} |")
    missed = [r["id"] for r in faulty if not r["stopped"] and any(x.endswith(" error") for x in r["final"])]
    stops_h = [r["id"] for r in healthy if r["stopped"]]
    unconf = [(r["id"], u) for r in rows for u in r["unconfirmed"]]
    errors = [r["id"] for r in rows if r.get("error") or r.get("full_error")]
    nf = sum(1 for r in faulty if r["stopped"])
    print(f"\nfaulty stopped: {nf}/{len(faulty)}; steps not run: {saved_steps} of {total_steps} "
          f"({saved_steps / max(total_steps, 1):.0%}) over the faulty items")
    print(f"faulty not stopped although their report holds a final error finding: {missed or 0}")
    print(f"healthy stopped: {len(stops_h)}/{len(healthy)} {stops_h or ''}; healthy exits: "
          f"{dict(sorted(_count(r['exit'] for r in healthy).items(), key=str))}")
    print(f"unconfirmed live requests: {len(unconf)} {unconf or ''}; items in error: {errors or 0}")


def _count(values: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cost,latency,corpus")
    ap.add_argument("--steps", type=int, default=3000, help="steps per cost model (default 3000)")
    ap.add_argument("--fault-step", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cost model and per latency fault (default 3)")
    ap.add_argument("--items", default="", help="corpus items (comma-separated); default all runnable")
    ap.add_argument("--workers", type=int, default=WORKERS, help="programs at a time under --stop-on (default 2)")
    ap.add_argument("--timeout", type=float, default=PROGRAM_TIMEOUT_S, help="seconds per program (default 180)")
    ap.add_argument("--lengths", default="", metavar="FILE",
                    help="full-run step counts by item (a benchmarks/corpus.py --json output, or {id: steps})")
    ap.add_argument("--full", action="store_true", help="run every faulty item full length too (seconds saved)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    results: dict[str, Any] = {}
    if "cost" in parts:
        results["cost"] = measure_cost(a.steps, a.repeats)
        print_cost(results["cost"])
    if "latency" in parts:
        results["latency"] = measure_latency(a.fault_step, a.repeats)
        print_latency(results["latency"], a.fault_step)
    if "corpus" in parts:
        items = load_programs()
        if a.items:
            items = {k: v for k, v in items.items() if k in set(a.items.split(","))}
        lengths = load_lengths(a.lengths) if a.lengths else {}
        results["corpus"] = measure_corpus(items, a.workers, timeout=a.timeout, lengths=lengths, full=a.full)
        print_corpus(results["corpus"])
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
