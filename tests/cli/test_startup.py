"""``gradprobe run`` starts light: its plain command lines are parsed without typer's pydantic
adapters (the same result as typer's parse), and by the line after the script's own
``import torch`` nothing heavy that the recording does not need has been imported. The
start-up time itself is measured by benchmarks/startup.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gradprobe.cli import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _typer_params() -> dict[str, str]:
    """flag -> parameter name, as the typer command declares them."""
    import typer.main

    from gradprobe.cli.app import app

    cmd = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    out = {}
    for p in cmd.params:
        for flag in [*p.opts, *p.secondary_opts]:
            if flag.startswith("-"):
                out[flag] = p.name
    return out


def test_fast_options_are_the_typer_options():
    declared = _typer_params()
    declared.pop("--help", None)
    declared.pop("-h", None)
    assert {flag: name for flag, (name, _) in run_cli.FAST_OPTIONS.items()} == declared


@pytest.fixture
def captured(monkeypatch):
    calls: list[dict] = []

    def fake_run_script(script, args, **kwargs):
        calls.append({"script": script, "args": list(args), **kwargs})

    monkeypatch.setattr(run_cli, "run_script", fake_run_script)
    return calls


ARGVS = [
    ["train.py"],
    ["train.py", "--lr", "3", "-m", "x", "--help"],
    ["-m", "pkg.train", "--format", "json"],
    ["--logdir", "d", "--memory-limit", "2G", "--sample-every", "7", "--profile", "light", "train.py", "a"],
    ["--format=markdown", "-o", "r.md", "--no-report", "--no-color", "train.py"],
    ["-f", "json", "--output=out.json", "--logdir=x y", "--", "train.py", "--", "b"],
    ["--sample-every", "0", "--profile", "full", "-m", "mod"],
    ["--stop-on", "error", "train.py"],
    ["--stop-on=warning", "-m", "mod"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a))
def test_fast_parse_matches_typer(argv, captured):
    from typer.testing import CliRunner

    from gradprobe.cli.app import app

    res = CliRunner().invoke(app, ["run", *argv])
    assert res.exit_code == 0, res.output
    (by_typer,) = captured
    fast = run_cli.parse_fast(argv)
    assert fast is not None
    defaults = {"module": False, "logdir": None, "format": "text", "output": None, "no_report": False, "no_color": False,
                "memory_limit": None, "sample_every": None, "profile": "default", "stop_on": "never"}
    assert {**defaults, **fast} == by_typer


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-h"], ["--format", "html", "x.py"], ["--profile", "huge", "x.py"], ["--sample-every", "-1", "x.py"],
    ["--fail-on", "error", "x.py"], ["--stop-on", "info", "x.py"], ["--logdir"], ["-mx.py"], ["--no-report=1", "x.py"], ["--logdir", "d"],
])
def test_fast_parse_leaves_the_rest_to_typer(argv):
    assert run_cli.parse_fast(argv) is None


def test_nothing_heavy_is_imported_before_the_script(tmp_path):
    """At the line after the script's `import torch`: no pandas (the run log reader), no
    TensorBoard, no plotly, no pydantic (typer's parsing), no rich (the report)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        heavy = ("pandas", "tensorboard", "plotly", "pydantic", "rich", "gradprobe.render", "gradprobe.engine")
        print(json.dumps([m for m in heavy if m in sys.modules]) if (json := __import__("json")) else "")
    """))
    exe = os.path.join(os.path.dirname(sys.executable), "gradprobe")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "gradprobe"]
    res = subprocess.run([*cmd, "run", "--no-report", "--logdir", str(tmp_path / "log"), str(script)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
