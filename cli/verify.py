"""``gradprobe verify [OPTIONS] SCRIPT [SCRIPT_ARGS]...``: apply the report's suggested
hyperparameters as the script's flags, re-run, and compare before/after."""

from __future__ import annotations

import enum
import json
import sys
import tempfile
from typing import List, Optional

import typer

from gradprobe.cli.app import app, fail, write_output


class VerifyFormat(str, enum.Enum):
    text = "text"
    json = "json"


@app.command(
    context_settings={"allow_interspersed_args": False, "allow_extra_args": True},
    epilog="Exit status: 0 when the after run has no error or warning finding, 1 otherwise, 2 on bad usage.",
)
def verify(
    ctx: typer.Context,
    script: str = typer.Argument(..., metavar="SCRIPT", help="The training script (or module with -m)."),
    script_args: Optional[List[str]] = typer.Argument(None, metavar="SCRIPT_ARGS", help="The script's own arguments (the before run)."),
    module: bool = typer.Option(False, "-m", "--module", help="Run SCRIPT as a module."),
    mapping: Optional[List[str]] = typer.Option(None, "--map", metavar="NAME=FLAG", help="Flag for a hyperparameter, e.g. max_norm=--gradient-clip (default: --max-norm)."),
    from_report: Optional[str] = typer.Option(None, "--from-report", metavar="FILE", help="Use this JSON report for the before side instead of running the script first."),
    after_args: Optional[str] = typer.Option(None, "--after-args", metavar="ARGS", help="Extra arguments for the after run only (e.g. a switch that applies a code fix)."),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Where the two run directories go (default: a temporary folder)."),
    format: VerifyFormat = typer.Option(VerifyFormat.text, "--format", "-f"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the comparison to FILE."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds allowed per run."),
) -> None:
    """Check a report's advice: re-run the script with its suggested hyperparameters and compare."""
    import shlex

    from gradprobe.verify import verify as do_verify

    maps = {}
    for m in mapping or []:
        if "=" not in m:
            fail(f"--map expects NAME=FLAG, got {m!r}")
        k, v = m.split("=", 1)
        maps[k.strip()] = v.strip()
    args = [script, *(script_args or []), *ctx.args]
    work = workdir or tempfile.mkdtemp(prefix="gradprobe-verify-")
    try:
        result = do_verify(args, work, module=module, mapping=maps, before_report=from_report,
                           after_extra_args=shlex.split(after_args) if after_args else None, timeout=timeout)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    text = json.dumps(result.to_json(), indent=2) + "\n" if format == VerifyFormat.json else result.render_text()
    write_output(text, output, stream=sys.stdout)
    raise typer.Exit(0 if result.healthy_after else 1)
