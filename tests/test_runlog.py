"""The run log on disk: round trips, a truncated or corrupt tail, and SIGKILL survival."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradprobe
from gradprobe.runlog import schema as S
from tests.helpers import mlp, regression_batches


def _record(logdir: str, steps: int = 20) -> None:
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir, flush_steps=4):
        for x, y in regression_batches(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()


def test_save_load_round_trip_of_a_recorded_run(tmp_path):
    _record(str(tmp_path / "a"))
    a = gradprobe.RunLog.load(str(tmp_path / "a"))
    a.save(str(tmp_path / "b"))
    b = gradprobe.RunLog.load(str(tmp_path / "b"))
    pd.testing.assert_frame_equal(a.steps, b.steps)
    pd.testing.assert_frame_equal(a.layer_grad, b.layer_grad)
    pd.testing.assert_frame_equal(a.layer_weight, b.layer_weight)
    assert a.events == b.events
    assert len(a.samples) == len(b.samples)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 30),
    losses=st.lists(finite_or_not, min_size=30, max_size=30),
    names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
    module=st.one_of(st.none(), st.text(max_size=10)),
)
def test_hypothesis_round_trip(tmp_path_factory, n, losses, names, module):
    steps = {
        "step": np.arange(n),
        "loss": np.asarray(losses[:n], dtype=np.float32),
        "grad_norm": np.asarray(losses[::-1][:n], dtype=np.float32),
        "state_age": np.arange(n, dtype=np.int32),
        "state_age_module": [module] * n,
        "skipped": [bool(i % 2) for i in range(n)],
    }
    lg = {name: np.asarray(losses[:n], dtype=np.float32) for name in names}
    log = gradprobe.RunLog.build(steps, layer_grad=lg, events=[{"kind": "x", "v": float("nan"), "s": module}],
                                 scalars=[(i, names[0], float(i)) for i in range(n)])
    d = str(tmp_path_factory.mktemp("rt"))
    log.save(d)
    back = gradprobe.RunLog.load(d)
    pd.testing.assert_frame_equal(log.steps, back.steps)
    if n:
        pd.testing.assert_frame_equal(log.layer_grad, back.layer_grad, check_names=False)
    assert back.events[0]["kind"] == "x" and np.isnan(back.events[0]["v"])
    assert len(back.scalars) == n


def test_truncated_tail_is_read_as_far_as_possible(tmp_path):
    d = str(tmp_path / "r")
    _record(d, steps=20)
    path = os.path.join(d, S.STEPS_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 37)
    with open(os.path.join(d, S.EVENTS_FILE), "ab") as f:
        f.write(b'{"kind": "trunc')
    log = gradprobe.RunLog.load(d)
    assert 0 < log.n_steps < 20
    assert log.n_steps % 4 == 0  # whole record batches only
    assert any("steps.arrow: truncated" in s for s in log.source["skipped"])
    assert any("events.jsonl" in s for s in log.source["skipped"])
    report = gradprobe.analyze(d)
    assert report.source["skipped"]


def test_not_a_log_raises_log_error(tmp_path):
    with pytest.raises(gradprobe.LogError):
        gradprobe.RunLog.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(gradprobe.LogError):
        gradprobe.analyze(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / S.STEPS_FILE).write_bytes(b"garbage" * 10)
    with pytest.raises(gradprobe.LogError):
        gradprobe.RunLog.load(str(bad))
    other = tmp_path / "other"
    other.mkdir()
    (other / S.META_FILE).write_text(json.dumps({"schema": "something.else/1"}))
    with pytest.raises(gradprobe.LogError):
        gradprobe.RunLog.load(str(other))


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, torch.nn as nn, gradprobe
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.watch(model, opt, logdir=sys.argv[1])
    for i in range(10_000):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        opt.step()
        print(i, time.time(), flush=True)
        time.sleep(0.02)
    """
)


def test_sigkill_loses_at_most_the_last_second(tmp_path):
    d = str(tmp_path / "k")
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), d], stdout=subprocess.PIPE, text=True)
    seen: list[tuple[int, float]] = []
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        i, t = line.split()
        seen.append((int(i), float(t)))
        if int(i) >= 60:
            break
    proc.send_signal(signal.SIGKILL)
    kill_time = time.time()
    proc.wait(timeout=30)
    log = gradprobe.RunLog.load(d)
    # every step that closed more than one second before the kill is on disk
    must_have = [i for i, t in seen if t < kill_time - 1.0]
    assert must_have and log.n_steps >= max(must_have) + 1
    assert log.steps["step"].tolist() == list(range(log.n_steps))
    report = gradprobe.analyze(d)
    assert report.source["steps"] == log.n_steps
