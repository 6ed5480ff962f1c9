"""Markdown renderer (also used for the TensorBoard findings text)."""

from __future__ import annotations

from typing import Any

from gradprobe.render._common import ICON, fmt_value, header_lines, recommendation_line, severity_note
from gradprobe.report import Report


def _esc(s: str) -> str:
    return s.replace("|", "\\|")


def render(report: Report, **_: Any) -> str:
    head = header_lines(report)
    out = [f"# {head[0]}", ""]
    for line in head[1:]:
        out.append(f"- {line.strip()}")
    out.append("")
    if not report.findings and report.source.get("steps") == 0:  # nothing was judged: never "healthy"
        out.append("**No training step was recorded:** there is nothing to judge.")
        out.extend(["", *[f"- {line}" for line in (report.source.get("no_step") or {}).get("observed") or []], ""])
    elif not report.findings:
        out.append("**No findings.** Nothing in this run looks unhealthy to the rules that could run.")
    for f in report.findings:
        where = f" from step {f.first_step}" if f.first_step is not None else ""
        layer = f" in `{f.layer}`" if f.layer else ""
        out.append(f"## {ICON[f.severity]} {f.severity}: {f.code} `{f.rule}`: {f.title}")
        out.append("")
        out.append(f"*confidence {f.confidence:.2f}{where}{layer}*")
        out.append("")
        out.append(f.message)
        out.append("")
        note = severity_note(f)
        if note:
            out.append(f"*({_esc(note)})*")
            out.append("")
        if f.caused_by:
            out.append("Caused by: " + ", ".join(f"`{c}`" for c in f.caused_by))
            out.append("")
        if f.recommendations:
            out.append("**Fix**")
            out.append("")
            for r in f.recommendations:
                out.append(f"- {recommendation_line(r)}")
                if r.kind == "code" and r.snippet:
                    out.append("")
                    out.append("  ```python")
                    out.extend("  " + line for line in r.snippet.rstrip().splitlines())
                    out.append("  ```")
            out.append("")
        if f.evidence:
            out.append("| evidence | value |")
            out.append("|---|---|")
            for k, v in f.evidence.items():
                out.append(f"| {_esc(str(k))} | {_esc(fmt_value(v))} |")
            out.append("")
    if report.suggested_hyperparameters:
        out.append("## Suggested hyperparameters")
        out.append("")
        for k, v in report.suggested_hyperparameters.items():
            out.append(f"- `{k}` = {v}")
        out.append("")
    if report.skipped_rules:
        # plain Markdown only: TensorBoard's text dashboard shows raw HTML tags as text
        out.append(f"## {len(report.skipped_rules)} rule(s) skipped")
        out.append("")
        for s in report.skipped_rules:
            out.append(f"- {s.code} `{s.rule}`: {s.reason}")
    return "\n".join(out).rstrip() + "\n"
