"""The MLflow reader on runs MLflow itself wrote: the file store here (a few seconds), the
SQLite store in ``test_mlflow_sqlite.py`` (slow tier: MLflow migrates a new database for
about ten seconds)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("mlflow")

import gradprobe  # noqa: E402
from gradprobe.readers import detect, load, load_runs  # noqa: E402
from gradprobe.runlog import LogError  # noqa: E402
from tests.readers.test_cli import analyze, assert_clean_exit_2  # noqa: E402
from tests.readers.writers import fit_rows, mlflow_store, train_logged_to_mlflow, write_metrics  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """``mlruns/`` with a healthy run (nested key ``train/loss``, clipped at 1.0), a run whose
    SGD step diverges to inf/NaN, a shorter healthy run in a second experiment, and an
    Optuna-style parent run without metrics."""
    root = tmp_path_factory.mktemp("mlflow")
    out = {"root": str(root), "mlruns": str(root / "mlruns")}
    with mlflow_store(f"file:{root / 'mlruns'}") as mlflow:
        out["healthy"] = train_logged_to_mlflow(mlflow, lr=0.05, steps=40, run_name="healthy", max_norm=1.0)
        out["nan"] = train_logged_to_mlflow(mlflow, lr=50.0, steps=30, run_name="diverges")
        with mlflow.start_run(run_name="study"):
            mlflow.log_param("n_trials", 2)
        out["other"] = train_logged_to_mlflow(mlflow, lr=0.05, steps=12, run_name="short", experiment="second")
    return out


def _run_dir(store: dict[str, str], run_id: str) -> str:
    for exp in os.listdir(store["mlruns"]):
        d = os.path.join(store["mlruns"], exp, run_id)
        if os.path.isdir(d):
            return d
    raise AssertionError(run_id)


def test_every_path_to_a_run_is_detected(store) -> None:
    run = _run_dir(store, store["healthy"])
    for p in (store["root"], store["mlruns"], os.path.dirname(run), run):
        assert detect(p) == "mlflow", p


def test_healthy_run_read_and_silent(store) -> None:
    log = load(_run_dir(store, store["healthy"]))
    assert log.source["kind"] == "mlflow" and log.source["run"] == store["healthy"]
    st = log.steps
    assert st["step"].tolist() == list(range(40))
    assert log.meta["names"]["columns"]["loss"] == "train/loss"  # a nested file: metrics/train/loss
    assert np.isfinite(st["loss"]).all() and np.isfinite(st["grad_norm"]).all()
    assert (st["lr"] == 0.05).all()
    assert st.set_index("step")["eval_loss"].dropna().index.tolist() == [9, 19, 29, 39]
    # params: the optimizer, its lr, the batch size, and the clip every step had
    mf = log.meta["mlflow"]
    assert mf["run_name"] == "healthy" and mf["status"] == "FINISHED"
    assert mf["hyperparameters"]["max_norm"] == {"value": 1.0, "from": "max_grad_norm"}
    assert mf["hyperparameters"]["batch_size"]["value"] == 32
    assert log.meta["optimizers"][0]["class"] == "SGD"
    assert (st["clip_max_norm"] == 1.0).all() and (st["clip_calls"] == 1).all()
    assert "clip" in log.meta["signals"]
    assert any("max_norm 1 from param 'max_grad_norm'" in n for n in log.source["notes"])
    report = gradprobe.analyze(log)
    assert report.summary["optimizer"] == "SGD" and report.summary["max_norm"] == 1.0
    assert not report.errors and not report.warnings, [(f.code, f.message) for f in report.findings]


def test_run_whose_loss_goes_nan_is_diagnosed(store) -> None:
    log = load(store["mlruns"], run=store["nan"])
    st = log.steps
    assert st["loss_nonfinite"].any() and np.isnan(st["loss"]).any()  # "nan" lines decoded
    assert np.isinf(st["grad_norm"]).any()
    report = gradprobe.analyze(log)
    assert "GP401" in [f.code for f in report.findings]


def test_store_reads_the_run_with_most_steps_and_names_the_others(store) -> None:
    log = load(store["root"])  # the project folder holding mlruns/
    assert log.source["run"] == store["healthy"]
    note = " ".join(log.source["skipped"])
    assert "2 other MLflow run(s)" in note and store["nan"] in note and "(30 steps)" in note and "--run" in note
    assert "1 MLflow run(s) without metrics not analyzed" in note and "study" in note
    assert {r["run_id"] for r in log.meta["mlflow"]["other_runs"]} == {store["nan"], store["other"]}
    # one experiment folder holds only its own runs
    second = os.path.dirname(_run_dir(store, store["other"]))
    assert load(second).source["run"] == store["other"]


def test_run_picked_by_id_prefix_or_name(store, tmp_path) -> None:
    assert load(store["mlruns"], run=store["nan"][:8]).source["run"] == store["nan"]
    assert load(store["mlruns"], run="short").source["run"] == store["other"]
    with pytest.raises(LogError, match="no MLflow run 'nope' here"):
        load(store["mlruns"], run="nope")
    csv_path = write_metrics(str(tmp_path / "version_0"), fit_rows())
    with pytest.raises(LogError, match="--run picks a run of an MLflow store"):
        load(csv_path, run="x")


def test_load_runs_gives_one_log_per_run(store) -> None:
    logs = load_runs(store["mlruns"])
    assert sorted(log.source["run"] for log in logs) == sorted([store["healthy"], store["nan"], store["other"]])
    assert load_runs(store["mlruns"], run="short")[0].source["run"] == store["other"]
    assert load_runs(os.path.dirname(__file__)) is None  # not MLflow: analyzed as one log


def test_cli_one_report_per_run(store) -> None:
    r = analyze(store["mlruns"], "--format", "json")
    assert r.returncode == 1, r.stderr  # the diverging run has errors
    reports = json.loads(r.stdout)
    assert isinstance(reports, list) and len(reports) == 3
    by_run = {rep["source"]["run"]: rep for rep in reports}
    assert "GP401" in [f["code"] for f in by_run[store["nan"]]["findings"]]
    assert not [f for f in by_run[store["healthy"]]["findings"] if f["severity"] in ("error", "warning")]
    # the rest in process (typer's runner: the same command, no interpreter start)
    r = _cli(store["mlruns"], "--run", store["healthy"], "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"]["run"] == store["healthy"]
    r = _cli(store["mlruns"], "--fail-on", "never")
    assert r.exit_code == 0 and r.stdout.count("gradprobe report: ") == 3 and store["nan"] in r.stdout
    for args, message in (((store["mlruns"], "--format", "html"), "pass --run ID"),
                          ((store["mlruns"], "--run", "nope"), "no MLflow run 'nope' here")):
        _exit_2(_cli(*args), message)


def _exit_2(r, message: str) -> None:
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gradprobe: ") and message in r.stderr, r.stderr


def _cli(*args: str):
    from typer.testing import CliRunner

    from gradprobe.cli.app import app

    return CliRunner().invoke(app, ["analyze", *args])


def test_log_metric_without_step_is_numbered_in_order(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run():
            for v in (3.0, 2.0, 1.5, 1.2, 1.1):
                mlflow.log_metric("loss", v)  # every value at step 0
    log = load(str(tmp_path / "mlruns"))
    assert log.steps["step"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(log.steps["loss"], [3.0, 2.0, 1.5, 1.2, 1.1], rtol=1e-6)
    assert any("numbered in logged order" in n for n in log.source["notes"])


def test_damaged_metric_files_give_a_partial_report_or_one_line(store, tmp_path) -> None:
    run = shutil.copytree(_run_dir(store, store["healthy"]), tmp_path / "run")
    loss = run / "metrics" / "train" / "loss"
    lines = loss.read_text().splitlines(keepends=True)
    loss.write_text("".join(lines[:20]) + "garbage here\n1 2 3 4 5\n" + "".join(lines[20:30]) + lines[30][:9])
    log = load(str(run))
    assert log.steps["loss"].notna().sum() == 30
    skipped = " ".join(log.source["skipped"])
    assert "2 line(s) that are not 'timestamp value step' skipped" in skipped
    assert "last line cut off" in skipped
    r = _cli(str(run), "--format", "json", "--fail-on", "never")
    assert r.exit_code == 0 and any("cut off" in s for s in json.loads(r.stdout)["source"]["skipped"])
    # nothing readable at all: one line, exit 2 (a real process once)
    for f in (run / "metrics").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00\xffnot a metric\n")
    assert_clean_exit_2(analyze(str(run)), "no readable metric")
    (run / "meta.yaml").write_text("{ not: [yaml")
    _exit_2(_cli(str(run)), "no log found")


def test_a_store_without_runs_or_metrics_is_one_line(tmp_path) -> None:
    with mlflow_store(f"file:{tmp_path / 'mlruns'}") as mlflow:
        with mlflow.start_run(run_name="empty"):
            mlflow.log_param("lr", 0.1)
    _exit_2(_cli(str(tmp_path / "mlruns")), "has no metrics")
