"""``gradprobe analyze`` on whatever sits behind a path: exit 0/1 with a valid report, or
exit 2 with one line on stderr; never a traceback, never a hang.

Property tests run the CLI in-process (typer's ``CliRunner``, under a watchdog) on the fuzz
targets of :mod:`tests.robustness.fuzz`; a few real subprocesses check the same end to end.
The default tier tries a few dozen examples per target; the slow tier (``-m slow``) a few
hundred, and ``benchmarks/robustness.py`` counts them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from tests.robustness import fuzz as FZ
from tests.robustness import harness as H

QUICK = 20
DEEP = 100
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def _property(target: str, examples: int):
    strategy, _ = FZ.TARGETS[target]

    @settings(max_examples=examples, deadline=None, suppress_health_check=_HEALTH)
    @given(case=strategy)
    def check(case):
        FZ.run_target(target, case)

    check.__name__ = f"test_{target}"
    return check


@pytest.mark.parametrize("target", sorted(FZ.TARGETS))
def test_analyze_contract(target):
    _property(target, QUICK)()


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(FZ.TARGETS))
def test_analyze_contract_deep(target):
    _property(target, DEEP)()


def test_template_run_has_every_file_and_analyzes():
    names = set(os.listdir(H.template_run()))
    assert set(H.RUN_FILES) <= names and any("tfevents" in n for n in names)
    for fmt in H.FORMATS:
        res = H.analyze_in_process(H.template_run(), fmt)
        assert res.exit_code in (0, 1)
    report = H.analyze_in_process(H.template_run()).report
    assert report["source"]["kind"] == "gradprobe" and report["source"]["steps"] == 24 and not report["source"].get("skipped")


@pytest.mark.parametrize("name", H.RUN_FILES + ("tfevents",))
def test_every_prefix_of_each_file_sampled(tmp_path, name):
    """Each file of the real log cut at a dozen prefix lengths spread over its size (both
    ends included): a killed writer leaves any of them (every length: the slow tier)."""
    size = len(H.template_files()[name])
    lengths = sorted({0, 1, size - 1, *range(0, size, max(1, size // 10))})
    for n in lengths:
        res = FZ.truncate_file(str(tmp_path), name, n)
        # the other files are whole: the log stays readable, whichever file was cut
        assert res.exit_code in (0, 1), f"{name} cut at {n}: {res.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("name", H.RUN_FILES + ("tfevents",))
def test_every_prefix_of_each_file(tmp_path, name):
    """Prefix lengths all over each file (~150 evenly spread, odd strides so they fall
    anywhere in a record, plus each of the last 32)."""
    size = len(H.template_files()[name])
    stride = max(7, (size // 150) | 1)
    for n in sorted({*range(0, size, stride), *range(max(0, size - 32), size + 1)}):
        res = FZ.truncate_file(str(tmp_path), name, n)
        assert res.exit_code in (0, 1), f"{name} cut at {n}: {res.stderr}"


def test_a_truncated_steps_stream_keeps_its_whole_batches(tmp_path):
    """Cut anywhere, steps.arrow still yields every record batch before the cut (the run was
    written 6 steps per batch) and ``source.skipped`` says what was lost."""
    data = H.template_files()["steps.arrow"]
    seen = set()
    for frac in (0.3, 0.5, 0.7, 0.9, 0.99):
        res = FZ.truncate_file(str(tmp_path), "steps.arrow", int(len(data) * frac))
        assert res.exit_code in (0, 1)
        steps = res.report["source"]["steps"]
        assert steps % 6 == 0 and steps < 24
        assert any("steps.arrow" in s for s in res.report["source"]["skipped"])
        seen.add(steps)
    assert len(seen) >= 2


# ------------------------------------------------------------------- special files ----
def _special_tree(root):
    """A run directory whose files are not regular files: a FIFO (opening it blocks), a
    link to /dev/zero (reading it never ends), a directory named like a file, a link loop."""
    run = root / "run"
    H.copy_template(str(run))
    os.remove(run / "steps.arrow")
    os.mkfifo(run / "steps.arrow")
    os.remove(run / "samples.arrow")
    os.symlink("/dev/zero", run / "samples.arrow")
    os.remove(run / "events.jsonl")
    os.mkdir(run / "events.jsonl")
    os.remove(run / "scalars.arrow")
    os.symlink(run / "scalars.arrow", run / "scalars.arrow")
    fifo_meta = root / "fifo-meta"
    fifo_meta.mkdir()
    os.mkfifo(fifo_meta / "gradprobe.json")
    foreign = root / "foreign"
    foreign.mkdir()
    os.mkfifo(foreign / "trainer_state.json")
    os.symlink("/dev/zero", foreign / "metrics.csv")
    (foreign / "tb").mkdir()
    os.mkfifo(foreign / "tb" / "events.out.tfevents.1.host")
    return [run, fifo_meta, foreign, foreign / "tb", foreign / "trainer_state.json", foreign / "metrics.csv"]


def _limited() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # reading /dev/zero must not take the machine down


def test_special_files_neither_hang_nor_exhaust_memory(tmp_path):
    """FIFOs, /dev/zero and directories where run files should be: a clear answer in seconds,
    in real processes (run side by side) with a memory cap."""
    paths = _special_tree(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "gradprobe", "analyze", str(p), "--format", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=H.subprocess_env(),
                              preexec_fn=_limited, stdin=subprocess.DEVNULL) for p in paths]
    try:
        for path, proc in zip(paths, procs):
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"gradprobe analyze {path} hung")
            res = H.check_contract(str(path), "json", proc.returncode, out, err, 0.0)
            if path.name == "run":  # the regular files are read, the others named as skipped
                assert res.exit_code in (0, 1)
                skipped = " ".join(res.report["source"]["skipped"])
                assert "not a regular file" in skipped
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------ real processes ----
@pytest.mark.slow
@pytest.mark.parametrize("case", ["template", "garbage-steps", "empty-dir", "names", "tfevents-cut", "trainer-state-list",
                                  "wild-values"])
def test_real_subprocess(tmp_path, case):
    """The same contract end to end: interpreter start, imports, exit status, streams."""
    files = H.template_files()
    if case == "template":
        path = H.template_run()
    elif case == "garbage-steps":
        path = H.copy_template(str(tmp_path / "r"))
        (tmp_path / "r" / "steps.arrow").write_bytes(os.urandom(3000))
    elif case == "empty-dir":
        (tmp_path / "e").mkdir()
        path = str(tmp_path / "e")
    elif case == "names":
        path = FZ.build_names({"layers": ["<script>x</script>", "名前\n2"], "module": "\x1b[31m", "message": "a\nb",
                               "scalar": "🔥", "dirname": "run ✓ <b>"}, str(tmp_path))
    elif case == "tfevents-cut":
        p = tmp_path / "tb" / "events.out.tfevents.1.h"
        p.parent.mkdir()
        p.write_bytes(files["tfevents"][: len(files["tfevents"]) // 2])
        path = str(p)
    elif case == "trainer-state-list":
        p = tmp_path / "trainer_state.json"
        p.write_text("[1, 2, {\"log_history\": 3}]")
        path = str(p)
    else:  # values that overflow the rules' arithmetic (numpy warnings must not reach stderr)
        import gradprobe

        path = str(tmp_path / "wild")
        gradprobe.RunLog.build({"step": [0, 2**62, 2**63 - 1], "state_age": [1, 5, 9], "state_age_module": ["lstm"] * 3,
                                "skipped": [True] * 3, "scale": [float("nan")] * 3, "scaler_updated": [True] * 3,
                                "grad_norm": [3e38, -3e38, float("inf")], "loss": [1e38, 3e38, -3e38]},
                               meta={"scalers": [{"enabled": True, "init_scale": 1e300}]}).save(path)
    for fmt in ("json", "text"):
        res = H.analyze_subprocess(path, fmt)
        assert res.exit_code in (0, 1, 2)
        if res.exit_code in (0, 1):
            assert res.stderr == "", res.stderr
    if case == "empty-dir":
        assert res.exit_code == 2
    if case in ("template", "names"):
        assert res.exit_code in (0, 1)


def test_paths_with_line_breaks_get_a_one_line_error(tmp_path):
    """A path holding a newline (or another line break) still gets a one-line error: the
    break is written as an escape."""
    res = H.analyze_in_process(str(tmp_path / "no\nsuch\rrun\u2028x"))
    assert res.exit_code == 2 and "no\\nsuch\\rrun\\u2028x" in res.stderr
    d = tmp_path / "bad\nname"
    d.mkdir()
    (d / "steps.arrow").write_bytes(b"junk")
    assert H.analyze_in_process(str(d)).exit_code == 2
