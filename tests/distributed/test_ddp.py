"""torchrun + DistributedDataParallel (scales out on real engines): each rank
records its own complete log in the same run directory, nothing is clobbered, no collective
is added, and ``gradprobe analyze DIR`` merges the ranks and names the rank a fault started
on.

The torchrun tests (2 ranks, gloo on CPU, a free ``--master_port``) are in the slow tier;
the merge logic is also tested on synthetic per-rank logs in the default tier.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradprobe
from tests.robustness import harness as H

SCRIPT = Path(__file__).with_name("ddp_train.py")
NAN_FINDINGS = ("nonfinite-inputs", "nonfinite-loss", "nonfinite-gradients", "nonfinite-parameters")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, *command: str, gradprobe_run: bool = False, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc_per_node=2 ...``; with ``gradprobe_run``:
    ``--no-python gradprobe run ...`` (the venv's ``gradprobe`` on PATH)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = launcher + (["--no-python", "gradprobe", "run", *command] if gradprobe_run else list(command))
    full_env = {**H.subprocess_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def rank_results(outdir: Path) -> dict[int, dict]:
    return {r: json.loads((outdir / f"rank{r}.json").read_text()) for r in (0, 1)}


def analyze_json(path: Path, *extra: str) -> tuple[int, dict]:
    res = H.analyze_subprocess(str(path), "json", extra=extra)
    assert res.exit_code in (0, 1), res.stderr
    return res.exit_code, res.report


def assert_one_log_per_rank(logdir: Path, steps: int) -> dict[int, gradprobe.RunLog]:
    """rank0/ and rank1/ and nothing else; each a complete run directory of its own rank."""
    assert sorted(os.listdir(logdir)) == ["rank0", "rank1"], os.listdir(logdir)
    logs = {r: gradprobe.RunLog.load(str(logdir / f"rank{r}")) for r in (0, 1)}
    for r, log in logs.items():
        assert log.meta["rank"] == r and log.meta["world_size"] == 2
        assert log.n_steps == steps and log.steps["step"].tolist() == list(range(steps))
        assert not log.source["skipped"], log.source["skipped"]
        files = os.listdir(logdir / f"rank{r}")
        assert {"gradprobe.json", "steps.arrow", "events.jsonl"} <= set(files)
        assert any("tfevents" in f for f in files)  # its own TensorBoard files
        assert log.meta["models"][0]["ddp"]
    assert logs[0].meta["pid"] != logs[1].meta["pid"]
    return logs


# ------------------------------------------------------------------ torchrun runs ----
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict[int, dict]:
    """The healthy job without gradprobe: the reference for checksums and collectives."""
    tmp = tmp_path_factory.mktemp("plain")
    proc = torchrun(tmp, str(SCRIPT), "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rank_results(tmp / "out")


@pytest.mark.slow
def test_nan_on_rank1_is_attributed_to_rank1(tmp_path):
    """Rank 1 reads a NaN sample at step 3; the all-reduce spreads it to rank 0. Each rank
    logs its own view; the merged analysis says it started on rank 1."""
    proc = torchrun(tmp_path, "--logdir", "log", str(SCRIPT), "out", "--nan-rank", "1", "--nan-step", "3", gradprobe_run=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("gradprobe report:") == 1  # rank 0 reports; rank 1's script did not fail
    logs = assert_one_log_per_rank(tmp_path / "log", 8)
    own = rank_results(tmp_path / "out")
    before = slice(0, 3)
    local = {r: logs[r].steps["local_grad_norm"].to_numpy()[before] for r in (0, 1)}
    reduced = {r: logs[r].steps["grad_norm"].to_numpy()[before] for r in (0, 1)}
    assert np.isfinite(local[0]).all() and np.isfinite(local[1]).all()
    assert (local[0] != local[1]).all(), "each rank's gradient before the all-reduce is its own"
    assert np.array_equal(reduced[0], reduced[1]), "the all-reduced gradient is the same on every rank"
    np.testing.assert_allclose(reduced[0], own[0]["grad_norms"][:3], rtol=1e-5)  # brute-force reference
    assert not np.isfinite(logs[1].steps["loss"].to_numpy()[3])  # rank 1's own loss went NaN at step 3
    assert np.isfinite(logs[0].steps["loss"].to_numpy()[3])  # rank 0's only after the all-reduce
    assert np.isnan(logs[1].steps["local_grad_norm"].to_numpy()[3])

    code, report = analyze_json(tmp_path / "log")
    assert code == 1
    assert report["source"]["ranks"] == [0, 1] and report["summary"]["world_size"] == 2
    by_rule = {f["rule"]: f for f in report["findings"]}
    gp801 = by_rule["rank-divergence"]
    assert gp801["evidence"]["rank"] == 1 and gp801["first_step"] == 3, gp801
    assert gp801["evidence"]["where"] == "inputs"
    nan = [by_rule[r] for r in NAN_FINDINGS if r in by_rule]
    assert len(nan) >= 3, sorted(by_rule)
    for f in nan:
        assert f["evidence"]["rank"] == 1, (f["rule"], f["evidence"])
        assert f["message"].startswith("[rank 1]")


@pytest.mark.slow
def test_healthy_run_no_findings_no_added_collectives_bit_identical(tmp_path, plain_run):
    proc = torchrun(tmp_path, "--logdir", "log", str(SCRIPT), "out", gradprobe_run=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = assert_one_log_per_rank(tmp_path / "log", 8)
    watched = rank_results(tmp_path / "out")
    for r in (0, 1):
        assert watched[r]["checksum"] == plain_run[r]["checksum"], "gradprobe run changed the parameters"
        assert watched[r]["losses"] == plain_run[r]["losses"]
        assert watched[r]["collective_seq"] == plain_run[r]["collective_seq"], "gradprobe added collectives"
        assert watched[r]["collective_calls"] == plain_run[r]["collective_calls"]
    assert not np.array_equal(logs[0].steps["local_grad_norm"], logs[1].steps["local_grad_norm"])
    assert np.array_equal(logs[0].steps["grad_norm"], logs[1].steps["grad_norm"])
    code, report = analyze_json(tmp_path / "log", "--fail-on", "warning")
    assert code == 0, [(f["code"], f["message"]) for f in report["findings"]]
    assert not [f for f in report["findings"] if f["severity"] in ("error", "warning")]
    assert report["source"]["ranks"] == [0, 1]


@pytest.mark.slow
def test_watch_inside_a_torchrun_script(tmp_path, plain_run):
    """``gradprobe.watch`` in the script itself (no ``gradprobe run``): the same per-rank
    logs, no collective, bit-identical."""
    proc = torchrun(tmp_path, str(SCRIPT), "out", "--watch", "log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = assert_one_log_per_rank(tmp_path / "log", 8)
    assert all(log.meta["mode"] == "watch" for log in logs.values())
    watched = rank_results(tmp_path / "out")
    for r in (0, 1):
        assert watched[r]["checksum"] == plain_run[r]["checksum"]
        assert watched[r]["collective_seq"] == plain_run[r]["collective_seq"]
        assert watched[r]["collective_calls"] == plain_run[r]["collective_calls"]
        np.testing.assert_allclose(logs[r].steps["grad_norm"], watched[r]["grad_norms"], rtol=1e-5)
    code, report = analyze_json(tmp_path / "log", "--fail-on", "warning")
    assert code == 0 and report["source"]["ranks"] == [0, 1]


@pytest.mark.slow
def test_no_collective_added_under_torch_distributed_debug_detail(tmp_path):
    """TORCH_DISTRIBUTED_DEBUG=DETAIL checks every collective's shape and order across ranks
    (a collective issued on one rank only would fail or hang). DDP itself crashes under
    DETAIL on this CPU build, so the gradients are averaged with dist.all_reduce."""
    env = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    plain = torchrun(tmp_path, str(SCRIPT), "plain", "--manual-allreduce", env=env)
    if plain.returncode != 0:
        pytest.skip(f"TORCH_DISTRIBUTED_DEBUG=DETAIL does not run on this build: {plain.stderr[-300:]}")
    watched = torchrun(tmp_path, "--logdir", "log", str(SCRIPT), "watched", "--manual-allreduce", gradprobe_run=True, env=env)
    assert watched.returncode == 0, watched.stderr[-3000:]
    a, b = rank_results(tmp_path / "plain"), rank_results(tmp_path / "watched")
    for r in (0, 1):
        assert b[r]["checksum"] == a[r]["checksum"]
        assert b[r]["collective_seq"] == a[r]["collective_seq"]
        assert b[r]["collective_calls"] == a[r]["collective_calls"]
    assert sorted(os.listdir(tmp_path / "log")) == ["rank0", "rank1"]


# ------------------------------------------- gradprobe run in front of the launcher ----
def gradprobe_in_front(tmp: Path, launcher: list[str], *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``gradprobe run --logdir log --format json --output report.json LAUNCHER
    --nproc_per_node=2 ... COMMAND``: the user's own launch with ``gradprobe run`` put in
    front of it."""
    args = [sys.executable, "-m", "gradprobe", "run", "--logdir", "log", "--format", "json", "--output", "report.json",
            *launcher, "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *command]
    return subprocess.run(args, cwd=tmp, env=H.subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["-m", "torch.distributed.run"], ["torchrun"]], ids=["-m torch.distributed.run", "torchrun"])
def test_gradprobe_run_in_front_of_torchrun(tmp_path, launcher):
    """The launcher runs in the ``gradprobe run`` process (``torchrun``: the console script
    found on PATH, run as its Python entry point) and never trains; its two workers are
    watched, each writes its rank directory, and the one report names rank 1."""
    proc = gradprobe_in_front(tmp_path, launcher, str(SCRIPT), "out", "--nan-rank", "1", "--nan-step", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 steps recorded by 2 ranks in log" in proc.stderr
    logs = assert_one_log_per_rank(tmp_path / "log", 8)
    assert all(not log.meta["tree"]["root"] for log in logs.values())  # the workers, not the launcher
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"]["ranks"] == [0, 1]
    by_rule = {f["rule"]: f for f in report["findings"]}
    assert by_rule["rank-divergence"]["evidence"]["rank"] == 1 and by_rule["rank-divergence"]["first_step"] == 3
    nan = [by_rule[r] for r in NAN_FINDINGS if r in by_rule]
    assert len(nan) >= 3 and all(f["evidence"]["rank"] == 1 for f in nan)


# ------------------------------------------------------- merge logic (default tier) ----
def _rank_log(rank: int, *, nan_input_at: int | None, loss_nan_from: int | None, grad_nan_from: int | None,
              reduced: np.ndarray, local: np.ndarray) -> gradprobe.RunLog:
    n = len(reduced)
    t = np.arange(n)
    loss = np.where(t >= (loss_nan_from if loss_nan_from is not None else n), np.nan, 1.0 / (1 + t))
    grad = reduced.astype(np.float64).copy()
    nan_grad = t >= (grad_nan_from if grad_nan_from is not None else n)
    grad[nan_grad] = np.nan
    loc = local.astype(np.float64).copy()
    loc[t >= (loss_nan_from if loss_nan_from is not None else n)] = np.nan
    samples = [(s, "input", "sequential", "nonfinite", 0, float(nan_input_at is not None and s >= nan_input_at)) for s in range(n)]
    return gradprobe.RunLog.build(
        {"step": t, "loss": loss, "loss_nonfinite": ~np.isfinite(loss), "grad_norm": grad, "local_grad_norm": loc,
         "grad_nonfinite_layers": nan_grad.astype(np.int32) * 2, "param_nonfinite_layers": nan_grad.astype(np.int32) * 2,
         "lr": np.full(n, 0.05)},
        meta={"rank": rank, "world_size": 2, "models": [{"name": "Sequential", "class": "Sequential", "ddp": True}],
              "optimizers": [{"index": 0, "class": "SGD", "param_groups": [{"lr": 0.05}]}]},
        layer_grad={"0.weight": np.where(nan_grad, np.nan, grad / 2), "0.bias": np.where(nan_grad, np.nan, grad / 3)},
        samples=samples,
    )


def test_merge_names_the_rank_a_nan_started_on(tmp_path):
    """Rank 1's input is NaN at step 3; both ranks' reduced gradients are NaN from step 3
    (the all-reduce), rank 0's loss only from step 4. Every merged NaN finding, including
    those both ranks show from the same step, is told from rank 1."""
    reduced = np.linspace(1.0, 0.5, 10)
    for r, log in {0: _rank_log(0, nan_input_at=None, loss_nan_from=4, grad_nan_from=3, reduced=reduced, local=reduced * 1.3),
                   1: _rank_log(1, nan_input_at=3, loss_nan_from=3, grad_nan_from=3, reduced=reduced, local=reduced * 0.8)}.items():
        log.save(str(tmp_path / "job" / f"rank{r}"))
    report = gradprobe.analyze(str(tmp_path / "job")).to_json()
    by_rule = {f["rule"]: f for f in report["findings"]}
    assert by_rule["rank-divergence"]["evidence"]["rank"] == 1
    for rule in ("nonfinite-gradients", "nonfinite-loss"):
        assert by_rule[rule]["evidence"]["rank"] == 1, (rule, by_rule[rule]["evidence"])
        assert by_rule[rule]["evidence"]["ranks"] == [0, 1]


def test_merge_flags_reduced_norms_that_disagree(tmp_path):
    reduced = np.linspace(1.0, 0.5, 10)
    _rank_log(0, nan_input_at=None, loss_nan_from=None, grad_nan_from=None, reduced=reduced, local=reduced).save(str(tmp_path / "rank0"))
    _rank_log(1, nan_input_at=None, loss_nan_from=None, grad_nan_from=None, reduced=reduced * 1.1, local=reduced).save(str(tmp_path / "rank1"))
    report = gradprobe.analyze(str(tmp_path)).to_json()
    (gp801,) = [f for f in report["findings"] if f["code"] == "GP801"]
    assert gp801["evidence"]["disagreeing_steps"] == 10


def test_merge_of_a_healthy_job_and_of_a_damaged_rank(tmp_path):
    reduced = np.linspace(1.0, 0.5, 10)
    for r in (0, 1):
        _rank_log(r, nan_input_at=None, loss_nan_from=None, grad_nan_from=None, reduced=reduced,
                  local=reduced * (1 + r)).save(str(tmp_path / f"rank{r}"))
    assert not [f for f in gradprobe.analyze(str(tmp_path)).findings if f.code == "GP801"]
    (tmp_path / "rank1" / "steps.arrow").write_bytes(b"\x00" * 40)  # a rank's log destroyed
    code, report = analyze_json(tmp_path)
    assert report["source"]["ranks"] == [0, 1]
    assert any("rank 1" in s for s in report["source"]["skipped"])
