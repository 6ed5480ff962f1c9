"""Early stop, slow tier: a real torchrun job (2 CPU ranks, gloo) with a fault on rank 1 only,
the issue's healthy 20000-step run, and the calibration corpus's faulty programs, on none of
which a live request may go unconfirmed by the engine."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradprobe
from gradprobe.live import EXIT_STOPPED
from tests.test_early_stop import NAN_SCRIPT, _env, gp_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

#: each rank trains its own tiny model in a gloo process group (no DDP: the fault stays on
#: rank 1); rank 1's batch turns NaN at step 30; rank 0 is healthy and slow, still training
#: when rank 1 is stopped, and would end with a barrier
RANKS_SCRIPT = '''
import os, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 4); y = x.sum(1, keepdim=True)
for step in range(3000):
    xb = x * float("nan") if rank == 1 and step == 30 else x
    loss = torch.nn.functional.mse_loss(model(xb), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if rank == 0:
        time.sleep(0.01)
dist.barrier()
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_job_with_a_fault_on_rank_1_ends_naming_rank_1(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS_SCRIPT))
    res = gp_run("--stop-on", "error", "--profile", "light", "--logdir", "log", "--format", "json", "--output", "r.json",
                 "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
                 f"--master_port={_free_port()}", str(script), cwd=tmp_path, timeout=600)
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    stop = json.loads((tmp_path / "r.json").read_text())["source"]["stopped"]
    assert stop["rank"] == 1 and stop["code"] in ("GP401", "GP403") and 30 < stop["step"] < 3000
    assert f"the run (rank 1) was stopped after step {stop['step']} by --stop-on" in res.stderr
    rank1 = json.loads((tmp_path / "log" / "rank1" / "gradprobe.json").read_text())
    rank0 = json.loads((tmp_path / "log" / "rank0" / "gradprobe.json").read_text())
    assert rank1["stopped"]["rank"] == 1 and "stopped" not in rank0
    assert gradprobe.RunLog.load(tmp_path / "log" / "rank0").n_steps < 3000  # the launcher ended the job
    assert re.search(r"exitcode\s*:\s*3", res.stderr)  # torchrun's own failure summary: rank 1 exited 3


def test_the_issue_script_healthy_runs_its_20000_steps_and_exits_0(tmp_path):
    script = tmp_path / "nan_at.py"
    script.write_text(textwrap.dedent(NAN_SCRIPT))
    res = gp_run("--stop-on", "error", "--profile", "light", "--logdir", "log", "--no-report", str(script), "20000", "-1",
                 "params.txt", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "log" / "gradprobe.json").read_text())
    assert meta["steps"] == 20000 and "stopped" not in meta and not meta["live_checks"].get("unconfirmed")
    plain = subprocess.run([sys.executable, str(script), "20000", "-1", "plain.txt"], check=False, cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0
    assert (tmp_path / "params.txt").read_text() == (tmp_path / "plain.txt").read_text()


def _bench():
    spec = importlib.util.spec_from_file_location("early_stop_bench", REPO / "benchmarks" / "early_stop.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_no_live_request_goes_unconfirmed_on_the_faulty_corpus_programs():
    bench = _bench()
    faulty = {k: v for k, v in bench.load_programs().items() if v["label"] == "faulty"}
    assert len(faulty) >= 20
    runs = {}
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=bench.WORKERS) as pool:
        for r in pool.map(lambda i: bench.run_item(i, "error"), faulty):
            runs[r["id"]] = r
    assert not [i for i, r in runs.items() if r.get("error")]
    unconfirmed = {i: r["unconfirmed"] for i, r in runs.items() if r["unconfirmed"]}
    assert not unconfirmed
    stopped = {i for i, r in runs.items() if r["stopped"]}
    assert all(runs[i]["exit"] == EXIT_STOPPED for i in stopped)
    # the programs whose parameters go NaN for good, or whose graphs grow every step, are
    # stopped (nan_sqrt_zero_distance is not required: its 40 steps train in ~0.1 s, over
    # before the writer's first look at them)
    assert {"nan_log_zero_bce", "nan_in_input_features", "absurd_lr_divergence", "epoch_loss_tensor_sum",
            "rnn_retain_graph_manual_sgd"} <= stopped, sorted(stopped)
