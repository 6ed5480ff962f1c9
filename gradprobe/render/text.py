"""Terminal renderer (rich): the root cause and its fix first, then the evidence.

Prose is wrapped at the terminal's width (``COLUMNS`` when set; 100 columns when the output
is not a terminal), with hanging indents. Code is never wrapped: each snippet line is
printed whole (a terminal that is too narrow scrolls or folds it on screen, and a copy of it
still runs). Colour only on a terminal, never with ``--no-color`` or ``NO_COLOR``.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from gradprobe.render._common import (
    evidence_items,
    fmt_number,
    header_lines,
    recommendation_line,
    severity_note,
    title_line,
    verdict_lines,
)
from gradprobe.report import Report

STYLE = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}
#: the width when the output is not a terminal and COLUMNS is unset (a file, a pipe, CI logs)
DEFAULT_WIDTH = 100
#: narrower than this and the hanging indents leave no room for the words
MIN_WIDTH = 40
#: spaces at the end of a line, before any closing colour codes
_TRAILING = re.compile(r" +((?:\x1b\[[0-9;]*m)*)$", re.M)
#: where each part of a finding starts
INDENT, ITEM, CODE = 2, 4, 8


def terminal_width(stream: Any = None) -> int:
    """The width to render at: ``COLUMNS`` when set, else the terminal's width when
    ``stream`` is a terminal, else :data:`DEFAULT_WIDTH`."""
    cols = os.environ.get("COLUMNS", "")
    if cols.strip().isdigit() and int(cols) > 0:
        return max(MIN_WIDTH, int(cols))
    try:
        if stream is not None and stream.isatty():
            return max(MIN_WIDTH, os.get_terminal_size(stream.fileno()).columns)
    except (AttributeError, OSError, ValueError):
        pass
    return DEFAULT_WIDTH


def color_allowed(stream: Any, no_color: bool = False) -> bool:
    """Colour when writing to a terminal, unless ``--no-color`` or ``NO_COLOR`` (any
    non-empty value, https://no-color.org) says otherwise."""
    if no_color or os.environ.get("NO_COLOR", ""):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def render(report: Report, *, color: bool = False, width: int | None = None, **_: Any) -> str:
    buf = io.StringIO()
    w = max(MIN_WIDTH, int(width)) if width else terminal_width(None)
    console = Console(file=buf, width=w, force_terminal=color, no_color=not color, color_system="standard" if color else None,
                      highlight=False, emoji=False, markup=False, legacy_windows=False)
    print_report(report, console)
    # rich pads wrapped blocks to the width: no line ends in spaces (a pasted line stays clean)
    return _TRAILING.sub(r"\1", buf.getvalue())


def _para(console: Console, text: str, indent: int, style: str = "") -> None:
    """Wrapped prose, every line indented by ``indent``."""
    console.print(Padding(Text(text, style=style), (0, 0, 0, indent), expand=False))


def _item(console: Console, text: str, indent: int, style: str = "") -> None:
    """A "- " item wrapped with a hanging indent (its continuation lines under its text)."""
    grid = Table.grid(padding=0)
    grid.add_column(width=indent + 2, no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(Text(" " * indent + "- ", style=style), Text(text, style=style))
    console.print(grid)


def _code(console: Console, line: str, indent: int) -> None:
    """One snippet line, whole: no wrap, no crop."""
    console.print(Text(" " * indent + line, style="green"), soft_wrap=True)


def print_report(report: Report, console: Console) -> None:
    head = header_lines(report)
    console.print(Text(head[0], style="bold"))
    for line in head[1:]:
        _para(console, line.strip(), INDENT, style="dim")
    verdict = verdict_lines(report)
    if verdict:
        console.print()
        healthy = verdict[0].startswith("No findings:")
        for i, line in enumerate(verdict):
            _para(console, line, 0, style=("green" if healthy else "bold yellow") if i == 0 else "")
        for line in (report.source.get("no_step") or {}).get("observed") or []:
            _item(console, line, INDENT)
    for f in report.findings:
        console.print()
        console.print(Text(title_line(f), style=STYLE[f.severity]))
        _para(console, f.message, INDENT)
        note = severity_note(f)
        if note:
            _para(console, f"({note})", INDENT, style="dim")
        if f.caused_by:
            _para(console, "caused by: " + ", ".join(f.caused_by), INDENT, style="dim")
        if f.recommendations:
            console.print(Text(" " * INDENT + "fix:", style="bold"))
            for r in f.recommendations:
                _item(console, recommendation_line(r), ITEM)
                if r.kind == "code" and r.snippet:
                    for sl in r.snippet.rstrip().splitlines():
                        _code(console, sl, CODE)
        items = evidence_items(f)
        if items:
            console.print(Text(" " * INDENT + "evidence:", style="dim"))
            for label, value in items:
                _item(console, f"{label}: {value}", ITEM, style="dim")
    if report.suggested_hyperparameters:
        console.print()
        items_s = ", ".join(f"{k}={fmt_number(v)}" for k, v in report.suggested_hyperparameters.items())
        _para(console, "suggested hyperparameters: " + items_s, 0, style="bold")
    if report.skipped_rules:
        console.print()
        console.print(Text(f"{len(report.skipped_rules)} rule(s) skipped:", style="dim"))
        for s in report.skipped_rules:
            _para(console, f"{s.code} {s.rule}: {s.reason}", INDENT, style="dim")
