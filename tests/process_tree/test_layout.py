"""Where a watched process writes, in this process (fast): a process-tree probe names its run
directory at its first recorded step from the rank known then, and writes nothing without
one; console scripts on PATH are run as their Python file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.probe.core import Probe
from gradprobe.runner import RunnerError, python_script_on_path, resolve_target
from gradprobe.tree import TreeLayout, tree_id
from tests.robustness import harness as H


def _train(probe_kwargs: dict, steps: int) -> Probe:
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, opt, **probe_kwargs)
    probe.writer.put_event({"kind": "note", "text": "before the first step", "step": 0})
    for _ in range(steps):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    probe.close()
    return probe


@pytest.fixture
def no_rank_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_no_step_writes_nothing(tmp_path, no_rank_env):
    tree = tmp_path / "tree"
    tree.mkdir()
    probe = _train({"logdir": str(tree), "layout": TreeLayout(str(tree), None, "tok", root=False),
                    "run_info": {"tree": {"id": "tok"}}}, steps=0)
    assert os.listdir(tree) == [] and probe.logdir == str(tree)


@pytest.mark.parametrize(
    "env, root, name",
    [
        ({}, True, ""),  # the gradprobe run process itself: the tree directory
        ({}, False, "pid{pid}"),  # a child that is no rank
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, False, "rank3"),  # torchrun: the global rank
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, "rank1"),  # Lightning's children: no RANK
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, "rank1"),  # a rank even when it is the parent
    ],
)
def test_first_step_names_the_run_directory(tmp_path, no_rank_env, env, root, name):
    for k, v in env.items():
        no_rank_env.setenv(k, v)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "claims").mkdir()
    layout = TreeLayout(str(tree), str(tree), "tok", root=root)  # claims in tree/claims
    probe = _train({"logdir": str(tree), "layout": layout, "run_info": {"tree": {"id": "tok"}}}, steps=3)
    want = tree / name.format(pid=os.getpid()) if name else tree
    assert probe.logdir == str(want)
    log = gradprobe.RunLog.load(str(want))
    assert log.n_steps == 3 and tree_id(str(want)) == "tok"
    assert log.meta["rank"] == int(env.get("RANK", env.get("LOCAL_RANK", 0)))
    assert log.meta["world_size"] == int(env.get("WORLD_SIZE", 1))
    assert [e["text"] for e in log.events if e["kind"] == "note"] == ["before the first step"]  # kept, then written


def test_a_name_is_claimed_once_per_tree(tmp_path, no_rank_env):
    tree = tmp_path / "tree"
    (tree / "claims").mkdir(parents=True)
    first = TreeLayout(str(tree), str(tree), "tok", root=False)
    assert first.claim(0, 2) == str(tree / "rank0")
    # a second rank 0 in the same tree (a second job): a directory of its own
    assert first.claim(0, 2) == str(tree / f"pid{os.getpid()}")
    assert first.claim(0, 2) == str(tree / f"pid{os.getpid()}-2")
    # without the hook folder (an orphan outliving the run): a stale directory of another
    # tree is reused, one of this tree is not
    orphan = TreeLayout(str(tree), None, "tok", root=False)
    (tree / "rank1").mkdir()
    (tree / "rank1" / "gradprobe.json").write_text('{"tree": {"id": "older"}}')
    assert orphan.claim(1, 2) == str(tree / "rank1")
    (tree / "rank1" / "gradprobe.json").write_text('{"tree": {"id": "tok"}}')
    assert orphan.claim(1, 2) == str(tree / f"pid{os.getpid()}")


def test_watch_keeps_its_layout(tmp_path, no_rank_env):
    """``gradprobe.watch`` (no tree) writes at once, as before."""
    probe = _train({"logdir": str(tmp_path / "run")}, steps=0)
    assert probe.logdir == str(tmp_path / "run") and (tmp_path / "run" / "gradprobe.json").exists()


# --------------------------------------------------------------- console scripts -----
def _bin(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    scripts = {
        "mytool": "#!/usr/bin/env python3\nimport sys\nprint('argv', sys.argv)\n",
        "longtool": "#!/bin/sh\n'''exec' \"/a/very/long/path/bin/python3\" \"$0\" \"$@\"\n' '''\nimport sys\nprint('long', sys.argv[1:])\n",
        "venvtool": f"#!{sys.executable}\nimport sys\nprint('venv', sys.argv[1:])\n",
        "shellprog": "#!/bin/sh\necho hi\n",
    }
    for name, text in scripts.items():
        (b / name).write_text(text)
        (b / name).chmod(0o755)
    return b


def test_python_console_scripts_are_found_on_path(tmp_path, monkeypatch):
    b = _bin(tmp_path)
    monkeypatch.setenv("PATH", str(b) + os.pathsep + os.environ["PATH"])
    monkeypatch.chdir(tmp_path)
    for name in ("mytool", "longtool", "venvtool"):
        assert python_script_on_path(name) == str(b / name)
        target = resolve_target(name, ["a"], module=False)
        assert (target.kind, target.name, target.args) == ("file", str(b / name), ["a"])
    assert python_script_on_path("shellprog") is None and python_script_on_path("nosuch-tool") is None
    assert python_script_on_path("bin/mytool") is None  # a path is a path, as for python
    with pytest.raises(RunnerError, match="shellprog is not a Python script"):
        resolve_target("shellprog", [], module=False)
    (tmp_path / "mytool").write_text("print('the local file wins')\n")
    assert resolve_target("mytool", [], module=False).name == "mytool"


def test_gradprobe_run_a_console_script(tmp_path):
    b = _bin(tmp_path)
    env = H.subprocess_env()
    env["PATH"] = str(b) + os.pathsep + env["PATH"]
    run = [sys.executable, "-m", "gradprobe", "run", "--no-report"]
    ok = subprocess.run([*run, "mytool", "x", "--y"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout == f"argv [{str(b / 'mytool')!r}, 'x', '--y']\n", ok.stderr
    bad = subprocess.run([*run, "shellprog"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "is not a Python script" in bad.stderr and "Traceback" not in bad.stderr


def _child_run(tree: Path, name: str, token: str, code: str) -> subprocess.Popen:
    """A child process that writes a run of the tree ``token`` (its gradprobe.json without
    ``closed``), then does ``code``."""
    run = tree / name
    run.mkdir(parents=True)
    return subprocess.Popen([sys.executable, "-c", (
        "import json, os, sys, time\n"
        f"path = {str(run / 'gradprobe.json')!r}\n"
        f"meta = {{'pid': os.getpid(), 'tree': {{'id': {token!r}}}}}\n"
        "json.dump(meta, open(path, 'w'))\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n" + code)], stdout=subprocess.PIPE, text=True)


def test_the_report_waits_for_children_still_closing_their_runs(tmp_path):
    """A launcher that does not join its workers (Lightning's rank 0 leaves fit while rank 1 is
    closing its log): the report waits for the child's run to close, or for the child to exit;
    an exited child that nobody reaped (a zombie) is not waited for."""
    from gradprobe.tree_report import wait_for_children

    token = "t0"
    closing = _child_run(tmp_path, "rank1", token, (
        "time.sleep(1.0)\n"
        "meta['closed'] = 'now'; json.dump(meta, open(path, 'w'))\n"
        "time.sleep(60)\n"))
    assert closing.stdout.readline() == "ready\n"
    exiting = _child_run(tmp_path, "rank2", token, "time.sleep(1.5)\n")
    assert exiting.stdout.readline() == "ready\n"
    try:
        t0 = time.monotonic()
        assert wait_for_children(str(tmp_path), token, timeout=30.0) == []
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 10.0  # until the first closed and the second exited (a zombie: not reaped yet)
        assert exiting.poll() is not None
    finally:
        closing.kill()
        closing.wait()
        exiting.wait()
    stuck = _child_run(tmp_path, "rank3", token, "time.sleep(60)\n")
    assert stuck.stdout.readline() == "ready\n"
    try:
        assert wait_for_children(str(tmp_path), token, timeout=0.3) == [stuck.pid]  # bounded
    finally:
        stuck.kill()
        stuck.wait()
