"""Terminal renderer (rich): the root cause and its fix first, then the evidence."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.text import Text

from gradprobe.render._common import evidence_line, header_lines, recommendation_line, severity_note, title_line
from gradprobe.report import Report

STYLE = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}


def render(report: Report, *, color: bool = False, width: int = 100, **_: Any) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=color, no_color=not color, highlight=False, soft_wrap=False)
    print_report(report, console)
    return buf.getvalue()


def print_report(report: Report, console: Console) -> None:
    for i, line in enumerate(header_lines(report)):
        console.print(Text(line, style="bold" if i == 0 else "dim"))
    if not report.findings and report.source.get("steps") == 0:  # nothing was judged: never "healthy"
        console.print(Text("\nNo training step was recorded: there is nothing to judge.", style="bold yellow"))
        for line in (report.source.get("no_step") or {}).get("observed") or []:
            console.print(Text(f"  - {line}"))
    elif not report.findings:
        console.print(Text("\nNo findings: nothing in this run looks unhealthy to the rules that could run.", style="green"))
    for f in report.findings:
        console.print()
        console.print(Text(title_line(f), style=STYLE[f.severity]))
        console.print(Text("  " + f.message))
        note = severity_note(f)
        if note:
            console.print(Text(f"  ({note})", style="dim"))
        if f.caused_by:
            console.print(Text("  caused by: " + ", ".join(f.caused_by), style="dim"))
        if f.recommendations:
            console.print(Text("  fix:", style="bold"))
            for r in f.recommendations:
                console.print(Text("    - " + recommendation_line(r)))
                if r.kind == "code" and r.snippet:
                    for sl in r.snippet.rstrip().splitlines():
                        console.print(Text("        " + sl, style="green"))
        if f.evidence:
            console.print(Text("  evidence: " + evidence_line(f), style="dim"))
    if report.suggested_hyperparameters:
        console.print()
        items = ", ".join(f"{k}={v}" for k, v in report.suggested_hyperparameters.items())
        console.print(Text("suggested hyperparameters: " + items, style="bold"))
    if report.skipped_rules:
        console.print()
        console.print(Text(f"{len(report.skipped_rules)} rule(s) skipped:", style="dim"))
        for s in report.skipped_rules:
            console.print(Text(f"  {s.code} {s.rule}: {s.reason}", style="dim"))
