"""The callbacks end a doomed fit gracefully under ``stop_on`` (real tiny Lightning and Hugging
Face runs, CPU): no exception, the trainer's own stop flag, the stop in the report, and
Lightning's ``min_steps`` honoured."""

from __future__ import annotations

import math

import pytest
import torch

import gradprobe
from tests.integrations.tiny import hf_tiny_run, lightning_module, regression_loader

pytestmark = pytest.mark.slow


def _lightning_fit(root: str, cb, *, lr: float, max_epochs: int, min_steps: int | None = None):
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, min_steps=min_steps, logger=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1, default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(lightning_module(lr, "SGD"), regression_loader())
    return trainer


def test_lightning_callback_stops_a_diverging_fit(tmp_path):
    pytest.importorskip("lightning")
    from gradprobe.integrations.lightning import STOP_NOTE, GradprobeCallback

    cb = GradprobeCallback(logdir=str(tmp_path / "gp"), stop_on="error", profile="light")
    trainer = _lightning_fit(str(tmp_path), cb, lr=1e4, max_epochs=200)  # 1600 steps planned
    d = cb.stopped
    assert d is not None and d.finding.final and d.finding.code in ("GP401", "GP403")
    assert trainer.global_step < 1600 and trainer.global_step <= d.steps + 8  # the rest of that epoch at most
    assert d.total_steps == 1600 and d.total_from == "Lightning max_steps or estimated_stepping_batches" and d.steps_left == 1600 - d.steps
    report = cb.report()
    assert report.source["stopped"]["note"] == STOP_NOTE
    assert "min_steps/min_epochs" in report.render("text")


def test_lightning_defers_the_stop_until_min_steps(tmp_path):
    pytest.importorskip("lightning")
    from gradprobe.integrations.lightning import GradprobeCallback

    cb = GradprobeCallback(logdir=str(tmp_path / "gp"), stop_on="error", profile="light")
    trainer = _lightning_fit(str(tmp_path), cb, lr=1e4, max_epochs=200, min_steps=400)
    assert cb.stopped is not None and cb.stopped.step < 400
    assert 400 <= trainer.global_step < 1600  # Lightning went on to min_steps, then stopped


def test_hf_callback_stops_training_whose_weights_went_nan(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from gradprobe.integrations.hf import GradprobeCallback

    class BreakWeights(TrainerCallback):
        """The fault: a LayerNorm weight set to NaN at step 5 (every later output is NaN)."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    model.transformer.ln_f.weight.fill_(math.nan)

    cb = GradprobeCallback(logdir=str(tmp_path / "gp"), stop_on="error", profile="light")
    trainer = hf_tiny_run(str(tmp_path / "out"), max_steps=400, callbacks=[BreakWeights(), cb], eval_steps=None,
                          save_state=False)
    d = cb.stopped
    assert d is not None and d.finding.final and d.finding.code in ("GP401", "GP403")
    assert 5 < trainer.state.global_step < 400 and trainer.state.global_step == d.steps
    assert (d.total_steps, d.total_from, d.steps_left) == (400, "Trainer state.max_steps", 400 - d.steps)
    assert cb.probe.ctx.closed  # on_train_end ran: the run ended the Trainer's ordinary way
    assert gradprobe.analyze(cb.logdir).source["stopped"]["step"] == d.step
