"""Markdown renderer (also used for the TensorBoard findings text)."""

from __future__ import annotations

from typing import Any

from gradprobe.render._common import ICON, evidence_items, fmt_number, header_lines, recommendation_line, severity_note, verdict_lines
from gradprobe.report import Report


def _esc(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render(report: Report, **_: Any) -> str:
    head = header_lines(report)
    out = [f"# {head[0]}", ""]
    for line in head[1:]:
        out.append(f"- {line.strip()}")
    out.append("")
    verdict = verdict_lines(report)
    if verdict:  # no finding: what was judged, never "healthy" about what was not observed
        first, _, rest = verdict[0].partition(": ")
        out.append(f"**{first}:** {rest}" if rest else f"**{first}**")
        out.extend(["", *verdict[1:]] if len(verdict) > 1 else [])
        out.extend(["", *[f"- {line}" for line in (report.source.get("no_step") or {}).get("observed") or []], ""])
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
        items = evidence_items(f)
        if items:
            out.append("| evidence | value |")
            out.append("|---|---|")
            for label, value in items:
                out.append(f"| {_esc(label)} | {_esc(value)} |")
            out.append("")
    if report.suggested_hyperparameters:
        out.append("## Suggested hyperparameters")
        out.append("")
        for k, v in report.suggested_hyperparameters.items():
            out.append(f"- `{k}` = {fmt_number(v)}")
        out.append("")
    if report.skipped_rules:
        # plain Markdown only: TensorBoard's text dashboard shows raw HTML tags as text
        out.append(f"## {len(report.skipped_rules)} rule(s) skipped")
        out.append("")
        for s in report.skipped_rules:
            out.append(f"- {s.code} `{s.rule}`: {s.reason}")
    return "\n".join(out).rstrip() + "\n"
