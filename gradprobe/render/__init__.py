"""Renderers: one function per format, ``render(report) -> str`` (pyinstrument's shape).

No renderer knows about hooks: they read a :class:`~gradprobe.report.Report` only.
"""

from __future__ import annotations

from typing import Any, Callable

from gradprobe.report import Report


def _renderers() -> dict[str, Callable[..., str]]:
    from gradprobe.render import html as h
    from gradprobe.render import json_ as j
    from gradprobe.render import markdown as md
    from gradprobe.render import text as tx

    return {"text": tx.render, "markdown": md.render, "json": j.render, "html": h.render}


FORMATS = ("text", "json", "markdown", "html")


def render(report: Report, fmt: str = "text", **kwargs: Any) -> str:
    r = _renderers().get(fmt)
    if r is None:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    return r(report, **kwargs)
