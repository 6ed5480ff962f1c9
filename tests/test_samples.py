"""Every sample run's report matches its golden file (decided from the mechanics before
gradprobe ran), and `gradprobe analyze` works on every sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradprobe

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
GOLDENS = sorted(SAMPLES.glob("*.golden.json"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_there_is_a_sample_per_failure_and_more():
    names = [g.name.split(".golden")[0] for g in GOLDENS]
    for report in ("000", "001", "002", "003", "004"):
        assert any(n.startswith(report) for n in names), report
    assert len(names) >= 5 + 3
    assert _size(SAMPLES) < 4 * 2**20  # a few MB in all


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda p: p.name.split(".golden")[0])
def test_sample_matches_golden(golden: Path):
    g = json.loads(golden.read_text())
    run = SAMPLES / g["sample"]
    assert run.is_dir(), f"missing run directory; recreate with: {g['command']}"
    assert _size(run) < 400 * 1024
    assert g["why"].strip()
    report = gradprobe.analyze(str(run))
    serious = [f for f in report.findings if f.severity in ("error", "warning")]
    codes = [f.code for f in report.findings]
    expected = g["expected_root_cause"]
    if expected is None:
        assert not serious, [f"{f.code} {f.title}" for f in serious]
        return
    allowed_first = expected if isinstance(expected, list) else [expected]
    assert serious and serious[0].code in allowed_first, f"root cause first: got {[f.code for f in serious]}"
    for code in g["must_find"]:
        assert code in codes, f"{code} missing from {codes}"
    extra = {f.code for f in serious} - set(g["must_find"]) - set(g["allowed"])
    assert not extra, f"unexpected findings {sorted(extra)}"
    if g.get("fix", {}) and g["fix"]["kind"] == "hyperparameters":
        assert report.suggested_hyperparameters, "a hyperparameter-fixable sample must suggest its hyperparameters"


def test_analyze_cli_on_every_sample(tmp_path):
    for golden in GOLDENS:
        g = json.loads(golden.read_text())
        out = subprocess.run([sys.executable, "-m", "gradprobe", "analyze", str(SAMPLES / g["sample"]), "--format", "json"],
                             capture_output=True, text=True)
        assert out.returncode in (0, 1), out.stderr
        data = json.loads(out.stdout)
        assert data["source"]["kind"] == "gradprobe" and data["source"]["steps"] > 0
        assert out.returncode == (1 if any(f["severity"] == "error" for f in data["findings"]) else 0)
