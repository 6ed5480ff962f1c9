"""The framework callbacks' ``mlflow=True`` on real Hugging Face and Lightning runs that log to
a real MLflow store, and the MLflow reader on what those frameworks logged there."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlflow")

import gradprobe  # noqa: E402
from gradprobe.readers import load  # noqa: E402
from tests.readers.writers import mlflow_store  # noqa: E402

pytestmark = pytest.mark.slow


def test_hf_trainer_with_mlflow_callback(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from gradprobe.integrations.hf import GradprobeCallback
    from tests.integrations.tiny import hf_tiny_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        cb = GradprobeCallback(logdir=str(tmp_path / "gp"), profile="light", mlflow=True)
        trainer = hf_tiny_run(str(tmp_path / "out"), max_steps=12, report_to=["mlflow"], callbacks=[cb], eval_steps=6,
                              save_state=False)
        assert mlflow.active_run() is None  # HF's MLflowCallback ended its run before ours logged to it
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert len(runs) == 1 and cb.mlflow_run_id == runs[0].info.run_id
        tags = runs[0].data.tags
    report = cb.report()
    assert tags["gradprobe.steps"] == "12"
    assert tags["gradprobe.findings"] == (", ".join(f"{f.code} {f.rule}" for f in report.findings) or "none")
    # the run Hugging Face logged, read back by the MLflow reader
    log = load(str(tmp_path / "mlruns"))
    assert log.source["kind"] == "mlflow" and log.source["run"] == cb.mlflow_run_id
    cols = log.meta["names"]["columns"]
    assert cols["loss"] == "loss" and cols["grad_norm"] == "grad_norm" and cols["lr"] == "learning_rate"
    assert cols["eval_loss"] == "eval_loss"
    assert "train_loss" in log.meta["names"]["unused"]  # the one-point whole-run mean
    hist = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    np.testing.assert_allclose(log.steps.set_index("step").loc[[h["step"] for h in hist], "loss"], [h["loss"] for h in hist],
                               rtol=1e-5)
    hp = log.meta["mlflow"]["hyperparameters"]
    assert hp["max_norm"]["value"] == trainer.args.max_grad_norm and hp["lr"]["value"] == trainer.args.learning_rate
    assert log.meta["optimizers"][0]["class"] == "AdamW"  # optim=adamw_torch
    assert hp["vocab_size"]["value"] == 100  # MLflowCallback logs the model config too
    rep = gradprobe.analyze(log)
    assert rep.summary["optimizer"] == "AdamW" and rep.summary["max_norm"] == trainer.args.max_grad_norm


def test_lightning_mlflow_logger_run_gets_the_findings(tmp_path) -> None:
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import MLFlowLogger

    from gradprobe.integrations.lightning import GradprobeCallback
    from tests.integrations.tiny import lightning_module, regression_loader

    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        logger = MLFlowLogger(experiment_name="fit", tracking_uri=f"file:{tmp_path / 'mlruns'}")
        cb = GradprobeCallback(logdir=str(tmp_path / "gp"), profile="light", mlflow=True)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=3, logger=logger, log_every_n_steps=1, gradient_clip_val=1.0,
                             callbacks=[cb, LearningRateMonitor(logging_interval="step")], enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                             default_root_dir=str(tmp_path), num_sanity_val_steps=0)
        trainer.fit(lightning_module(0.05), regression_loader(), regression_loader(64, seed=1))
        assert cb.mlflow_run_id == logger.run_id
        tags = mlflow.MlflowClient().get_run(logger.run_id).data.tags
    assert tags["gradprobe.steps"] == str(trainer.global_step)
    assert tags["gradprobe.status"] in ("ok", "info")
    log = load(str(tmp_path / "mlruns"))
    cols = log.meta["names"]["columns"]
    assert cols["loss"] == "train_loss_step" and cols["eval_loss"] == "val_loss" and cols["lr"] == "lr-SGD"
    assert log.meta["optimizers"][0]["class"] == "SGD"
    assert len(log.meta["names"]["layer_grad"]) == 4  # grad_2.0_norm/<param>
    assert log.n_steps == trainer.global_step


def test_lightning_exception_still_logs(tmp_path) -> None:
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger

    from gradprobe.integrations.lightning import GradprobeCallback
    from tests.integrations.tiny import lightning_module, regression_loader

    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        logger = MLFlowLogger(experiment_name="fit", tracking_uri=f"file:{tmp_path / 'mlruns'}")
        cb = GradprobeCallback(logdir=str(tmp_path / "gp"), profile="light", mlflow=True)
        trainer = pl.Trainer(max_epochs=2, logger=logger, callbacks=[cb], enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                             default_root_dir=str(tmp_path))
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(lightning_module(0.05, fail_at_step=3), regression_loader())
        tags = mlflow.MlflowClient().get_run(logger.run_id).data.tags
    assert tags["gradprobe.steps"] == "3"
