"""The examples in docs/integrations.md and docs/readers.md run exactly as written.

Every fenced ``python`` block of a document runs as a script, in document order, in one
fresh directory (later blocks use the files earlier ones wrote); every ``gradprobe ...``
line of a fenced ``bash`` block runs as ``python -m gradprobe ...`` there too.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from gradprobe.readers.mapping import markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(doc: str) -> list[tuple[str, str]]:
    """Fenced blocks of ``doc`` (a file in docs/, or a path)."""
    with open(doc if os.path.isabs(doc) else os.path.join(DOCS, doc), encoding="utf-8") as f:
        return [(m.group(1), m.group(2)) for m in FENCE.finditer(f.read())]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRADPROBE_TAG_MAP", None)
    return env


def _gradprobe_lines(script: str) -> list[tuple[dict[str, str], list[str]]]:
    out = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words and words[0] == "gradprobe":
            out.append((env, words[1:]))
    return out


def run_doc(doc: str, cwd: str, selected: list[tuple[str, str]] | None = None) -> list[str]:
    ran = []
    for i, (lang, code) in enumerate(selected if selected is not None else blocks(doc)):
        if lang == "python":
            path = os.path.join(cwd, f"example_{i}.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(code)
            r = subprocess.run([sys.executable, path], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{doc} block {i} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
            ran.append(f"python:{i}")
        elif lang == "bash":
            for extra, args in _gradprobe_lines(code):
                r = subprocess.run([sys.executable, "-m", "gradprobe", *args], cwd=cwd, env={**_env(), **extra},
                                   capture_output=True, text=True, timeout=120)
                if args[0] == "run":  # `gradprobe run` keeps the script's status (a failing example may end non-zero)
                    assert "gradprobe report" in r.stderr + r.stdout or "--no-report" in args or "--output" in args, r.stderr[-3000:]
                else:
                    assert r.returncode in (0, 1), f"{doc}: gradprobe {' '.join(args)} -> {r.returncode}\n{r.stderr}"
                    assert "Traceback" not in r.stderr
                ran.append("gradprobe " + " ".join(args))
    return ran


@pytest.mark.slow
def test_integrations_doc_examples_run(tmp_path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    pytest.importorskip("mlflow")
    pytest.importorskip("optuna")
    ran = run_doc("integrations.md", str(tmp_path))
    assert sum(r.startswith("python") for r in ran) == 5
    assert sum(r.startswith("gradprobe analyze") for r in ran) == 4
    assert os.path.isdir(tmp_path / "mlruns")
    assert os.path.exists(tmp_path / "hf_out" / "trainer_state.json")
    assert os.path.exists(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv")
    assert os.path.isdir(tmp_path / "runs" / "study" / "trial-1")  # the Optuna example


@pytest.mark.slow
def test_readers_doc_examples_run(tmp_path) -> None:
    ran = run_doc("readers.md", str(tmp_path))
    assert len(ran) == 2 and ran[0].startswith("python") and ran[1] == "gradprobe analyze custom_run"


def test_readers_doc_has_the_current_mapping_table() -> None:
    with open(os.path.join(DOCS, "readers.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- mapping-table:[^>]*-->\n(.*?)<!-- /mapping-table -->", text, re.S)
    assert m, "docs/readers.md lost its mapping-table markers"
    assert m.group(1) == markdown_table(), "regenerate the table with gradprobe.readers.mapping.markdown_table()"


def test_docs_examples_are_found() -> None:
    langs = [lang for lang, _ in blocks("integrations.md")]
    assert langs.count("python") == 5 and langs.count("bash") == 3
    assert [lang for lang, _ in blocks("readers.md")].count("python") == 1
