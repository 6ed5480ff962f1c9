"""Readers on logs written by real tiny Hugging Face and Lightning runs, and what the rules
make of them: a healthy run has no error or warning, an absurd learning rate is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe.readers import load
from tests.integrations.tiny import hf_tiny_run, lightning_tiny_run, metrics_csv

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: findings that name an absurd learning rate or what it does to a run: exploding-gradients,
#: nonfinite-loss/-gradients/-parameters, lr-too-high
DIVERGENCE_RULES = {"GP202", "GP401", "GP402", "GP403", "GP501"}


def _codes(report) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(f.code, f.severity) for f in report.findings]


def _cli(path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRADPROBE_TAG_MAP", None)
    return subprocess.run([sys.executable, "-m", "gradprobe", "analyze", path, "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)


# ---- Hugging Face ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_healthy(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "out")
    trainer = hf_tiny_run(out, lr=1e-3, max_steps=40, report_to=["tensorboard"], eval_steps=10)
    return out, trainer


@pytest.fixture(scope="module")
def hf_absurd(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_absurd") / "out")
    trainer = hf_tiny_run(out, lr=10.0, max_steps=40, eval_steps=10)
    return out, trainer


def test_hf_trainer_state_matches_the_trainer(hf_healthy) -> None:
    out, trainer = hf_healthy
    log = load(os.path.join(out, "trainer_state.json"))
    assert log.source["kind"] == "hf-trainer-state"
    train = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    st = log.steps.set_index("step")
    assert st.index.tolist() == [h["step"] for h in train] == list(range(1, 41))
    np.testing.assert_allclose(st.loc[[h["step"] for h in train], "loss"], [h["loss"] for h in train], rtol=1e-6)
    np.testing.assert_allclose(st.loc[[h["step"] for h in train], "grad_norm"], [h["grad_norm"] for h in train], rtol=1e-6)
    np.testing.assert_allclose(st.loc[[h["step"] for h in train], "lr"], [h["learning_rate"] for h in train], rtol=1e-6)
    np.testing.assert_allclose(st.loc[[h["step"] for h in evals], "eval_loss"], [h["eval_loss"] for h in evals], rtol=1e-6)
    assert log.meta["hf"]["global_step"] == 40 and log.meta["hf"]["summary"]["train_loss"] > 0


def test_hf_tensorboard_log_reads_the_same(hf_healthy) -> None:
    out, _ = hf_healthy
    tb = load(os.path.join(out, "runs"))  # runs/<date>_<host>: the TensorBoardCallback events
    assert tb.source["kind"] == "tensorboard" and tb.source["run"] != "."
    js = load(os.path.join(out, "trainer_state.json"))
    for col in ("loss", "grad_norm", "lr", "eval_loss"):
        np.testing.assert_allclose(tb.steps[col], js.steps[col], rtol=1e-6, err_msg=col)  # float32 in both


def test_hf_healthy_run_has_no_error_or_warning(hf_healthy) -> None:
    out, _ = hf_healthy
    report = gradprobe.analyze(os.path.join(out, "trainer_state.json"))
    assert not report.errors and not report.warnings, _codes(report)
    r = _cli(os.path.join(out, "trainer_state.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["kind"] == "hf-trainer-state"


def test_hf_absurd_lr_is_caught(hf_absurd) -> None:
    out, _ = hf_absurd
    report = gradprobe.analyze(os.path.join(out, "trainer_state.json"))
    hits = [f for f in report.findings if f.code in DIVERGENCE_RULES and f.severity in ("error", "warning")]
    assert hits, _codes(report)


# ---- Lightning ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pl_healthy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pl"))
    lightning_tiny_run(root, lr=0.05, max_epochs=6, tensorboard=True)
    return root


@pytest.fixture(scope="module")
def pl_absurd(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pl_absurd"))
    lightning_tiny_run(root, lr=50.0, max_epochs=3)
    return root


def test_lightning_metrics_csv(pl_healthy) -> None:
    log = load(metrics_csv(pl_healthy))
    assert log.source["kind"] == "lightning-csv" and log.source["skipped"] == []
    st = log.steps
    assert st["step"].tolist() == list(range(48))  # 6 epochs x 8 batches, log_every_n_steps=1
    assert np.isfinite(st["loss"]).all() and np.isfinite(st["grad_norm"]).all()
    assert (st["lr"] == 0.05).all()
    assert st["eval_loss"].notna().sum() == 6
    assert log.meta["optimizers"][0]["class"] == "SGD"
    assert log.layer_names == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]


def test_lightning_tensorboard_log_reads_the_same(pl_healthy) -> None:
    tb = load(os.path.join(pl_healthy, "tb"))
    csv = load(metrics_csv(pl_healthy))
    assert tb.source["kind"] == "tensorboard"
    assert tb.steps["step"].tolist() == csv.steps["step"].tolist()
    for col in ("loss", "grad_norm", "lr", "eval_loss"):
        np.testing.assert_allclose(tb.steps[col], csv.steps[col], rtol=1e-6, err_msg=col)


def test_lightning_healthy_run_has_no_error_or_warning(pl_healthy) -> None:
    report = gradprobe.analyze(os.path.dirname(metrics_csv(pl_healthy)))  # a version_N directory
    assert report.source["kind"] == "lightning-csv"
    assert not report.errors and not report.warnings, _codes(report)
    r = _cli(metrics_csv(pl_healthy))
    assert r.returncode == 0, r.stderr


def test_lightning_absurd_lr_is_caught(pl_absurd) -> None:
    report = gradprobe.analyze(metrics_csv(pl_absurd))
    hits = [f for f in report.findings if f.code in DIVERGENCE_RULES and f.severity in ("error", "warning")]
    assert hits, _codes(report)
    r = _cli(metrics_csv(pl_absurd))
    assert r.returncode == 1, r.stderr  # findings at or above --fail-on error
