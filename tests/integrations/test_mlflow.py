"""``watch(..., mlflow=...)`` and :func:`gradprobe.integrations.mlflow.log_report` on real
tiny training runs logged to a real MLflow file store (the framework callbacks: the slow
``test_mlflow_frameworks.py``)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("mlflow")

import gradprobe  # noqa: E402
from gradprobe.integrations.mlflow import ARTIFACT_DIR, log_report, report_tags  # noqa: E402
from tests.readers.writers import mlflow_store  # noqa: E402


def _train(steps: int = 30, *, nan_at: int | None = None, seed: int = 0, **watch: object) -> gradprobe.Probe:
    """A tiny regression under ``gradprobe.watch``; ``nan_at``: a NaN batch from that step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = torch.randn(4, 1)
    with gradprobe.watch(model, opt, profile="light", tensorboard=False, **watch) as probe:
        for step in range(steps):
            x = torch.randn(32, 4)
            if nan_at is not None and step >= nan_at:
                x[0, 0] = float("nan")
            loss = torch.nn.functional.mse_loss(model(x), x @ w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe


def _run(client, run_id: str):
    run = client.get_run(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)}
    return run.data.tags, artifacts


def test_watch_logs_the_findings_to_the_active_run(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run() as run:
            probe = _train(nan_at=12, logdir=str(tmp_path / "gp"), mlflow=True)
        client = mlflow.MlflowClient()
        tags, artifacts = _run(client, run.info.run_id)
        assert tags["gradprobe.status"] == "error"
        assert "GP401 nonfinite-loss" in tags["gradprobe.findings"]
        assert tags["gradprobe.GP401"].startswith("error from step 12: ")
        assert tags["gradprobe.root_cause"].split()[0] in tags["gradprobe.findings"]
        assert tags["gradprobe.steps"] == "30" and tags["gradprobe.version"] == gradprobe.__version__
        assert artifacts == {f"{ARTIFACT_DIR}/report.json", f"{ARTIFACT_DIR}/report.md"}
        path = client.download_artifacts(run.info.run_id, f"{ARTIFACT_DIR}/report.json", str(tmp_path / "dl"))
        with open(path, encoding="utf-8") as f:
            logged = json.load(f)
        assert [f["code"] for f in logged["findings"]] == [f.code for f in probe.report().findings]


def test_watch_on_a_healthy_run_tags_it_ok(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run() as run:
            probe = _train(logdir=str(tmp_path / "gp"), mlflow=True)
        tags, _ = _run(mlflow.MlflowClient(), run.info.run_id)
    assert not probe.report().errors and not probe.report().warnings
    assert tags["gradprobe.status"] in ("ok", "info")
    assert not [k for k in tags if k.startswith("gradprobe.GP") and tags[k].startswith(("error", "warning"))]


def test_watch_logs_to_a_run_given_by_id_after_it_ended(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run() as run:
            pass  # ended before training: the client still logs to it by id
        _train(nan_at=5, logdir=str(tmp_path / "gp"), mlflow=run.info.run_id)
        tags, _ = _run(mlflow.MlflowClient(), run.info.run_id)
        assert tags["gradprobe.status"] == "error"
        assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


def test_no_active_run_is_one_warning_and_training_goes_on(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}"):
        with pytest.warns(gradprobe.GradprobeWarning, match="no MLflow run was active"):
            probe = _train(steps=5, logdir=str(tmp_path / "gp"), mlflow=True)
    assert probe.runlog().n_steps == 5


def test_a_failing_store_is_one_warning(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}"):
        with pytest.warns(gradprobe.GradprobeWarning, match="could not log the findings to MLflow run nope"):
            probe = _train(steps=5, logdir=str(tmp_path / "gp"), mlflow="nope")
    assert probe.runlog().n_steps == 5


def test_watch_with_mlflow_is_bit_identical(tmp_path) -> None:
    """Logging to MLflow happens after the probe closed: the training is unchanged."""
    def params(**watch: object) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = gradprobe.watch(model, opt, tensorboard=False, **watch) if watch else None
        for _ in range(5):
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ctx is not None:
            ctx.close()
        return [p.detach().clone() for p in model.parameters()]

    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run():
            watched = params(logdir=str(tmp_path / "gp"), mlflow=True)
    plain = params()
    assert all(torch.equal(a, b) for a, b in zip(watched, plain))


def test_log_report_of_saved_logs_into_the_run_they_came_from(tmp_path) -> None:
    """Analyze an MLflow run from its store, then put the findings into that same run."""
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run() as run:
            for step, v in enumerate([1.0, 0.8, float("nan"), float("nan")]):
                mlflow.log_metric("loss", v, step=step)
        report = gradprobe.analyze(str(tmp_path / "mlruns"))
        assert report.source["kind"] == "mlflow" and report.source["run"] == run.info.run_id
        assert log_report(report, report.source["run"]) == run.info.run_id
        tags, artifacts = _run(mlflow.MlflowClient(), run.info.run_id)
    assert tags == {**tags, **report_tags(report)}
    assert "GP401" in tags["gradprobe.findings"] and len(artifacts) == 2
    # and the store, read again, still reads the same run (tags are not metrics)
    assert gradprobe.readers.load(str(tmp_path / "mlruns")).n_steps == 4
    assert os.path.isdir(tmp_path / "mlruns")


def test_log_report_needs_a_run() -> None:
    report = gradprobe.analyze(gradprobe.RunLog.build({"step": [0, 1], "loss": [1.0, 0.5]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow

        assert mlflow.active_run() is None
    with pytest.raises(ValueError, match="no MLflow run is active"):
        log_report(report)
