"""The rule engine: RunLog -> Report.

1. Every registered one-run rule whose required signals the log has runs on one shared
   :class:`~gradprobe.analysis.RunContext`; the others are listed as skipped with the signals
   they lacked. A rule that crashes is skipped with the error (a bug in one rule never hides
   the others, and ``analyze`` never shows a traceback). Rules never call each other.
2. Every hyperparameter a finding suggests is checked against what the run shows
   (:func:`gradprobe.analysis.implausible`); an implausible value is withdrawn, with the reason.
3. Causation: each symptom is linked (``caused_by``) to the root causes it may follow from
   (its rule's ``causes``, and the ``causes_on_evidence`` its own evidence named) that are in
   the report and started no later, never closing a cycle.
4. Order: root causes first (depth in the links), then by severity, by the causal order the
   rules declare, and by first step.
5. Hyperparameters are merged into ``suggested_hyperparameters``, one value per name, the root
   cause's winning.

Distributed runs: each rank's log is analyzed on its own, findings of a rule are merged to the
rank where they started, and the cross-rank rules (:class:`~gradprobe.rules.base.CrossRankRule`)
compare the ranks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gradprobe.analysis import RunContext, implausible
from gradprobe.report import SEVERITY_RANK, Finding, Report, SkippedRule
from gradprobe.rules.base import rank_rules, registry, run_rules
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
    ctxs = {r: RunContext(log) for r, log in logs.items()}
    across: list[Finding] = []
    for cls in rank_rules():
        try:
            across.extend(_attach_fields(cls, cls().check_ranks(ctxs)))
        except Exception as exc:  # noqa: BLE001 - one broken rule never hides the others
            notes.append(f"rank comparison {cls.code} failed: {type(exc).__name__}: {exc}")
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
    cross = {c.slug for c in rank_rules()}
    skipped = [s for s in reports[first].skipped_rules if s.rule in common_skipped and s.rule not in cross]
    source = {
        "path": path,
        "kind": "gradprobe",
        "steps": max(int(len(log.steps)) for log in logs.values()),
        "ranks": sorted(logs),
        "skipped": notes + [f"rank {r}: {s}" for r, log in logs.items() for s in log.source.get("skipped", [])],
    }
    stops = [dict(rep.source["stopped"], rank=r) for r, rep in reports.items() if rep.source.get("stopped")]
    if stops:  # each rank decides from its own log: the first to stop is the one that ended the job
        source["stopped"] = min(stops, key=lambda s: float(s.get("wall_time") or 0.0))
    summary = dict(reports[first].summary)
    summary["world_size"] = len(dirs)
    return Report(source=source, summary=summary, findings=findings, suggested_hyperparameters=suggested,
                  skipped_rules=skipped, runlog=logs[first])


def analyze_runlog(log: RunLog) -> Report:
    ctx = RunContext(log)
    findings: list[Finding] = []
    skipped: list[SkippedRule] = []
    for cls in run_rules():
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
        findings.extend(_attach_fields(cls, out or []))
    _withdraw_implausible(ctx, findings)
    _link_causes(findings)
    findings = _order(findings)
    suggested = _merge_hyperparameters(findings)
    source = dict(log.source)
    source.setdefault("path", "<memory>")
    source.setdefault("kind", "gradprobe")
    source["steps"] = int(len(log.steps))
    stop = (log.meta or {}).get("stopped")
    if isinstance(stop, dict):  # --stop-on ended the run here (gradprobe.live)
        source["stopped"] = dict(stop)
    return Report(
        source=source,
        summary=summarize(ctx),
        findings=findings,
        suggested_hyperparameters=suggested,
        skipped_rules=skipped,
        runlog=log,
    )


def _attach_fields(cls: type, findings: list[Finding]) -> list[Finding]:
    """Labels and units of the evidence fields, from the rule's declarations (renderers print
    phrases from them)."""
    fields = getattr(cls, "evidence_fields", {}) or {}
    for f in findings:
        f.evidence_fields = {k: (fields[k].label, fields[k].unit) for k in f.evidence if k in fields}
    return findings


def _withdraw_implausible(ctx: RunContext, findings: list[Finding]) -> None:
    """A suggested value that the run contradicts (not a finite number of the right kind, no
    change, or outside what the healthy part of the run shows) is withdrawn: the
    recommendation keeps its name and says why no value is suggested."""
    for f in findings:
        for rec in f.recommendations:
            if rec.kind != "hyperparameter" or rec.name is None or rec.suggested is None:
                continue
            why = implausible(ctx, rec.name, rec.current, rec.suggested)
            if why:
                rec.reason = f"not suggested: {why} (computed {rec.suggested!r} from: {rec.reason})"
                rec.suggested = None


def _when(f: Finding) -> int:
    return f.first_step if f.first_step is not None else 1 << 62


def _link_causes(findings: list[Finding]) -> None:
    """Links each symptom to the root causes it may follow from that are in the report and
    started no later than it: its rule's ``causes`` and the ``causes_on_evidence`` its own
    evidence named (``Finding.cause_candidates``; a finding built without them keeps the
    causes it already names as candidates). Findings are linked in order of first step; a link
    that would close a cycle (the cause is itself, directly or through other links, a
    consequence of the symptom) is not made: causation runs one way."""
    present: dict[str, Finding] = {}
    for f in sorted(findings, key=_when):
        present.setdefault(f.rule, f)
    by_slug = {cls.slug: cls for cls in registry()}
    candidates: dict[int, list[str]] = {}
    for f in findings:
        cls = by_slug.get(f.rule)
        if f.cause_candidates is not None:
            cands = list(f.cause_candidates)
        else:
            cands = list(dict.fromkeys([*f.caused_by, *(cls.causes if cls else ())]))
        candidates[id(f)] = cands
        f.caused_by = []

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

    for f in sorted(findings, key=_when):
        for cause in candidates[id(f)]:
            c = present.get(cause)
            if c is None or c is f or cause == f.rule or cause in f.caused_by:
                continue
            if c.first_step is not None and f.first_step is not None and c.first_step > f.first_step:
                continue  # a cause must not start after its symptom
            if reaches(cause, f.rule):
                continue  # the cause is itself a consequence of this symptom
            f.caused_by.append(cause)


def declared_upstream(present: set[str]) -> dict[str, set[str]]:
    """slug -> the present slugs the rules declare as its possible causes, directly or through
    other present findings (a chain through a rule that did not fire is no chain)."""
    direct = {cls.slug: (set(cls.causes) | set(cls.causes_on_evidence)) & present for cls in registry()}
    out: dict[str, set[str]] = {}
    for slug in present:
        seen: set[str] = set()
        stack = list(direct.get(slug, ()))
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            stack.extend(direct.get(c, ()))
        out[slug] = seen
    return out


def _order(findings: list[Finding]) -> list[Finding]:
    """Root causes first (depth in the links), then by severity, by the causal order the
    rules declare (a finding whose rule is declared, transitively, as a possible cause of
    another present finding's rule, and not the other way round, comes before it when it
    started no later), then by first step and code."""
    by_rule = {f.rule: f for f in findings}
    present = set(by_rule)
    upstream = declared_upstream(present)

    def depth(f: Finding, seen: frozenset[str] = frozenset()) -> int:
        if not f.caused_by or f.rule in seen:
            return 0
        return 1 + max((depth(by_rule[c], seen | {f.rule}) for c in f.caused_by if c in by_rule), default=-1)

    def declared_rank(f: Finding) -> int:
        # present findings strictly upstream of this one in the declared causal graph that
        # started no later (a later one cannot be its cause, whatever the rules declare)
        ups = upstream.get(f.rule, set())
        return sum(1 for r in present if r != f.rule and r in ups and f.rule not in upstream.get(r, set())
                   and _when(by_rule[r]) <= _when(f))

    def key(f: Finding) -> tuple[Any, ...]:
        return (depth(f), SEVERITY_RANK[f.severity], declared_rank(f), _when(f), f.code)

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
