"""The rule engine: RunLog -> Report.

Every registered rule whose required signals the log has runs on a shared
:class:`~gradprobe.analysis.RunContext`; the others are listed as skipped with the signals
they lacked. A rule that crashes is skipped with the error (a bug in one rule never hides
the others, and ``analyze`` never shows a traceback). Symptoms are linked to their causes
(``caused_by``) and root causes are listed first; hyperparameter recommendations are merged
into ``suggested_hyperparameters`` with one value per name, the root cause's winning.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gradprobe.analysis import RunContext
from gradprobe.report import SEVERITY_RANK, Finding, Report, SkippedRule
from gradprobe.rules.base import registry
from gradprobe.runlog import RunLog


def analyze(source: Any) -> Report:
    """Analyzes a path (any supported log) or a :class:`RunLog`."""
    if isinstance(source, RunLog):
        return analyze_runlog(source)
    path = os.fspath(source)
    ranks = rank_dirs(path)
    if ranks:
        return analyze_ranks(path, ranks)
    from gradprobe.readers import load

    return analyze_runlog(load(path))


def rank_dirs(path: str) -> dict[int, str]:
    """``rank<N>`` run directories of a distributed run (one per rank), if ``path`` is one."""
    from gradprobe.runlog.runlog import is_run_dir

    if not os.path.isdir(path) or is_run_dir(path):
        return {}
    out = {}
    try:
        entries = os.listdir(path)
    except OSError:
        return {}
    for name in entries:
        if name.startswith("rank") and name[4:].isdigit() and is_run_dir(os.path.join(path, name)):
            out[int(name[4:])] = os.path.join(path, name)
    return dict(sorted(out.items()))


def analyze_ranks(path: str, dirs: dict[int, str]) -> Report:
    """One report for a distributed run: each rank's log is analyzed on its own, each rule
    keeps the finding that started first (naming the rank in its evidence and message), and
    the cross-rank rule (GP801) compares the ranks."""
    from gradprobe.runlog import LogError

    logs: dict[int, RunLog] = {}
    notes: list[str] = []
    for r, d in dirs.items():
        try:
            logs[r] = RunLog.load(d)
        except LogError as exc:
            notes.append(f"rank {r}: {exc}")
    if not logs:
        raise LogError(f"{path}: no readable rank log ({'; '.join(notes)})")
    reports = {r: analyze_runlog(log) for r, log in logs.items()}
    from gradprobe.rules.distributed import RankDivergence

    ctxs = {r: RunContext(log) for r, log in logs.items()}
    try:
        across = RankDivergence().check_ranks(ctxs)
    except Exception as exc:  # noqa: BLE001
        across = []
        notes.append(f"rank comparison failed: {type(exc).__name__}: {exc}")
    # the rank a fault started on: a finding every rank shows from the same step (NaN
    # gradients after the all-reduce) is told from that rank's point of view
    origin = next((f.evidence.get("rank") for f in across if "where" in f.evidence), None)
    merged: dict[str, tuple[int, Finding, list[int]]] = {}
    for r, rep in reports.items():
        for f in rep.findings:
            key = f.rule
            if key not in merged:
                merged[key] = (r, f, [r])
                continue
            r0, f0, seen = merged[key]
            seen.append(r)
            s_new = f.first_step if f.first_step is not None else 1 << 62
            s_old = f0.first_step if f0.first_step is not None else 1 << 62
            if s_new < s_old or (s_new == s_old and r == origin):
                merged[key] = (r, f, seen)
    findings: list[Finding] = []
    multi = len(logs) > 1
    for r, f, seen in merged.values():
        f.caused_by = []
        if multi:
            f.evidence = {"rank": r, "ranks": sorted(set(seen)), **f.evidence}
            f.message = f"[rank {r}] {f.message}"
        findings.append(f)
    findings.extend(across)
    _link_causes(findings)
    findings = _order(findings)
    suggested = _merge_hyperparameters(findings)
    first = min(logs)
    skipped_sets = [{s.rule for s in rep.skipped_rules} for rep in reports.values()]
    common_skipped = set.intersection(*skipped_sets) if skipped_sets else set()
    skipped = [s for s in reports[first].skipped_rules if s.rule in common_skipped and s.rule != RankDivergence.slug]
    source = {
        "path": path,
        "kind": "gradprobe",
        "steps": max(int(len(log.steps)) for log in logs.values()),
        "ranks": sorted(logs),
        "skipped": notes + [f"rank {r}: {s}" for r, log in logs.items() for s in log.source.get("skipped", [])],
    }
    summary = dict(reports[first].summary)
    summary["world_size"] = len(dirs)
    return Report(source=source, summary=summary, findings=findings, suggested_hyperparameters=suggested,
                  skipped_rules=skipped, runlog=logs[first])


def analyze_runlog(log: RunLog) -> Report:
    ctx = RunContext(log)
    findings: list[Finding] = []
    skipped: list[SkippedRule] = []
    for cls in registry():
        # an entry "a|b" is met by either signal
        missing = [s for s in cls.requires if not any(alt in ctx.signals for alt in s.split("|"))]
        if missing:
            skipped.append(SkippedRule(cls.slug, cls.code, "needs " + ", ".join(missing) + " (not in this log)"))
            continue
        try:
            out = cls().check(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken rule never hides the others
            skipped.append(SkippedRule(cls.slug, cls.code, f"rule error: {type(exc).__name__}: {exc}"[:300]))
            continue
        findings.extend(out or [])
    _link_causes(findings)
    findings = _order(findings)
    suggested = _merge_hyperparameters(findings)
    source = dict(log.source)
    source.setdefault("path", "<memory>")
    source.setdefault("kind", "gradprobe")
    source["steps"] = int(len(log.steps))
    return Report(
        source=source,
        summary=summarize(ctx),
        findings=findings,
        suggested_hyperparameters=suggested,
        skipped_rules=skipped,
        runlog=log,
    )


def _link_causes(findings: list[Finding]) -> None:
    """Links each symptom to the root causes its rule lists (``Rule.causes``) that are in the
    report and started no later than it. A rule that named its causes from evidence keeps
    exactly those. A link that would close a cycle (the cause is itself, directly or through
    other links, a consequence of the symptom) is not made: causation runs one way."""
    present = {f.rule: f for f in findings}
    by_slug = {cls.slug: cls for cls in registry()}
    named = {f.rule for f in findings if f.caused_by}

    def reaches(src: str, dst: str) -> bool:
        """``dst`` is among the (transitive) causes of ``src``."""
        seen: set[str] = set()
        stack = [src]
        while stack:
            r = stack.pop()
            for c in present[r].caused_by if r in present else []:
                if c == dst:
                    return True
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return False

    def when(f: Finding) -> int:
        return f.first_step if f.first_step is not None else 1 << 62

    for f in sorted(findings, key=when):
        cls = by_slug.get(f.rule)
        if cls is None or f.rule in named:
            continue  # a rule that named its causes from evidence keeps exactly those
        for cause in cls.causes:
            c = present.get(cause)
            if c is None or c is f or cause in f.caused_by:
                continue
            # a cause must not start after its symptom
            if c.first_step is not None and f.first_step is not None and c.first_step > f.first_step:
                continue
            # a cause that is itself a consequence of this symptom is not its cause
            if reaches(cause, f.rule):
                continue
            f.caused_by.append(cause)
    # no cycles between causes rules named from evidence either: keep the earlier one's link
    for f in findings:
        for cause in list(f.caused_by):
            c = present.get(cause)
            if c is not None and f.rule in c.caused_by:
                later = f if (f.first_step or 0) >= (c.first_step or 0) else c
                earlier = c if later is f else f
                if earlier.rule in later.caused_by and later.rule in earlier.caused_by:
                    earlier.caused_by.remove(later.rule)


def _order(findings: list[Finding]) -> list[Finding]:
    """Root causes first; then by severity, first step, code."""
    by_rule = {f.rule: f for f in findings}

    def depth(f: Finding, seen: frozenset[str] = frozenset()) -> int:
        if not f.caused_by or f.rule in seen:
            return 0
        return 1 + max((depth(by_rule[c], seen | {f.rule}) for c in f.caused_by if c in by_rule), default=-1)

    def key(f: Finding) -> tuple[Any, ...]:
        fs = f.first_step if f.first_step is not None else 1 << 62
        return (depth(f), SEVERITY_RANK[f.severity], fs, f.code)

    return sorted(findings, key=key)


def _merge_hyperparameters(findings: list[Finding]) -> dict[str, Any]:
    """One value per canonical name, the root cause's winning (findings come ordered, roots
    first). A symptom whose cause recommends hyperparameters of its own is not merged: its
    numbers were measured on a run that cause distorted (an lr computed from steps that
    over-clipping shrank, a max_norm from spikes a too-high lr produced), fixing the cause
    changes them, and merged next to the cause's they would contradict it. The symptom's
    finding keeps them, marked as such. A symptom whose cause has only a code fix keeps its
    numbers in the merge (the tunable workaround, e.g. bfloat16 for raw inputs that
    overflow float16)."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    tuned = {f.rule for f in findings if f.severity != "info"
             and any(r.kind == "hyperparameter" and r.suggested is not None for r in f.recommendations)}
    for f in findings:
        if f.severity == "info":
            continue
        causes = [c for c in f.caused_by if c in tuned and c != f.rule]
        if causes:
            for rec in f.recommendations:
                if rec.kind == "hyperparameter" and "(not merged" not in rec.reason:
                    rec.reason += f" (not merged: a symptom of {', '.join(causes)}; fix that first)"
            continue
        for rec in f.recommendations:
            if rec.kind != "hyperparameter" or rec.name is None or rec.suggested is None:
                continue
            if rec.name not in merged:
                merged[rec.name] = rec.suggested
                source[rec.name] = f.rule
            elif merged[rec.name] != rec.suggested:
                rec.reason += f" (superseded by {source[rec.name]}: {rec.name}={merged[rec.name]})"
    return merged


def summarize(ctx: RunContext) -> dict[str, Any]:
    amp = ctx.amp_dtype
    sc = ctx.scaler
    out: dict[str, Any] = {
        "optimizer": ctx.optimizer_class,
        "lr": ctx.lr0,
        "max_norm": ctx.max_norm,
        "amp": amp,
        "recurrent": [
            {"module": r.get("module"), "hidden_size": r.get("hidden_size"), "lookback": r.get("lookback")}
            for r in ctx.recurrent
        ],
    }
    if sc is not None:
        out["scaler"] = {k: sc.get(k) for k in ("init_scale", "growth_factor", "backoff_factor", "growth_interval")}
    if ctx.n:
        loss = ctx.loss
        fin = loss[np.isfinite(loss)]
        out["final_loss"] = float(fin[-1]) if fin.size else None
    if ctx.log.meta.get("world_size", 1) and int(ctx.log.meta.get("world_size", 1) or 1) > 1:
        out["world_size"] = int(ctx.log.meta["world_size"])
    return out
