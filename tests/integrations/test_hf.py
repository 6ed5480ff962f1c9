"""``gradprobe.integrations.hf.GradprobeCallback`` on real Hugging Face ``Trainer`` runs (CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradprobe  # noqa: E402
from gradprobe.integrations.hf import GradprobeCallback  # noqa: E402
from tests.integrations.tiny import hf_tiny_run  # noqa: E402

pytestmark = pytest.mark.slow


def test_callback_records_training(tmp_path) -> None:
    cb = GradprobeCallback()
    trainer = hf_tiny_run(str(tmp_path / "out"), max_steps=12, callbacks=[cb], eval_steps=None, save_state=False)
    assert cb.logdir == os.path.join(str(tmp_path / "out"), "gradprobe")
    log = gradprobe.RunLog.load(cb.logdir)
    assert log.n_steps == 12
    assert log.meta["optimizers"][0]["class"] == "AdamW"
    assert log.meta["models"][0]["class"] == "GPT2LMHeadModel"
    names = log.layer_names
    assert "transformer.wte.weight" in names and "transformer.h.0.attn.c_attn.weight" in names
    assert len(names) == len([p for p in trainer.model.parameters() if p.requires_grad])
    st = log.steps
    assert (st["clip_max_norm"] == trainer.args.max_grad_norm).all()  # HF clips by default
    # the numbers the Trainer logged itself (logging_steps=1): loss and pre-clip grad_norm
    hist = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    assert [h["step"] for h in hist] == list(range(1, 13))
    np.testing.assert_allclose(st["loss"], [h["loss"] for h in hist], rtol=1e-5)
    np.testing.assert_allclose(st["grad_norm"], [h["grad_norm"] for h in hist], rtol=1e-4)
    report = cb.report()
    assert report.source["kind"] == "gradprobe" and report.source["steps"] == 12
    assert not report.errors and not report.warnings, [f.code for f in report.findings]


def test_exception_recorded_with_the_context_manager(tmp_path) -> None:
    from transformers import TrainerCallback

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == 3:
                raise RuntimeError("boom at step 3")

    cb = GradprobeCallback(logdir=str(tmp_path / "gp"), profile="light")
    with pytest.raises(RuntimeError, match="boom"):
        with cb:
            hf_tiny_run(str(tmp_path / "out"), max_steps=10, callbacks=[cb, Fail()], eval_steps=None, save_state=False)
    log = gradprobe.RunLog.load(cb.logdir)
    assert log.n_steps == 3
    assert "boom at step 3" in str(log.events_of("exception"))


def test_accelerated_optimizer_is_unwrapped_with_its_scaler() -> None:
    """fp16 AMP cannot run on CPU, so the Trainer's wrapping is rebuilt by hand: Accelerate's
    ``AcceleratedOptimizer`` holds the real optimizer and the GradScaler the callback watches."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from gradprobe.integrations.hf import _unwrap_optimizer

    Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    inner, found = _unwrap_optimizer(AcceleratedOptimizer(sgd, device_placement=False, scaler=scaler))
    assert inner is sgd and found is scaler
    assert _unwrap_optimizer(sgd) == (sgd, None)
