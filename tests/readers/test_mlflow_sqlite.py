"""The MLflow reader on MLflow's SQLite store (``sqlite:///mlflow.db``, MLflow 3's default),
written by MLflow itself: slow tier, since MLflow migrates a new database for about ten
seconds (one database serves the module)."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3

import numpy as np
import pytest

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

import gradprobe  # noqa: E402
from gradprobe.readers import detect, load, load_runs  # noqa: E402
from gradprobe.readers.mlflow import SQL_INF  # noqa: E402
from tests.readers.test_cli import analyze, assert_clean_exit_2  # noqa: E402
from tests.readers.writers import mlflow_store, train_logged_to_mlflow  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mlflow_sqlite")
    out = {"root": str(root), "db": str(root / "mlflow.db")}
    with mlflow_store(f"sqlite:///{root / 'mlflow.db'}") as mlflow:
        out["healthy"] = train_logged_to_mlflow(mlflow, lr=0.05, steps=40, run_name="healthy", loss_key="train/loss")
        out["nan"] = train_logged_to_mlflow(mlflow, lr=50.0, steps=30, run_name="diverges")
        with mlflow.start_run(run_name="special") as run:
            for step, v in enumerate([2.0, math.nan, math.inf, -math.inf, 1.0]):
                mlflow.log_metric("eval/loss", 1.0, step=step)
                mlflow.log_metric("loss", v, step=step)
        out["special"] = run.info.run_id
    return out


def test_detected_as_a_file_and_through_its_folder(db) -> None:
    assert detect(db["db"]) == "mlflow" and detect(db["root"]) == "mlflow"


def test_nan_and_inf_are_decoded(db) -> None:
    # MLflow stores NaN as 0.0 with is_nan = 1 and +-Inf as +-1.797e308
    con = sqlite3.connect(db["db"])
    rows = con.execute("SELECT value, is_nan FROM metrics WHERE run_uuid = ? AND key = 'loss' ORDER BY step",
                       (db["special"],)).fetchall()
    con.close()
    assert rows == [(2.0, 0), (0.0, 1), (SQL_INF, 0), (-SQL_INF, 0), (1.0, 0)]
    log = load(db["db"], run=db["special"])
    loss = log.steps["loss"].to_numpy()
    assert loss[0] == 2.0 and math.isnan(loss[1]) and loss[2] == math.inf and loss[3] == -math.inf and loss[4] == 1.0
    assert log.steps["loss_nonfinite"].tolist() == [False, True, True, True, False]
    assert log.meta["names"]["columns"]["eval_loss"] == "eval/loss"


def test_healthy_run_silent_and_nan_run_diagnosed(db) -> None:
    healthy = load(db["db"], run="healthy")
    assert healthy.source["run"] == db["healthy"] and healthy.n_steps == 40
    assert healthy.meta["names"]["columns"]["loss"] == "train/loss"
    assert healthy.meta["mlflow"]["store"] == "sqlite" and healthy.meta["optimizers"][0]["class"] == "SGD"
    rep = gradprobe.analyze(healthy)
    assert not rep.errors and not rep.warnings, [(f.code, f.message) for f in rep.findings]
    nan = gradprobe.analyze(load(db["db"], run=db["nan"]))
    assert "GP401" in [f.code for f in nan.findings]


def test_the_same_runs_as_the_file_store(db) -> None:
    logs = load_runs(db["db"])
    assert {log.source["run"] for log in logs} == {db["healthy"], db["nan"], db["special"]}
    chosen = load(db["db"])
    assert chosen.source["run"] == db["healthy"] and "2 other MLflow run(s)" in " ".join(chosen.source["skipped"])


def test_cli_reports_each_run(db) -> None:
    r = analyze(db["db"], "--format", "json")
    assert r.returncode == 1, r.stderr
    reports = json.loads(r.stdout)
    assert sorted(rep["source"]["run"] for rep in reports) == sorted([db["healthy"], db["nan"], db["special"]])
    assert all(rep["source"]["kind"] == "mlflow" for rep in reports)


def test_a_damaged_database_is_one_line_or_partial(db, tmp_path) -> None:
    data = open(db["db"], "rb").read()
    cut = tmp_path / "cut" / "mlflow.db"
    cut.parent.mkdir()
    for frac in (0.02, 0.3, 0.7):
        cut.write_bytes(data[: int(len(data) * frac)])
        r = analyze(str(cut), "--format", "json")
        if r.returncode == 2:
            assert_clean_exit_2(r, str(cut))
        else:
            assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    garbage = tmp_path / "g.db"
    garbage.write_bytes(data[:100] + b"\x00\xff" * 5000)
    assert_clean_exit_2(analyze(str(garbage)), "g.db")
    plain = tmp_path / "plain.db"
    con = sqlite3.connect(plain)
    con.execute("CREATE TABLE t (a INTEGER)")
    con.commit()
    con.close()
    assert_clean_exit_2(analyze(str(plain)), "without MLflow's tables")
    copy = tmp_path / "copy" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(db["db"], copy)
    con = sqlite3.connect(copy)
    con.execute("UPDATE metrics SET value = 'x' WHERE key = 'train/loss' AND step < 5")
    con.commit()
    con.close()
    log = load(str(copy), run="healthy")
    assert np.isnan(log.steps["loss"].to_numpy()[:5]).all() or log.steps["step"].iloc[0] == 5
    assert any("without a numeric value" in s for s in log.source["skipped"])
