"""The core never imports the optional frameworks; the integrations say what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.readers.writers import hf_style, train_history, write_run, write_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_core_and_readers_do_not_import_frameworks(tmp_path) -> None:
    state = write_state(str(tmp_path / "trainer_state.json"), train_history(5))
    write_run(str(tmp_path / "tb"), hf_style(5))
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,lr-Adam,step,train_loss_step\r\n,0.1,0,\r\n0,,0,1.5\r\n")
    code = f"""
import json, sys
import gradprobe, gradprobe.readers, gradprobe.integrations, gradprobe.engine
torch_before = "torch" in sys.modules
for p in ({state!r}, {str(tmp_path / "tb")!r}, {str(csv_path)!r}):
    gradprobe.analyze(p)
print(json.dumps({{"frameworks": [m for m in {FRAMEWORKS!r} if m in sys.modules],
                  "readers_imported_torch": "torch" in sys.modules and not torch_before}}))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frameworks"] == []
    assert out["readers_imported_torch"] is False  # reading a log needs no torch


def test_integrations_name_the_extra_to_install() -> None:
    code = """
import sys
for m in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
    sys.modules[m] = None  # as if not installed
msgs = []
for mod in ("gradprobe.integrations.lightning", "gradprobe.integrations.hf"):
    try:
        __import__(mod)
    except ImportError as exc:
        msgs.append(str(exc))
print("|".join(msgs))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    msgs = r.stdout.strip().split("|")
    assert len(msgs) == 2
    assert "gradprobe[lightning]" in msgs[0] and "gradprobe[hf]" in msgs[1]
