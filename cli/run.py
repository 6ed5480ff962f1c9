"""``gradprobe run [OPTIONS] SCRIPT [SCRIPT_ARGS]...``: watch a training script, no code change.

The mechanics are in :mod:`gradprobe.runner`; this command parses gradprobe's own options
(all of them before SCRIPT: everything after SCRIPT belongs to the script, as with
``python``), runs the script, prints the report after the script's own output, and exits
with the script's status.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import List, Optional

import typer

from gradprobe.cli.app import app, render_report, text_style


class RunFormat(str, enum.Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class Profile(str, enum.Enum):
    default = "default"
    light = "light"
    full = "full"


class StopOn(str, enum.Enum):
    error = "error"
    warning = "warning"
    never = "never"


def _usage(message: str) -> "typer.Exit":
    sys.stderr.write(f"gradprobe run: {message}\n")
    raise typer.Exit(2)


@app.command(
    context_settings={
        # options stop at SCRIPT: `gradprobe run train.py --lr 3 --help` passes all of it on
        "allow_interspersed_args": False,
        "allow_extra_args": True,
    },
    epilog="Exit status: the script's own (2 when gradprobe cannot start it; 3 when --stop-on stopped it). See docs/run.md.",
)
def run(
    ctx: typer.Context,
    script: str = typer.Argument(..., metavar="SCRIPT", help="The training script (or, with -m, the module) to run.", show_default=False),
    script_args: Optional[List[str]] = typer.Argument(None, metavar="SCRIPT_ARGS", help="Passed to the script unchanged.", show_default=False),
    module: bool = typer.Option(False, "-m", "--module", help="Run SCRIPT as a module, like python -m."),
    logdir: Optional[str] = typer.Option(None, "--logdir", help="Run directory. Default: a new folder under ./gradprobe_runs/."),
    format: RunFormat = typer.Option(RunFormat.text, "--format", "-f", help="Report format: text goes to stderr, json and markdown to stdout."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the report to FILE instead (keeps the script's stdout clean)."),
    no_report: bool = typer.Option(False, "--no-report", help="Record the run but print no report."),
    memory_limit: Optional[str] = typer.Option(
        None, "--memory-limit", metavar="SIZE",
        help="Raise MemoryError in the script once the process uses more than SIZE (2G, 500M): the run ends with a report instead of the OOM killer's SIGKILL.",
    ),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", metavar="N", min=0, help="Run the sampled deep probes every N steps (0: only early steps)."),
    profile: Profile = typer.Option(Profile.default, "--profile", help="default, light (no deep probes) or full (deep probes every step)."),
    stop_on: StopOn = typer.Option(
        StopOn.never, "--stop-on",
        help="Stop the run at the next step boundary after a finding further training cannot undo (NaN parameters, a loss non-finite for good...) of this severity: log flushed, report printed, exit status 3.",
    ),
    no_color: bool = typer.Option(False, "--no-color", help="No colour in the text report (also: the NO_COLOR environment variable)."),
) -> None:
    """Run a training script exactly as `python SCRIPT ARGS` would, watched, and explain how it went.

    Every model, optimizer and GradScaler the script creates is recorded. When the script ends (normally, by an exception, Ctrl-C or SIGTERM) the log is flushed and the report is printed after the script's own output and traceback; the exit status is the script's. Options go before SCRIPT; everything after it belongs to the script.
    """
    run_script(script, list(script_args or []) + list(ctx.args), module=module, logdir=logdir, format=format.value,
               output=output, no_report=no_report, memory_limit=memory_limit, sample_every=sample_every,
               profile=profile.value, no_color=no_color, stop_on=stop_on.value)


def run_script(script: str, args: list[str], *, module: bool = False, logdir: Optional[str] = None, format: str = "text",
               output: Optional[str] = None, no_report: bool = False, memory_limit: Optional[str] = None,
               sample_every: Optional[int] = None, profile: str = "default", no_color: bool = False,
               stop_on: str = "never") -> None:
    """``gradprobe run`` once its options are parsed (by typer or by :func:`parse_fast`)."""
    from gradprobe import runner as R
    from gradprobe.config import ProbeConfig
    from gradprobe.schedule import Schedule

    start_cwd = os.getcwd()
    command = ["gradprobe", *sys.argv[1:]]
    if output and no_report:
        _usage("--output and --no-report contradict each other")
    limit = None
    if memory_limit is not None:
        try:
            limit = R.parse_size(memory_limit)
        except ValueError as exc:
            _usage(f"--memory-limit: {exc}")
    overrides = {}
    if sample_every is not None:
        overrides["schedule"] = Schedule(every=sample_every)
    config = ProbeConfig.profile(profile, **overrides)
    out_path = os.path.abspath(output) if output else None  # before the script can chdir
    try:
        target = R.resolve_target(script, args, module=module)
        runner = R.ScriptRunner(
            target,
            logdir=R.run_logdir(logdir),
            config=config,
            memory_limit=limit,
            stop_on=stop_on,
            restore=False,
            run_info={"command": command},
        )
        outcome = runner.run()
    except R.RunnerError as exc:
        _usage(str(exc))
    rank = _launcher_rank()
    # started by torchrun (each rank its own gradprobe run): rank 0 reports; another rank
    # only when its own script failed or was stopped. Started by gradprobe run: one report for the tree
    show = not no_report and getattr(runner, "tree", None) is not None and outcome.started and (rank == 0 or outcome.how in ("exception", "stopped"))
    if show:
        emit_report(runner, outcome, format, out_path, cwd=start_cwd, no_color=no_color)
    elif no_report and getattr(runner, "tree", None) is not None and outcome.started and rank == 0:
        # nothing printed, but the run's TensorBoard log still gets its findings text
        try:
            R.build_report(runner)
        except Exception:  # noqa: BLE001 - the script's status wins
            pass
    R.exit_like(outcome)


#: ``gradprobe run``'s options for :func:`parse_fast`: flag -> (parameter, kind), the same as
#: the typer declaration of :func:`run` (tests/cli/test_startup.py holds them equal)
FAST_OPTIONS: dict[str, tuple[str, str]] = {
    "-m": ("module", "flag"),
    "--module": ("module", "flag"),
    "--logdir": ("logdir", "text"),
    "--format": ("format", "format"),
    "-f": ("format", "format"),
    "--output": ("output", "text"),
    "-o": ("output", "text"),
    "--no-report": ("no_report", "flag"),
    "--memory-limit": ("memory_limit", "text"),
    "--sample-every": ("sample_every", "count"),
    "--profile": ("profile", "profile"),
    "--no-color": ("no_color", "flag"),
    "--stop-on": ("stop_on", "stop_on"),
}


def parse_fast(argv: list[str]) -> Optional[dict]:
    """``gradprobe run``'s command line (after ``run``) as :func:`run_script`'s arguments, or
    None for anything but the plain forms (help, an unknown or malformed option, a bad
    choice): typer parses those and says what is wrong.

    typer builds a pydantic adapter for every parameter it parses, and importing pydantic
    costs ~90 ms of the script's start-up; the plain forms need none of it.
    """
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            i += 1
            break
        if not tok.startswith("-") or tok == "-":
            break
        flag, eq, attached = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        spec = FAST_OPTIONS.get(flag)
        if spec is None:
            return None
        name, kind = spec
        if kind == "flag":
            if eq:
                return None
            out[name] = True
            i += 1
            continue
        if eq:
            value = attached
            i += 1
        elif i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        else:
            return None
        if kind == "format" and value not in {f.value for f in RunFormat}:
            return None
        if kind == "profile" and value not in {p.value for p in Profile}:
            return None
        if kind == "stop_on" and value not in {v.value for v in StopOn}:
            return None
        if kind == "count":
            if not value.isdigit():
                return None
            value = int(value)
        out[name] = value
    if i >= len(argv):
        return None  # no SCRIPT: typer's usage error
    out["script"] = argv[i]
    out["args"] = list(argv[i + 1:])
    return out


def run_fast(argv: list[str]) -> None:
    """Runs ``gradprobe run ARGV`` without typer's parsing when :func:`parse_fast` can read
    ARGV (the process then exits here); returns when it cannot."""
    parsed = parse_fast(argv)
    if parsed is None:
        return
    try:
        run_script(parsed.pop("script"), parsed.pop("args"), **parsed)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


def _launcher_rank() -> int:
    """This process's rank when torchrun started it (each rank its own gradprobe run), else 0."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def summary_line(runner: object, outcome: object, cwd: Optional[str] = None) -> str:
    """How the script ended, what was recorded where, and how to read it again."""
    from gradprobe import runner as R
    from gradprobe.tree_report import NO_STEP, rank_group

    describe = outcome.describe() if isinstance(outcome, R.Outcome) else "the script ended"
    runs = list(getattr(runner, "runs", []) or [])
    tree = getattr(runner, "tree", None)
    if not runs:
        return f"gradprobe: {describe}; {NO_STEP} (nothing was written)"
    steps = sum(r.steps for r in runs)
    counted = f"{steps} step{'s' if steps != 1 else ''}"
    ranks = rank_group(runs)
    if len(runs) == 1:
        shown = _short(runs[0].path, cwd)
        return f"gradprobe: {describe}; {counted} recorded in {shown} (re-read: gradprobe analyze {shown})"
    shown = _short(getattr(tree, "tree_dir", ""), cwd)
    if len(ranks) == len(runs):
        return f"gradprobe: {describe}; {counted} recorded by {len(ranks)} ranks in {shown} (re-read: gradprobe analyze {shown})"
    parts = []
    if ranks:
        parts.append(f"ranks {', '.join(str(r) for r in sorted(ranks))} ({max(r.steps for r in runs if r.rank is not None)} steps)")
    parts += [f"{r.label} ({r.steps} steps)" for r in runs if r.rank is None]
    # the ranks are re-read together from the log directory, unless the script's own run is there
    together = ranks and not any(r.name == "" for r in runs)
    rereads = ([shown] if together else [_short(p, cwd) for p in ranks.values()]) + [_short(r.path, cwd) for r in runs if r.rank is None]
    return (f"gradprobe: {describe}; {counted} recorded in {len(runs)} runs under {shown}: {'; '.join(parts)} "
            f"(re-read each: {', '.join(f'gradprobe analyze {p}' for p in rereads)})")


def emit_report(runner: object, outcome: object, fmt: str, output: Optional[str], *, cwd: Optional[str] = None,
                no_color: bool = False) -> None:
    """Prints the summary line and the report; never raises (the script's status wins)."""
    from gradprobe import runner as R

    err = _stream(sys.stderr, sys.__stderr__)
    try:
        line = summary_line(runner, outcome, cwd)
    except Exception as exc:  # noqa: BLE001
        line = f"gradprobe: the summary failed ({type(exc).__name__}: {exc})"
    _write(err, f"\n{line}\n")
    try:
        report = R.build_report(runner)  # type: ignore[arg-type]
        color, width = text_style(err, output is not None, no_color) if fmt == "text" else (False, None)
        text = render_report(report, fmt, color=color, width=width)
    except Exception as exc:  # noqa: BLE001 - a bug in the analysis must not hide the status
        _write(err, f"gradprobe: could not build the report ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})\n")
        return
    if not text.endswith("\n"):
        text += "\n"
    if output:
        try:
            os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            _write(err, f"gradprobe: cannot write {output}: {exc.strerror or exc}\n")
            return
        _write(err, f"gradprobe: report written to {_short(output, cwd)}\n")
    elif fmt == "text":
        _write(err, text)
    else:
        _write(_stream(sys.stdout, sys.__stdout__), text)


def _stream(current: object, original: object) -> object:
    s = current if current is not None and not getattr(current, "closed", False) else original
    return s


def _write(stream: object, text: str) -> None:
    try:
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a stream the script closed or replaced
        try:
            sys.__stderr__.write(text)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            pass


def _short(path: str, cwd: Optional[str] = None) -> str:
    """``path`` relative to the directory gradprobe was started in, when it is inside it."""
    if not path:
        return path
    try:
        rel = os.path.relpath(path, cwd or os.getcwd())
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path
