"""Text pieces shared by the terminal and Markdown renderers."""

from __future__ import annotations

from typing import Any

from gradprobe.report import Finding, Recommendation, Report

ICON = {"error": "✖", "warning": "▲", "info": "ℹ"}


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
    return str(v)


def header_lines(report: Report) -> list[str]:
    src = report.source
    s = report.summary
    run = f", run {src['run']}" if src.get("run") else ""  # one run of several in PATH (TensorBoard, MLflow)
    lines = [f"gradprobe report: {src.get('path')} ({src.get('kind')}{run}, {src.get('steps')} steps)"]
    parts = []
    if s.get("optimizer"):
        parts.append(str(s["optimizer"]))
    if s.get("lr") is not None:
        parts.append(f"lr={fmt_value(s['lr'])}")
    if s.get("max_norm") is not None:
        parts.append(f"max_norm={fmt_value(s['max_norm'])}")
    if s.get("amp"):
        parts.append(f"amp={s['amp']}")
    for r in s.get("recurrent") or []:
        parts.append(f"{r.get('module')}: hidden {r.get('hidden_size')}, lookback {r.get('lookback')}")
    if parts:
        lines.append("  " + " | ".join(parts))
    for note in list(src.get("skipped") or []) + list(src.get("notes") or []):  # notes: how a foreign log was read
        lines.append(f"  note: {note}")
    return lines


def recommendation_line(r: Recommendation) -> str:
    if r.kind == "hyperparameter":
        if r.suggested is None:
            return f"{r.name}: {fmt_value(r.current)} ({r.reason})"
        return f"{r.name}: {fmt_value(r.current)} -> {fmt_value(r.suggested)}  ({r.reason})"
    return f"{r.summary}" + (f"  ({r.reason})" if r.reason else "")


def evidence_line(f: Finding) -> str:
    items = [f"{k}={fmt_value(v)}" for k, v in f.evidence.items()]
    return ", ".join(items)


def severity_note(f: Finding) -> str | None:
    """Why the finding's severity differs from its rule's catalog severity, and whether
    further training can undo it; None when there is nothing to say."""
    parts = []
    if f.severity_reason:
        parts.append(f"{f.severity} because {f.severity_reason}")
    if f.final:
        parts.append("final: further training cannot undo it")
    return "; ".join(parts) or None


def title_line(f: Finding) -> str:
    where = []
    if f.first_step is not None:
        where.append(f"from step {f.first_step}")
    if f.layer:
        where.append(f"in {f.layer}")
    w = (" (" + ", ".join(where) + ")") if where else ""
    return f"{ICON[f.severity]} {f.severity.upper()} {f.code} {f.rule}: {f.title}{w}  [confidence {f.confidence:.2f}]"
