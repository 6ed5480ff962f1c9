"""The README's examples run as written: every fenced ``python`` block as a script, in order,
in one directory; every ``gradprobe ...`` line of a fenced ``bash`` block as a command there
(the quick-start install lines are not run: CI already did that)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integrations.test_docs_examples import _env, _gradprobe_lines, blocks, run_doc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def _workdir(tmp_path) -> str:
    for name in ("examples", "sample_runs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    return str(tmp_path)


def test_readme_bare_loop_and_saved_log_examples(tmp_path):
    """The fast part: the bare-loop example and the commands on its log."""
    all_blocks = blocks(README)
    first_python = next(b for b in all_blocks if b[0] == "python")
    cwd = _workdir(tmp_path)
    run_doc(README, cwd, [first_python])
    for _, args in [ea for lang, code in all_blocks if lang == "bash" for ea in _gradprobe_lines(code)]:
        if args[:2] == ["analyze", "runs/exp1"]:
            r = subprocess.run([sys.executable, "-m", "gradprobe", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
            assert r.returncode in (0, 1), r.stderr
    assert os.path.exists(os.path.join(cwd, "runs", "exp1.html"))


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path):
    ran = run_doc(README, _workdir(tmp_path))
    assert sum(r.startswith("python:") for r in ran) >= 3
    assert any(r.startswith("gradprobe run") for r in ran) and any(r.startswith("gradprobe analyze") for r in ran)
