"""``gradprobe.integrations.lightning.GradprobeCallback`` on real Lightning fits (CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("lightning")

import gradprobe  # noqa: E402
from gradprobe.integrations.lightning import GradprobeCallback  # noqa: E402
from gradprobe.readers import load  # noqa: E402
from tests.integrations.tiny import lightning_tiny_run, metrics_csv  # noqa: E402

pytestmark = pytest.mark.slow

PARAMS = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
STEPS = 4 * 8  # 4 epochs of 256 samples in batches of 32


def test_callback_records_the_fit(tmp_path) -> None:
    cb = GradprobeCallback(logdir=str(tmp_path / "gp"))
    lightning_tiny_run(str(tmp_path), optimizer="Adam", lr=0.01, callbacks=[cb], gradient_clip_val=5.0)
    assert cb.logdir == str(tmp_path / "gp")
    log = gradprobe.RunLog.load(cb.logdir)
    st = log.steps[log.steps["optimizer_steps"] > 0]  # the final validation may add an eval-only step
    assert len(st) == STEPS and st["step"].tolist() == list(range(STEPS))
    assert log.meta["optimizers"][0]["class"] == "Adam"
    assert log.meta["optimizers"][0]["param_groups"][0]["lr"] == 0.01
    assert log.layer_names == PARAMS
    assert log.meta["models"][0]["class"] == "Regressor"
    assert (st["clip_max_norm"] == 5.0).all() and (st["clip_calls"] == 1).all()
    # the same numbers Lightning logged itself: its loss, and grad_norm() before clipping
    csv_log = load(metrics_csv(str(tmp_path))).steps.set_index("step")
    np.testing.assert_allclose(st["loss"], csv_log.loc[st["step"], "loss"], rtol=1e-5)
    np.testing.assert_allclose(st["grad_norm"], csv_log.loc[st["step"], "grad_norm"], rtol=1e-4)
    report = cb.report()
    assert report.source["kind"] == "gradprobe" and report.source["steps"] >= STEPS
    assert not report.errors and not report.warnings, [f.code for f in report.findings]
    assert report.summary["optimizer"] == "Adam"


def test_default_logdir_and_a_second_fit(tmp_path) -> None:
    cb = GradprobeCallback(profile="light")
    lightning_tiny_run(str(tmp_path), callbacks=[cb], max_epochs=1, csv=False, validate=False)
    first = cb.logdir
    assert first == os.path.join(str(tmp_path), "gradprobe")
    lightning_tiny_run(str(tmp_path), callbacks=[cb], max_epochs=1, csv=False, validate=False)
    assert cb.logdir == first + "-2"
    assert gradprobe.RunLog.load(first).n_steps == 8
    assert gradprobe.RunLog.load(cb.logdir).n_steps == 8


def test_precision_plugin_scaler_is_watched(tmp_path) -> None:
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cb = GradprobeCallback(logdir=str(tmp_path / "gp"))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    lightning_tiny_run(str(tmp_path), callbacks=[cb], max_epochs=1, plugins=[plugin], csv=False, validate=False)
    log = gradprobe.RunLog.load(cb.logdir)
    assert log.meta["scalers"] and log.meta["scalers"][0]["init_scale"] == 2.0**10
    assert np.isfinite(log.steps["scale"]).all()
    assert log.n_steps == 8


def test_exception_is_recorded_and_the_probe_closed(tmp_path) -> None:
    cb = GradprobeCallback(logdir=str(tmp_path / "gp"))
    with pytest.raises(RuntimeError, match="boom"):
        lightning_tiny_run(str(tmp_path), callbacks=[cb], fail_at_step=3, csv=False, validate=False)
    log = gradprobe.RunLog.load(cb.logdir)
    assert log.n_steps == 3
    exc = log.events_of("exception")
    assert exc and "boom" in str(exc[0])
    assert cb.report().source["steps"] == 3
