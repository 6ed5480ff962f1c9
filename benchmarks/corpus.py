"""Calibration corpus benchmark: gradprobe on real runs it was not written against.

    python benchmarks/corpus.py --split tune               # the half rules are tuned on
    python benchmarks/corpus.py --split check --logs-only  # the held-out half, saved logs only
    python benchmarks/corpus.py --split all --json out.json
    python benchmarks/corpus.py --items whisper_finetune,ratos_version_6

Two kinds of item, each labelled in ``benchmarks/corpus/`` (format and how to add items in
``benchmarks/corpus/README.md``):

* saved logs other people committed to public repositories (``labels.json``): each is
  analyzed with ``gradprobe.analyze(path)``, in this one process. The logs themselves are
  not in the project: they are read from the corpus directory (``--corpus DIR``, else
  ``$GRADPROBE_CORPUS``, else ``../shared/corpus/logs`` next to the repository), whose
  ``MANIFEST.json`` names each log's kind and files. A log that cannot be read is an error
  item, reported by name.
* runnable programs (``programs.json``, ``programs/<id>.py``): each runs as a real
  subprocess, ``python -m gradprobe run --format json --output REPORT programs/<id>.py``,
  two at a time, each with a time limit (``--timeout``). A program that leaves no report
  (it could not start, or ran past the limit) is an error item. ``--logs-only`` skips them.

Every item is ``healthy``, ``faulty`` (with the catalog slugs it ``expected``, any of which
detects it, and the acceptable ``roots``) or ``unclear`` (left out of the figures, counted).
Only warning and error findings count. Figures, per split:

* healthy-silent: healthy items with no warning/error finding;
* faulty-detected: faulty items where at least one expected slug fired;
* root-first: faulty items whose report's first warning/error finding is one of its roots.

An error item counts against its figure (a refused healthy log is not silent; a refused
faulty one is not detected). Per rule it prints true positives (fired on a faulty item that
expects it), false positives (fired on a healthy item), extra (fired on a faulty item that
does not list it) and misses (expected, not fired); then a line for every failure; and, as
its last line, ``corpus <split>: healthy-silent a/b faulty-detected c/d root-first e/f``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CORPUS_DIR = os.path.join(ROOT, "benchmarks", "corpus")
LABELS = os.path.join(CORPUS_DIR, "labels.json")
PROGRAMS = os.path.join(CORPUS_DIR, "programs.json")
PROGRAMS_DIR = os.path.join(CORPUS_DIR, "programs")
#: Where the shared logs live relative to the repository: a sibling checkout's shared/ folder.
DEFAULT_CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "corpus", "logs")
#: Findings at these severities are what a user is told to act on; info is not counted.
ALERTING = ("warning", "error")
#: The programs are tiny CPU runs of seconds; two minutes means one has hung.
PROGRAM_TIMEOUT_S = 120
#: Two programs at a time: the development machine and CI have two cores.
PROGRAM_WORKERS = 2
SPLITS = ("tune", "check", "all")


# ============================================================================ labels ====
def load_labels(path: str) -> dict[str, dict[str, Any]]:
    """The scored ``items`` of a label file: every entry but those listed in ``removed``
    (entries are never edited once committed; a withdrawn one is listed there with its
    reason). An absent file is no items (programs.json may not exist yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    removed = {r["id"] for r in doc.get("removed", [])}
    return {k: v for k, v in doc.get("items", {}).items() if k not in removed}


def in_split(entry: dict[str, Any], split: str) -> bool:
    return split == "all" or entry.get("split") == split


# =========================================================================== scoring ====
@dataclass
class ItemResult:
    """What one item's report said, reduced to what is scored. ``findings`` are the
    warning/error findings as (slug, code, severity), in the report's order."""

    id: str
    kind: str
    label: str
    split: str
    expected: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def alerting_findings(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A JSON report's warning/error findings as (slug, code, severity), in report order."""
    out = []
    for f in report.get("findings", []):
        if f.get("severity") in ALERTING:
            out.append((str(f.get("rule")), str(f.get("code", "")), str(f.get("severity"))))
    return out


def make_result(item_id: str, kind: str, entry: dict[str, Any], report: dict[str, Any] | None,
                error: str | None = None, seconds: float = 0.0) -> ItemResult:
    """One item's result from its label entry and its JSON report (None with ``error``)."""
    return ItemResult(id=item_id, kind=kind, label=entry["label"], split=entry.get("split", ""),
                      expected=list(entry.get("expected", [])), roots=list(entry.get("roots", [])),
                      findings=alerting_findings(report) if report is not None else [],
                      error=error, seconds=seconds)


@dataclass
class RuleCounts:
    code: str = ""
    tp: int = 0
    fp: int = 0
    extra: int = 0
    miss: int = 0


@dataclass
class Score:
    """The figures over a set of results (unclear items are counted, not scored)."""

    healthy: int = 0
    healthy_silent: int = 0
    faulty: int = 0
    faulty_detected: int = 0
    root_first: int = 0
    unclear: int = 0
    errors: int = 0
    rules: dict[str, RuleCounts] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def line(self, split: str) -> str:
        return (f"corpus {split}: healthy-silent {self.healthy_silent}/{self.healthy} "
                f"faulty-detected {self.faulty_detected}/{self.faulty} root-first {self.root_first}/{self.faulty}")


def _fired(r: ItemResult) -> list[str]:
    return [f"{slug}({sev})" for slug, _code, sev in r.findings]


def score(results: list[ItemResult]) -> Score:
    """Scores results: the three figures, the per-rule counts and one line per failure."""
    s = Score()

    def rule(slug: str, code: str = "") -> RuleCounts:
        rc = s.rules.setdefault(slug, RuleCounts())
        if code and not rc.code:
            rc.code = code
        return rc

    for r in results:
        if r.label == "unclear":
            s.unclear += 1
            continue
        if r.error is not None:
            s.errors += 1
        fired = {slug: code for slug, code, _sev in r.findings}
        tag = f"{r.id} [{r.label}, {r.kind}]"
        if r.label == "healthy":
            s.healthy += 1
            for slug, code in fired.items():
                rule(slug, code).fp += 1
            if r.error is not None:
                s.failures.append(f"ERROR  {tag}: {r.error}")
            elif r.findings:
                s.failures.append(f"ALARM  {tag}: {' '.join(_fired(r))}")
            else:
                s.healthy_silent += 1
            continue
        s.faulty += 1
        for slug, code in fired.items():
            if slug in r.expected:
                rule(slug, code).tp += 1
            else:
                rule(slug, code).extra += 1
        for slug in r.expected:
            if slug not in fired:
                rule(slug).miss += 1
        if r.error is not None:
            s.failures.append(f"ERROR  {tag}: {r.error}")
            continue
        if any(slug in r.expected for slug in fired):
            s.faulty_detected += 1
        else:
            s.failures.append(f"MISSED {tag}: expected {','.join(r.expected)}; fired "
                              f"{' '.join(_fired(r)) or 'nothing at warning/error'}")
        first = r.findings[0][0] if r.findings else None
        if first is not None and first in r.roots:
            s.root_first += 1
        elif first is not None and any(slug in r.expected for slug in fired):
            s.failures.append(f"ROOT   {tag}: first finding {first}, roots {','.join(r.roots)}")
    return s


def print_score(s: Score, split: str, out: Any = sys.stdout) -> None:
    """Per-rule counts, then the failures; the caller prints the last line."""
    def code_key(item: tuple[str, RuleCounts]) -> tuple[str, str]:
        return (item[1].code or "~", item[0])

    print(f"\n== {split}: per rule (warning/error findings) ==", file=out)
    print(f"{'code':<7} {'slug':<28} {'TP':>4} {'FP':>4} {'extra':>6} {'miss':>5}", file=out)
    for slug, rc in sorted(s.rules.items(), key=code_key):
        print(f"{rc.code or '-':<7} {slug:<28} {rc.tp:>4} {rc.fp:>4} {rc.extra:>6} {rc.miss:>5}", file=out)
    print(f"\n== {split}: failures ({len(s.failures)}) ==", file=out)
    for line in s.failures:
        print(line, file=out)
    print(f"\n{split}: {s.unclear} unclear item(s) left out; {s.errors} error item(s) "
          "(counted as not silent / not detected)", file=out)


# ============================================================================== logs ====
def log_path(corpus: str, entry: dict[str, Any]) -> str:
    """What a user would hand gradprobe: the file of a one-file log, else the run folder."""
    folder = os.path.join(corpus, entry["id"])
    files = entry.get("files") or []
    if len(files) == 1:
        return os.path.join(folder, files[0])
    return folder


def analyze_logs(corpus: str, wanted: dict[str, dict[str, Any]], manifest: dict[str, dict[str, Any]],
                 progress: bool = True) -> list[ItemResult]:
    """Each log through ``gradprobe.analyze`` in this process; a failure is an error item."""
    import gradprobe

    results = []
    for n, (item_id, entry) in enumerate(wanted.items(), 1):
        info = manifest.get(item_id)
        kind = info.get("kind", "log") if info else "log"
        t0 = time.perf_counter()
        if info is None:
            results.append(make_result(item_id, kind, entry, None, error="not in the corpus MANIFEST.json"))
            continue
        try:
            report = gradprobe.analyze(log_path(corpus, info)).to_json()
            err = None
        except Exception as e:  # noqa: BLE001 - any failure to read is the item's result
            report, err = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res = make_result(item_id, kind, entry, report, error=err, seconds=time.perf_counter() - t0)
        results.append(res)
        if progress:
            print(f"[{n}/{len(wanted)}] {item_id} ({res.seconds:.1f}s) "
                  f"{res.error or ' '.join(_fired(res)) or 'silent'}", file=sys.stderr, flush=True)
    return results


# ========================================================================== programs ====
def _env_with_root(workers: int = 1) -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (the gradprobe under test) and,
    unless the caller set it, each program's torch and OpenMP threads limited to its share of
    the cores: two programs each spinning as many OpenMP threads as there are cores made tiny
    runs of ~7 s take 80-320 s on the 2-core machine (spin-waiting threads oversubscribed)."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return env


def run_program(item_id: str, timeout: float, workers: int = 1) -> tuple[dict[str, Any] | None, str | None, float]:
    """``gradprobe run`` on one program in a fresh process group; (report, error, seconds)."""
    script = os.path.join(PROGRAMS_DIR, f"{item_id}.py")
    t0 = time.perf_counter()
    if not os.path.exists(script):
        return None, f"no program file benchmarks/corpus/programs/{item_id}.py", 0.0
    with tempfile.TemporaryDirectory(prefix=f"corpus-{item_id}-") as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "gradprobe", "run", "--logdir", os.path.join(tmp, "run"),
               "--format", "json", "--output", out, script]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env=_env_with_root(workers))
        try:
            _stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, f"ran past {timeout:.0f}s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if not os.path.exists(out):
            tail = stderr.decode(errors="replace").strip().splitlines()
            return None, f"no report (exit {proc.returncode}): {tail[-1] if tail else ''}", seconds
        try:
            with open(out, encoding="utf-8") as f:
                return json.load(f), None, seconds
        except (OSError, ValueError) as e:
            return None, f"unreadable report: {e}", seconds


def run_programs(wanted: dict[str, dict[str, Any]], timeout: float, workers: int,
                 progress: bool = True) -> list[ItemResult]:
    """Each scored program under ``gradprobe run``, ``workers`` at a time. Unclear programs
    are not scored, so they are not run."""
    results: dict[str, ItemResult] = {
        i: make_result(i, "program", e, None) for i, e in wanted.items() if e["label"] == "unclear"}
    runnable = [i for i in wanted if i not in results]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, item_id, timeout, workers): item_id for item_id in runnable}
        for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            item_id = futures[fut]
            report, err, seconds = fut.result()
            res = make_result(item_id, "program", wanted[item_id], report, error=err, seconds=seconds)
            results[item_id] = res
            if progress:
                print(f"[program {n}/{len(runnable)}] {item_id} ({seconds:.1f}s) "
                      f"{res.error or ' '.join(_fired(res)) or 'silent'}", file=sys.stderr, flush=True)
    return [results[i] for i in wanted]


# ============================================================================== main ====
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=SPLITS, default="tune", help="which half to score (default: tune)")
    ap.add_argument("--logs-only", action="store_true", help="only the shared logs, no programs")
    ap.add_argument("--items", default="", help="comma-separated item ids to run (default: every one)")
    ap.add_argument("--corpus", default=None,
                    help="the shared logs folder (default: $GRADPROBE_CORPUS, else ../shared/corpus/logs)")
    ap.add_argument("--timeout", type=float, default=PROGRAM_TIMEOUT_S, help="seconds per program")
    ap.add_argument("--workers", type=int, default=PROGRAM_WORKERS, help="programs run at a time")
    ap.add_argument("--json", default=None, metavar="FILE", help="write every item's result and the figures")
    ap.add_argument("--quiet", action="store_true", help="no per-item progress on stderr")
    args = ap.parse_args(argv)

    corpus = args.corpus or os.environ.get("GRADPROBE_CORPUS") or DEFAULT_CORPUS
    manifest_path = os.path.join(corpus, "MANIFEST.json")
    if not os.path.isfile(manifest_path):
        print(f"corpus.py: no shared corpus at {corpus} (no MANIFEST.json); pass --corpus DIR or set "
              "GRADPROBE_CORPUS", file=sys.stderr)
        return 2
    with open(manifest_path, encoding="utf-8") as f:
        manifest = {e["id"]: e for e in json.load(f)}

    try:  # a gradprobe that does not import is not a log that fails to read
        for module in ("gradprobe.engine", "gradprobe.rules"):
            importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        print(f"corpus.py: gradprobe does not import ({type(e).__name__}: {e})", file=sys.stderr)
        return 2

    only = {i for i in args.items.split(",") if i}
    all_logs, all_programs = load_labels(LABELS), load_labels(PROGRAMS)
    unknown = only - set(all_logs) - set(all_programs)
    if unknown:
        print(f"corpus.py: no labelled item {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    logs = {k: v for k, v in all_logs.items() if in_split(v, args.split) and (not only or k in only)}
    programs = {} if args.logs_only else {
        k: v for k, v in all_programs.items() if in_split(v, args.split) and (not only or k in only)}
    outside = sorted(only - set(logs) - set(programs))
    if outside:
        print(f"corpus.py: not in this run (other split, or a program with --logs-only): {', '.join(outside)}",
              file=sys.stderr)

    results = analyze_logs(corpus, logs, manifest, progress=not args.quiet)
    if programs:
        results += run_programs(programs, args.timeout, args.workers, progress=not args.quiet)

    splits = ("tune", "check") if args.split == "all" else (args.split,)
    scores = {sp: score([r for r in results if r.split == sp]) for sp in splits}
    for sp in splits:
        print_score(scores[sp], sp)
    if args.split == "all":
        total = score(results)
        print()
        for sp in splits:
            print(scores[sp].line(sp))
    else:
        total = scores[args.split]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"split": args.split, "line": total.line(args.split),
                       "figures": {sp: scores[sp].line(sp) for sp in splits},
                       "items": [r.__dict__ for r in results]}, f, indent=1)
    print(total.line(args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
