"""``gradprobe analyze`` on foreign logs through a real subprocess: bad input is exit 2 with
one line on stderr and no traceback; readable logs give a report with ``source.kind``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.readers.writers import fit_rows, hf_style, train_history, write_metrics, write_run, write_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("GRADPROBE_TAG_MAP", None)  # a developer's own mapping must not leak into the test
    e.update(env or {})
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "gradprobe", "analyze", *args], capture_output=True, text=True,
                          env=e, timeout=120)


def assert_clean_exit_2(r: subprocess.CompletedProcess[str], message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gradprobe: ") and message in lines[0], lines[0]


def _bad_inputs(tmp: str) -> list[tuple[str, str]]:
    cases = []

    def put(name: str, data: bytes) -> str:
        p = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        return p

    cases.append((os.path.join(tmp, "missing", "trainer_state.json"), "no such file or directory"))
    cases.append((put("e1/trainer_state.json", b""), "empty file"))
    cases.append((put("e2/metrics.csv", b""), "empty file"))
    cases.append((put("e3/events.out.tfevents.1.host", b""), "empty file"))
    cases.append((put("t/trainer_state.json", b'{\n  "best_metric": null,\n  "epoch": 2.5,\n  "glo'), "truncated or invalid JSON"))
    cases.append((put("n/config.json", b'{"vocab_size": 100, "n_layer": 1}'), "not a Hugging Face trainer state"))
    cases.append((put("c/metrics.csv", b"epoch,accuracy\r\n0,0.5\r\n"), "CSV without the expected columns"))
    cases.append((put("g/events.out.tfevents.9.host", b"\x13\x37" * 100), "not a readable TensorBoard event file"))
    cases.append((put("u/notes.txt", b"hello"), "not a recognised log"))
    os.makedirs(os.path.join(tmp, "nologs", "sub"), exist_ok=True)
    put("nologs/sub/readme.md", b"# nothing here")
    cases.append((os.path.join(tmp, "nologs"), "no log found in this directory"))
    os.makedirs(os.path.join(tmp, "emptydir"), exist_ok=True)
    cases.append((os.path.join(tmp, "emptydir"), "empty directory"))
    return cases


#: one bad input per format goes through a real process; all of them through CliRunner
SUBPROCESS_CASES = ("no such file or directory", "empty file", "truncated or invalid JSON", "not a Hugging Face trainer state",
                    "CSV without the expected columns", "not a readable TensorBoard event file",
                    "no log found in this directory")


def test_bad_input_exit_2_one_line_no_traceback(tmp_path) -> None:
    done = set()
    for path, message in _bad_inputs(str(tmp_path)):
        if message in SUBPROCESS_CASES and message not in done:
            done.add(message)
            assert_clean_exit_2(analyze(path), message)
    assert done == set(SUBPROCESS_CASES)


def test_bad_input_cli_runner(tmp_path) -> None:
    from typer.testing import CliRunner

    from gradprobe.cli.app import app

    runner = CliRunner()
    for path, message in _bad_inputs(str(tmp_path)):
        r = runner.invoke(app, ["analyze", path])
        assert r.exit_code == 2, (path, r.output)
        assert isinstance(r.exception, SystemExit), r.exception
        err = r.stderr if hasattr(r, "stderr") else r.output
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradprobe: ") and message in lines[0], err


def test_readable_logs_report_their_kind(tmp_path) -> None:
    state = write_state(str(tmp_path / "hf" / "trainer_state.json"), train_history(12))
    csv_path = write_metrics(str(tmp_path / "pl" / "lightning_logs" / "version_0"), fit_rows())
    write_run(str(tmp_path / "tb" / "runs" / "a"), hf_style(10))
    for path, kind, steps in ((state, "hf-trainer-state", 12), (str(tmp_path / "pl"), "lightning-csv", 24),
                              (str(tmp_path / "tb"), "tensorboard", 10)):
        r = analyze(path, "--format", "json", "--fail-on", "never")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["schema"] == "gradprobe.report/1"
        assert report["source"]["kind"] == kind and report["source"]["steps"] == steps


def test_truncated_but_readable_json_reports_what_it_skipped(tmp_path) -> None:
    p = write_state(str(tmp_path / "trainer_state.json"), train_history(20))
    text = open(p).read()
    open(p, "w").write(text[: text.index('"step": 15') + 3])
    r = analyze(p, "--format", "json", "--fail-on", "never")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["source"]["steps"] == 14
    assert any("truncated or corrupt JSON" in s for s in report["source"]["skipped"])


def test_tag_map_environment_variable(tmp_path) -> None:
    # "distortion" names no loss by its words: nothing maps until the user says so
    write_run(str(tmp_path), {"distortion": [(s, 1.0) for s in range(5)]})
    r = analyze(str(tmp_path))
    assert_clean_exit_2(r, "no recognised metric")
    assert "distortion" in r.stderr and "GRADPROBE_TAG_MAP" in r.stderr
    r = analyze(str(tmp_path), "--format", "json", env={"GRADPROBE_TAG_MAP": '{"distortion": "loss"}'})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["steps"] == 5
    assert_clean_exit_2(analyze(str(tmp_path), env={"GRADPROBE_TAG_MAP": "not json"}), "GRADPROBE_TAG_MAP")


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_other_formats_render(tmp_path, fmt: str) -> None:
    state = write_state(str(tmp_path / "trainer_state.json"), train_history(8))
    r = analyze(state, "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert "hf-trainer-state" in r.stdout
