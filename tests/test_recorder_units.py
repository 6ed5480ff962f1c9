"""The recorder's units and their contracts: the deep probes see the probe only through
``DeepHost``; one memory-limit path (the probe's) and one rank helper; the recorder records
and reports are made downstream; no product file over 900 lines."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.config import ProbeConfig
from gradprobe.probe.core import DeepHost
from tests.helpers import mlp, regression_batches

ROOT = Path(__file__).resolve().parents[1]
#: the longest a product file may be (the repository's rule)
MAX_LINES = 900


def test_no_product_file_is_over_900_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "gradprobe").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_deep_probes_use_only_the_deep_host():
    """``DeepProbes`` reaches the probe through ``self.host`` only, and only through what
    :class:`DeepHost` offers (no private field of the probe, no other unit)."""
    tree = ast.parse((ROOT / "gradprobe" / "probe" / "deep.py").read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "host" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            used.add(node.attr)
        if isinstance(node, ast.Attribute) and node.attr in ("probe", "_probe") and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            pytest.fail(f"deep.py line {node.lineno} reaches the probe itself")
    offered = {n for n in dir(DeepHost) if not n.startswith("_")} | {"guard", "config"}
    assert used and used <= offered, used - offered


def _loop(probe_cfg: ProbeConfig, logdir: str, steps: int, catch: bool = False) -> tuple[int, list[BaseException]]:
    torch.manual_seed(0)
    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    raised: list[BaseException] = []
    done = 0
    with gradprobe.watch(model, opt, logdir=logdir, config=probe_cfg):
        for x, y in regression_batches(steps):
            try:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            except MemoryError as exc:
                raised.append(exc)
                if not catch:
                    break
            done += 1
    return done, raised


def test_memory_limit_raises_at_the_step_boundary_and_again_while_over(tmp_path):
    """``memory_limit`` (``gradprobe run --memory-limit``, every process of the tree): the
    step is recorded, then ``MemoryError`` reaches the script from ``optimizer.step()``; a
    script that catches it is stopped again at the next step boundary (here each following
    backward); one event."""
    logdir = str(tmp_path / "r")
    done, raised = _loop(ProbeConfig(memory_limit=1, deep=False), logdir, 4, catch=True)
    assert len(raised) == 4 and all("exceeded --memory-limit" in str(e) for e in raised)
    assert "at step 1" in str(raised[0])
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps >= 1 and log.steps["optimizer_steps"].iloc[0] == 1
    hits = log.events_of("memory_limit")
    assert len(hits) == 1 and hits[0]["step"] == 1 and hits[0]["limit"] == 1 and hits[0]["memory"] > 1


def test_memory_limit_holds_a_run_whose_step_never_closes(tmp_path):
    """No optimizer, no backward: one giant step. The limit is checked at the model's
    forward (a fresh reading, at most every 0.25 s)."""
    model = nn.Linear(8, 8)
    kept = []
    with pytest.raises(MemoryError, match="exceeded --memory-limit"):
        with gradprobe.watch(model, logdir=str(tmp_path / "r"), config=ProbeConfig(memory_limit=1, deep=False)):
            for _ in range(1000):
                kept.append(model(torch.randn(4, 8)))
                time.sleep(0.001)
    assert len(kept) < 1000


def test_no_memory_limit_without_one(tmp_path):
    done, raised = _loop(ProbeConfig(deep=False), str(tmp_path / "r"), 3)
    assert done == 3 and not raised


@pytest.mark.parametrize(
    "env,expected",
    [({}, (0, 1)), ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4)),
     ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, (1, 2)), ({"RANK": "x"}, (0, 1))],
)
def test_the_rank_helper(monkeypatch, env, expected):
    """One rank helper for the probe and ``gradprobe run``: torchrun's ``RANK``, Lightning's
    children's ``LOCAL_RANK``, nothing (a plain run); without a process group."""
    from gradprobe.probe.ranks import rank_and_world

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert rank_and_world() == expected


def test_the_rank_helper_and_the_rescaling_classifier_import_no_torch():
    code = ("import sys; from gradprobe.probe.ranks import rank_and_world; from gradprobe.probe.rescaling import classify; "
            "import gradprobe.runner; rank_and_world(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_rank_helper_reads_the_process_group(tmp_path):
    import torch.distributed as dist

    from gradprobe.probe.ranks import rank_and_world

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert rank_and_world() == (0, 1)
    finally:
        dist.destroy_process_group()


def test_the_recorder_records_and_reports_are_made_downstream(tmp_path, monkeypatch):
    """Closing a probe builds no report and writes no findings (the rule engine is never
    called); ``probe.report()`` builds it and adds the findings as TensorBoard text."""
    import gradprobe.engine

    calls = []
    real = gradprobe.engine.analyze_runlog
    monkeypatch.setattr(gradprobe.engine, "analyze_runlog", lambda log: calls.append(1) or real(log))
    logdir = str(tmp_path / "r")
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for x, y in regression_batches(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert not calls and not glob.glob(os.path.join(logdir, "*.findings"))
    report = probe.report()
    assert calls == [1] and report.source["steps"] == 5
    (findings,) = glob.glob(os.path.join(logdir, "*.findings"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradprobe.runlog.tensorboard import FINDINGS_TAG

    acc = EventAccumulator(findings)
    acc.Reload()
    assert FINDINGS_TAG in acc.Tags()["tensors"]
