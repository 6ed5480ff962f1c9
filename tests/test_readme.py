"""The README's examples run as written: every fenced ``python`` block as a script, in order,
in one directory; every ``gradprobe ...`` line of a fenced ``bash`` block as a command there
(the quick-start install lines are not run: CI already did that)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integrations.test_docs_examples import FENCE, _env, _gradprobe_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[tuple[str, str]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return [(m.group(1), m.group(2)) for m in FENCE.finditer(f.read())]


def _workdir(tmp_path) -> str:
    for name in ("examples", "sample_runs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    return str(tmp_path)


def _run(blocks: list[tuple[str, str]], cwd: str) -> list[str]:
    ran = []
    for i, (lang, code) in enumerate(blocks):
        if lang == "python":
            path = os.path.join(cwd, f"readme_{i}.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(code)
            r = subprocess.run([sys.executable, path], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
            ran.append(f"python:{i}")
        elif lang == "bash":
            for extra, args in _gradprobe_lines(code):
                r = subprocess.run([sys.executable, "-m", "gradprobe", *args], cwd=cwd, env={**_env(), **extra},
                                   capture_output=True, text=True, timeout=300)
                # `gradprobe run` keeps the script's status: the bundled failing examples may end non-zero
                ok = (0, 1) if args[0] != "run" else (0, 1, r.returncode)
                assert r.returncode in ok, f"README: gradprobe {' '.join(args)} -> {r.returncode}\n{r.stderr[-3000:]}"
                assert "Traceback" not in r.stderr or args[0] == "run"
                ran.append("gradprobe " + " ".join(args))
    return ran


def test_readme_bare_loop_and_saved_log_examples(tmp_path):
    """The fast part: the bare-loop example and the commands on its log."""
    blocks = _blocks()
    first_python = next(i for i, (lang, _) in enumerate(blocks) if lang == "python")
    cwd = _workdir(tmp_path)
    _run([blocks[first_python]], cwd)
    for extra, args in [(e, a) for lang, code in blocks if lang == "bash" for e, a in _gradprobe_lines(code)]:
        if args[:2] == ["analyze", "runs/exp1"]:
            r = subprocess.run([sys.executable, "-m", "gradprobe", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
            assert r.returncode in (0, 1), r.stderr
    assert os.path.exists(os.path.join(cwd, "runs", "exp1.html"))


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path):
    ran = _run(_blocks(), _workdir(tmp_path))
    assert sum(r.startswith("python:") for r in ran) >= 3
    assert any(r.startswith("gradprobe run") for r in ran) and any(r.startswith("gradprobe analyze") for r in ran)
