"""What the start-up hook of ``gradprobe run`` costs a child process that never trains.

    python benchmarks/startup_hook.py [--rounds 40] [--json FILE]

Every Python process a watched script starts runs the hook (``gradprobe.subprocess_hook``),
including the many that never train: the torchrun agent's helpers, multiprocessing's
resource tracker and forkserver, spawned DataLoader workers, a ``python -c`` a script shells
out to. This sets up the hook exactly as ``gradprobe run`` does (:class:`gradprobe.tree.
ProcessTree` writes the ``sitecustomize.py`` into a log directory and puts it first on
``PYTHONPATH``) and starts each kind of child with and without it, interleaved round by
round (the order alternating), timing each process from start to exit:

* ``python -c pass``: the bare interpreter (the stub is loaded, a marker is written, a finder
  waits for torch);
* ``python -c "import torch"``: a child that imports torch and builds no optimizer (the
  finder sees torch's import, ``Optimizer.__init__`` is wrapped, the marker is rewritten at
  exit);
* ``python -c "import torch; torch.nn.Linear(8, 8)(torch.randn(4, 8))"``: the same with a
  forward pass (the hook adds nothing to torch itself until an optimizer is built).

Wall time is the child's lifetime (``Popen`` to ``wait4``); CPU time is the child's own user
plus system time (``wait4``'s resource usage), which a busy machine disturbs less. Each
figure is the median over the rounds; the difference is the median of the per-round paired
differences, with the 25th-75th percentile range of those differences. It checks that every
hooked child left its marker (the hook really ran). The end-to-end difference on a child
that imports torch (2 s of CPU) is lost in that import's spread, so a hooked child also
times the hook's own pieces there (medians of repeats): the finder's look at every import
(times the number of modules torch imports), wrapping ``Optimizer.__init__``, and the marker
written at exit.

The bytecode cache matters for the stub's load of the hook module: the figures are printed
with the environment's ``PYTHONDONTWRITEBYTECODE`` as it is (this development machine sets
it, so the hook module is compiled from source in every child: the pessimistic case).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradprobe import subprocess_hook  # noqa: E402
from gradprobe.config import ProbeConfig  # noqa: E402
from gradprobe.tree import ProcessTree, read_markers  # noqa: E402

CHILDREN = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "import torch + a forward": ["-c", "import torch; torch.nn.Linear(8, 8)(torch.randn(4, 8))"],
}


#: run in a hooked child: the hook's own work on a torch import, timed piece by piece (the
#: end-to-end difference on a 2 s torch import is lost in its run-to-run spread)
INSIDE = """
import json, os, sys, time
hook = sys.modules["gradprobe.subprocess_hook"]
finder = hook._TorchFinder()
n = 200000
t = time.perf_counter()
for _ in range(n):
    finder.find_spec("numpy.core.multiarray", None, None)
per_import = (time.perf_counter() - t) / n
before = len(sys.modules)
import torch
imports = len(sys.modules) - before
def median_of(fn, k=21):
    times = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[k // 2]
def ready_again():
    hook._unwrap_optimizer()
    hook._torch_ready()
ready = median_of(ready_again)  # (the unwrap it needs first is counted too)
exit_path = os.path.join(hook._state["hook_dir"], hook.MARKERS, f"{os.getpid()}.exit")
times = []
for _ in range(21):
    t = time.perf_counter()
    hook.exit_info(write=True)
    times.append(time.perf_counter() - t)
    os.remove(exit_path)  # the next one is a new file again, as at a real exit
marker = sorted(times)[10]
print(json.dumps({"per_import_us": 1e6 * per_import, "imports": imports, "torch_ready_ms": 1e3 * ready,
                  "exit_marker_ms": 1e3 * marker,
                  "total_ms": 1e3 * (imports * per_import + ready + marker)}))
"""


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed ({proc.returncode}): {err[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="pairs of child processes per kind (default 40)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    plain_env = dict(os.environ)
    plain_env.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="startup-hook-") as tmp:
        tree = ProcessTree(os.path.join(tmp, "log"), ProbeConfig())
        tree.start()  # the hook as gradprobe run installs it: PYTHONPATH now carries it
        hooked_env = dict(os.environ)
        hooked_env.setdefault("OMP_NUM_THREADS", "1")
        markers_dir = os.path.join(tree.hook_dir, subprocess_hook.MARKERS)
        try:
            for name, child in CHILDREN.items():
                for _ in range(2):  # warm the page cache for both
                    run_child(child, plain_env)
                    run_child(child, hooked_env)
                before = len([n for n in os.listdir(markers_dir) if n.isdigit()])
                rows: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
                for i in range(args.rounds):
                    order = ("without", "with") if i % 2 == 0 else ("with", "without")
                    for which in order:
                        rows[which].append(run_child(child, hooked_env if which == "with" else plain_env))
                made = len([n for n in os.listdir(markers_dir) if n.isdigit()]) - before
                if made != args.rounds:
                    raise SystemExit(f"{name}: {made} markers for {args.rounds} hooked children: the hook did not run in all")
                fig = {}
                for k, idx in (("wall", 0), ("cpu", 1)):
                    a = [r[idx] for r in rows["without"]]
                    b = [r[idx] for r in rows["with"]]
                    d = [y - x for x, y in zip(a, b)]
                    fig[k] = {"without_ms": 1e3 * statistics.median(a), "with_ms": 1e3 * statistics.median(b),
                              "diff_ms": 1e3 * statistics.median(d),
                              "diff_p25_ms": 1e3 * percentile(d, 0.25), "diff_p75_ms": 1e3 * percentile(d, 0.75)}
                results[name] = fig
                for k in ("wall", "cpu"):
                    f = fig[k]
                    print(f"{name:28s} {k:4s}  without {f['without_ms']:8.1f} ms  with {f['with_ms']:8.1f} ms  "
                          f"difference {f['diff_ms']:+7.2f} ms [{f['diff_p25_ms']:+.2f}, {f['diff_p75_ms']:+.2f}]", flush=True)
            inside = subprocess.run([sys.executable, "-c", INSIDE], env=hooked_env, capture_output=True, text=True, check=True)
            own = json.loads(inside.stdout)
            results["hook_work_on_import_torch"] = own
            print(f"the hook's own work in a child importing torch: {own['imports']} imports seen x "
                  f"{own['per_import_us']:.2f} us + Optimizer.__init__ wrapped {own['torch_ready_ms']:.3f} ms + "
                  f"exit marker {own['exit_marker_ms']:.3f} ms = {own['total_ms']:.2f} ms")
            markers = read_markers(markers_dir)
            torch_children = [m for m in markers if m.get("torch")]
            print(f"markers: {len(markers)} hooked children; {len(torch_children)} imported torch, "
                  f"{sum(1 for m in markers if m.get('optimizer'))} built an optimizer")
        finally:
            tree.stop()
    results["_env"] = {"python": sys.version.split()[0], "rounds": args.rounds, "cpus": os.cpu_count(),
                       "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
                       "load_average": os.getloadavg()}
    print(f"python {results['_env']['python']}, {args.rounds} rounds, PYTHONDONTWRITEBYTECODE="
          f"{results['_env']['PYTHONDONTWRITEBYTECODE'] or '(unset)'}, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
