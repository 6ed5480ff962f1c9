"""`gradprobe analyze` and `gradprobe rules` through a real subprocess and typer's CliRunner:
exit codes 0/1/2 with --fail-on, every output format, --output, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gradprobe
from gradprobe.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
ERROR_RUN = ROOT / "sample_runs" / "000-undetached-state-crash"  # GP101: error
WARNING_RUN = ROOT / "sample_runs" / "001-long-lookback"  # GP102: warning only
HEALTHY_RUN = ROOT / "sample_runs" / "003-healthy-reference"


def gp(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradprobe", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "run, fail_on, code",
    [
        (ERROR_RUN, "error", 1), (ERROR_RUN, "never", 0), (WARNING_RUN, "error", 0), (WARNING_RUN, "warning", 1),
        (HEALTHY_RUN, "warning", 0),
    ],
)
def test_fail_on_exit_codes(run, fail_on, code):
    r = CliRunner().invoke(app, ["analyze", str(run), "--fail-on", fail_on, "--format", "json"])
    assert r.exit_code == code, r.output
    json.loads(r.stdout)


def test_formats_and_output_file_through_a_subprocess(tmp_path):
    for fmt, probe in (("text", "GP101"), ("markdown", "## "), ("json", '"schema": "gradprobe.report/1"'), ("html", "<!DOCTYPE html>")):
        out = tmp_path / f"r.{fmt}"
        r = gp("analyze", str(ERROR_RUN), "--format", fmt, "--output", str(out))
        assert r.returncode == 1 and r.stdout == "" and r.stderr == ""
        assert probe in out.read_text()
    r = gp("analyze", str(ERROR_RUN))
    assert r.returncode == 1 and "GP101" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "empty directory"),
        (lambda p: (p / "f.bin").write_bytes(os.urandom(300)) or p / "f.bin", ""),
        (lambda p: (p / "zero.json").write_text("") or p / "zero.json", ""),
        (lambda p: (p / "notes.txt").write_text("hello") or p / "notes.txt", ""),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, message):
    path = make(tmp_path)
    r = gp("analyze", str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("gradprobe: ") and message in r.stderr
    assert r.stdout == ""


def test_usage_errors_exit_2():
    assert CliRunner().invoke(app, ["analyze", str(HEALTHY_RUN), "--format", "pdf"]).exit_code == 2
    assert CliRunner().invoke(app, ["analyze"]).exit_code == 2
    r = CliRunner().invoke(app, ["rules", "GP999"])
    assert r.exit_code == 2


def test_rules_catalog_and_one_rule():
    r = CliRunner().invoke(app, ["rules"])
    assert r.exit_code == 0 and "GP101" in r.stdout and "undetached-hidden-state" in r.stdout
    one = CliRunner().invoke(app, ["rules", "overclipping"])
    assert one.exit_code == 0
    for head in ("What it detects", "Why it matters", "Typical causes", "Fix", "Example", "Thresholds and confidence"):
        assert head in one.stdout
    js = CliRunner().invoke(app, ["rules", "GP301", "--format", "json"])
    data = json.loads(js.stdout)
    assert data["slug"] == "high-init-scale" and "init_scale" in data["computes"]
    cat = json.loads(CliRunner().invoke(app, ["rules", "--format", "json"]).stdout)
    assert len(cat) >= 27 and {c["code"] for c in cat} >= {f"GP{n}" for n in (101, 201, 301, 401, 501, 601, 701)}


def test_version_and_help():
    r = gp("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gradprobe {gradprobe.__version__}"
    for cmd in ([], ["analyze"], ["run"], ["rules"], ["verify"]):
        h = CliRunner().invoke(app, [*cmd, "--help"])
        assert h.exit_code == 0 and "Usage" in h.stdout


def test_partially_corrupt_log_analyzes_and_says_what_it_skipped(tmp_path):
    log = gradprobe.RunLog.build({"step": np.arange(50), "loss": np.linspace(2, 1, 50), "grad_norm": np.ones(50)})
    d = tmp_path / "run"
    log.save(str(d))
    with open(d / "events.jsonl", "ab") as f:
        f.write(b"\x00\xff not json\n")
    r = CliRunner().invoke(app, ["analyze", str(d), "--format", "json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert any("events.jsonl" in s for s in data["source"]["skipped"])
