"""``benchmarks/gpu_check.py``: on a machine without CUDA it says so and exits 0; its harness
runs end to end on the CPU (``--device cpu``: the checks that need CUDA are n/a)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_without_cuda_it_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _run()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("gpu_check: no CUDA device here") and "nothing to check" in out.stdout
    assert not out.stderr


@pytest.mark.slow
def test_the_harness_runs_on_the_cpu(tmp_path):
    out = _run("--device", "cpu", "--models", "mlp", "--budget", "0", "--min-rounds", "1", "--block", "50",
               "--json", str(tmp_path / "t.json"))
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    status = {r["check"]: r["status"] for r in rows}
    assert status == {
        "host syncs added per step": "n/a",
        "bit-identical parameters, lstm (every step sampled)": "pass",
        "bit-identical parameters, mlp (every step sampled)": "pass",
        "float16 GradScaler: skipped steps recorded": "pass",
        "DDP over GLOO, world size 1": "pass",
        "CUDA memory recorded": "n/a",
        "clipping by its effect (by hand vs clip_grad_norm_)": "pass",
        "overhead mlp (default profile)": status.get("overhead mlp (default profile)"),  # timing: not judged here
    }, out.stdout + out.stderr[-3000:]
    assert "check" in out.stdout and "status" in out.stdout  # the table
    assert out.returncode == (1 if "FAIL" in status.values() else 0)
