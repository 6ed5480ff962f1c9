"""``gradprobe``: run, analyze, rules (typer).

Exit codes: 0 no finding at or above ``--fail-on``; 1 there are; 2 bad input or usage, with
one line on stderr and no traceback.
"""

from __future__ import annotations

import enum
import json
import sys
import warnings
from typing import Optional

import typer

from gradprobe._version import __version__

app = typer.Typer(
    name="gradprobe",
    help="Diagnostic gradient-health profiler for PyTorch training: records what the gradients did and names the cause when a run goes wrong.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ReportFormat(str, enum.Enum):
    text = "text"
    json = "json"
    markdown = "markdown"
    html = "html"


class RulesFormat(str, enum.Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class FailOn(str, enum.Enum):
    error = "error"
    warning = "warning"
    never = "never"


#: every character ``str.splitlines`` breaks at, written as its escape
_LINE_BREAKS = {c: ascii(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def one_line(text: str) -> str:
    """``text`` on one line: line breaks inside it (a path or a log's string holding a
    newline) are written as escapes (``\\n``), so the error stays one line."""
    return text.translate(_LINE_BREAKS)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Prints one line on stderr and exits (no traceback)."""
    sys.stderr.write(f"gradprobe: {one_line(message)}\n")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradprobe {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """gradprobe: why did my training run go wrong, and what should I change?"""


def write_output(text: str, output: Optional[str], *, stream: object = None) -> None:
    if output:
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")
    else:
        (stream or sys.stdout).write(text)  # type: ignore[attr-defined]
        (stream or sys.stdout).flush()  # type: ignore[attr-defined]


def render_report(report: object, fmt: str, *, color: bool = False, width: Optional[int] = None) -> str:
    from gradprobe.render import render

    if fmt == "text":
        return render(report, "text", color=color, width=width)  # type: ignore[arg-type]
    return render(report, fmt)  # type: ignore[arg-type]


def text_style(stream: object, to_file: bool, no_color: bool) -> tuple[bool, int]:
    """(colour, width) of a text report written to ``stream`` (or to a file): colour only on
    a terminal and never with --no-color or NO_COLOR; the terminal's width, COLUMNS, or 100."""
    from gradprobe.render.text import color_allowed, terminal_width

    if to_file:
        return False, terminal_width(None)
    return color_allowed(stream, no_color), terminal_width(stream)


@app.command()
def analyze(
    path: str = typer.Argument(..., help="A gradprobe run directory, a TensorBoard log directory or event file, a Hugging Face trainer_state.json, a Lightning metrics.csv, or an MLflow run, mlruns/ folder or mlflow.db."),
    format: ReportFormat = typer.Option(ReportFormat.text, "--format", "-f", help="Report format."),
    fail_on: FailOn = typer.Option(FailOn.error, "--fail-on", help="Exit 1 if a finding is at or above this severity."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the report to FILE instead of stdout."),
    run: Optional[str] = typer.Option(None, "--run", help="The MLflow run to analyze (id, id prefix or run name); default: one report per run."),
    no_color: bool = typer.Option(False, "--no-color", help="No colour in the text report (also: the NO_COLOR environment variable)."),
) -> None:
    """Analyze a saved run and explain what went wrong."""
    from gradprobe.engine import analyze as run_analysis
    from gradprobe.readers import load_runs
    from gradprobe.runlog import LogError

    color, width = text_style(sys.stdout, output is not None, no_color) if format == ReportFormat.text else (False, None)
    # numeric warnings raised by a log's wild values (overflow, all-NaN slices) are not the
    # user's business: stderr carries the one-line error or nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            logs = load_runs(path, run=run)  # an MLflow store: one report per run
            reports = [run_analysis(log) for log in logs] if logs else [run_analysis(path)]
        except LogError as exc:
            fail(str(exc) or "not a readable log")
        except RecursionError:
            fail(f"{path}: log too deeply nested to read")
        except MemoryError:
            fail(f"{path}: log too large to read in memory")
        except Exception as exc:  # noqa: BLE001 - bad input must never show a traceback
            fail(f"{path}: cannot analyze ({type(exc).__name__}: {str(exc)[:200]})")
        if len(reports) > 1 and format == ReportFormat.html:
            ids = ", ".join(str(r.source.get("run")) for r in reports[:10])
            fail(f"{path}: {len(reports)} MLflow runs; an HTML report is one run: pass --run ID ({ids})")
        try:
            texts = [render_report(r, format.value, color=color, width=width) for r in reports]
        except Exception as exc:  # noqa: BLE001
            fail(f"cannot render the report ({type(exc).__name__}: {str(exc)[:200]})")
    # several runs: text and Markdown one after another, JSON an array of reports
    if len(texts) == 1:
        text = texts[0]
    elif format == ReportFormat.json:
        text = "[\n" + ",\n".join(t.strip() for t in texts) + "\n]\n"
    else:
        text = ("\n" + "-" * 80 + "\n\n").join(texts)
    write_output(text, output)
    raise typer.Exit(1 if any(r.fails(fail_on.value) for r in reports) else 0)


@app.command()
def rules(
    rule: Optional[str] = typer.Argument(None, help="A rule code (GP201) or slug (overclipping); omit for the catalog."),
    format: RulesFormat = typer.Option(RulesFormat.text, "--format", "-f", help="Output format."),
) -> None:
    """The rule catalog, or one rule's full explanation."""
    from gradprobe.rules.catalog import catalog_json, catalog_markdown, catalog_text, rule_json, rule_markdown, rule_text
    from gradprobe.rules.base import get_rule

    if rule is None:
        if format == RulesFormat.json:
            typer.echo(json.dumps(catalog_json(), indent=2))
        elif format == RulesFormat.markdown:
            typer.echo(catalog_markdown())
        else:
            typer.echo(catalog_text())
        return
    cls = get_rule(rule)
    if cls is None:
        fail(f"unknown rule {rule!r} (see `gradprobe rules`)")
    if format == RulesFormat.json:
        typer.echo(json.dumps(rule_json(cls), indent=2))
    elif format == RulesFormat.markdown:
        typer.echo(rule_markdown(cls))
    else:
        typer.echo(rule_text(cls))


from gradprobe.cli import run as _run  # noqa: F401,E402 - registers `gradprobe run`
from gradprobe.cli import verify as _verify  # noqa: F401,E402 - registers `gradprobe verify`


def main() -> None:
    """Console entry point."""
    try:
        if sys.argv[1:2] == ["run"]:  # the plain forms skip typer's parsing (start-up time)
            _run.run_fast(sys.argv[2:])
        app()
    except KeyboardInterrupt:
        sys.stderr.write("gradprobe: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
