"""No-grad loss streams, one per call site of the loss: the recorder keeps them apart, the
analysis reads each, and GP506 (overfitting) sees a validation loss rising in a plain script
that also evaluates the training set without grad.

Real PyTorch training in every recorder test (tiny models, CPU, about a second each)."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import gradprobe
from gradprobe.analysis import RunContext, eval_curves
from gradprobe.probe import forward as forward_mod
from gradprobe.runlog import schema as S

HERE = os.path.basename(__file__)


def _codes(report, severities=("warning", "error")):
    return [(f.code, f.message) for f in report.findings if f.severity in severities]


def _noisy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 5, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.5 * torch.randn(n, 1, generator=g)
    return x, y


def _train_and_evaluate(logdir: str, n_train: int, width: int, epochs: int, weight_decay: float = 0.0,
                        lr: float = 1e-3) -> tuple[list[float], list[float]]:
    """The loop of the calibration corpus's overfitting program: mini-batch training, then
    each epoch the training-set loss and the validation loss computed under ``no_grad`` with
    the same criterion, from two lines (as most hand-written loops print them)."""
    torch.manual_seed(54)
    x_train, y_train = _noisy_data(n_train, 1)
    x_val, y_val = _noisy_data(400, 2)
    model = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = nn.MSELoss()
    batch = n_train // 3
    train_curve, val_curve = [], []
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(n_train)
            for i in range(0, n_train, batch):
                idx = perm[i:i + batch]
                opt.zero_grad()
                criterion(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                train_loss = criterion(model(x_train), y_train).item()
                val_loss = criterion(model(x_val), y_val).item()
            train_curve.append(train_loss)
            val_curve.append(val_loss)
    return train_curve, val_curve


# ------------------------------------------------------------------------ the recorder ------
def test_two_call_sites_are_two_streams_and_the_column_is_the_first(logdir):
    def evaluate(model, x, y):
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    torch.manual_seed(0)
    x, y = _noisy_data(60, 1)
    xv, yv = _noisy_data(200, 2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(8):
            for i in range(0, 60, 20):
                opt.zero_grad()
                nn.functional.mse_loss(model(x[i:i + 20]), y[i:i + 20]).backward()
                opt.step()
            a = evaluate(model, x, y)    # the training set
            b = evaluate(model, xv, yv)  # the validation set: same function, another line
            seen.append((a, b))
    log = gradprobe.RunLog.load(logdir)
    streams = log.meta["eval_streams"]
    assert [s["name"] for s in streams] == ["eval_loss/0", "eval_loss/1"]
    inner = streams[0]["site"][0]
    assert inner == streams[1]["site"][0] and inner.endswith(f"{HERE}:{evaluate.__code__.co_firstlineno + 2}")
    assert streams[0]["site"][1] != streams[1]["site"][1]  # the two calling lines
    assert all(HERE in frame for frame in streams[0]["site"][:2])
    # stream 0 is the eval_loss column, stream 1 a scalar: each holds its own values (no mean)
    col = log.steps["eval_loss"].dropna().to_numpy(dtype=np.float64)
    val = log.scalar("eval_loss/1").to_numpy(dtype=np.float64)
    assert len(col) == len(val) == 8
    np.testing.assert_allclose(col, [a for a, _ in seen], rtol=1e-6)
    np.testing.assert_allclose(val, [b for _, b in seen], rtol=1e-6)
    ctx = RunContext(log)
    assert [s.name for s in ctx.eval_streams] == ["eval_loss/0", "eval_loss/1"]
    # the validation set ends farther above the training loss: it is the run's eval loss
    assert ctx.validation_stream.name == "eval_loss/1"
    np.testing.assert_allclose(ctx.eval_loss.to_numpy(), val)
    assert ctx.validation_stream.where.startswith(f"{HERE}:")


def test_a_validation_loader_loop_at_one_line_is_one_stream_averaged_over_its_batches(logdir):
    torch.manual_seed(0)
    x, y = _noisy_data(96, 1)
    xv, yv = _noisy_data(90, 2)
    val_loader = DataLoader(TensorDataset(xv, yv), batch_size=20)  # 5 batches, the last one short
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    expected = []
    # profile "full": every step sampled, so the deep probes' hooks come and go around the
    # evaluations; the call site must not depend on them
    with gradprobe.watch(model, opt, logdir=logdir, profile="full"):
        for _ in range(6):
            for xb, yb in DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True):
                opt.zero_grad()
                criterion(model(xb), yb).backward()
                opt.step()
            losses = []
            with torch.no_grad():
                for xb, yb in val_loader:
                    losses.append(criterion(model(xb), yb).item())
            expected.append(sum(losses) / len(losses))
    log = gradprobe.RunLog.load(logdir)
    assert len(log.meta["eval_streams"]) == 1
    col = log.steps["eval_loss"].dropna().to_numpy(dtype=np.float64)
    np.testing.assert_allclose(col, expected, rtol=1e-6)
    assert not any(str(n).startswith(S.EVAL_STREAM_PREFIX) for n in log.scalars["name"].astype(str))
    assert len(eval_curves(RunContext(log))) == 1


def test_only_no_grad_loss_calls_walk_the_stack(logdir, monkeypatch):
    calls = []
    original = forward_mod.ForwardHooks.eval_stream

    def counted(self):
        calls.append(torch.is_grad_enabled())
        return original(self)

    monkeypatch.setattr(forward_mod.ForwardHooks, "eval_stream", counted)
    x, y = _noisy_data(40, 1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(20):  # training only: the frame walk never runs
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert calls == []
        with torch.no_grad():
            nn.functional.mse_loss(model(x), y)
        assert calls == [False]


def test_evaluations_after_the_last_written_step_keep_their_streams(logdir):
    torch.manual_seed(0)
    x, y = _noisy_data(40, 1)
    xv, yv = _noisy_data(40, 2)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # flush_seconds=0: every closed step is handed to the writer at once, so the evaluations
    # after the last step find it already written and become scalars of that step
    with gradprobe.watch(model, opt, logdir=logdir, flush_seconds=0.0):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            a = nn.functional.mse_loss(model(x), y).item()
            b = nn.functional.mse_loss(model(xv), yv).item()
    log = gradprobe.RunLog.load(logdir)
    assert log.scalar("eval_loss/0").to_numpy() == pytest.approx([a], rel=1e-6)
    assert log.scalar("eval_loss/1").to_numpy() == pytest.approx([b], rel=1e-6)
    ctx = RunContext(log)
    assert [s.series.to_numpy().tolist() for s in ctx.eval_streams] == [pytest.approx([a], rel=1e-6),
                                                                       pytest.approx([b], rel=1e-6)]
    assert int(ctx.eval_streams[0].series.index[0]) == log.n_steps - 1


def test_more_call_sites_than_kept_join_the_last_stream(logdir, monkeypatch):
    monkeypatch.setattr(forward_mod, "MAX_EVAL_STREAMS", 2)
    x, y = _noisy_data(20, 1)
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            nn.functional.mse_loss(model(x), y)
            nn.functional.l1_loss(model(x), y)
            nn.functional.smooth_l1_loss(model(x), y)
    log = gradprobe.RunLog.load(logdir)
    streams = log.meta["eval_streams"]
    assert [s["name"] for s in streams] == ["eval_loss/0", "eval_loss/1"]
    assert streams[1]["site"][-1] == forward_mod.FURTHER_SITES


# ----------------------------------------------------------------------------- GP506 --------
def test_gp506_fires_when_validation_rises_while_the_training_set_evaluation_falls(logdir):
    train_curve, val_curve = _train_and_evaluate(logdir, n_train=48, width=256, epochs=70)
    # the run does overfit, and the mean of the two no-grad losses (what one stream was) falls
    assert val_curve[-1] > 1.3 * min(val_curve) and train_curve[-1] < 0.2 * train_curve[0]
    mean = (np.asarray(train_curve) + np.asarray(val_curve)) / 2
    assert mean[-1] < mean[len(mean) // 4]
    report = gradprobe.analyze(logdir)
    found = [f for f in report.findings if f.code == "GP506"]
    assert len(found) == 1, _codes(report)
    f = found[0]
    assert f.severity == "warning"
    assert f.evidence["val_rise"] > 0.1 and f.evidence["train_fall"] > 0.5
    assert f.evidence["final_val_loss"] == pytest.approx(float(np.median(val_curve[-3:])), rel=0.05)
    src, first = inspect.getsourcelines(_train_and_evaluate)
    val_line = first + next(i for i, line in enumerate(src) if "val_loss = criterion" in line)
    assert f.evidence["val_site"].startswith(f"{HERE}:{val_line} <- ")  # the validation line, not the training-set one
    assert f"computed without grad at {HERE}:{val_line}" in f.message


def test_gp506_silent_on_a_healthy_run_evaluating_train_and_val_each_epoch(logdir):
    # plenty of data for a small model, weight decay: both curves fall and level off together
    _, val_curve = _train_and_evaluate(logdir, n_train=600, width=32, epochs=40, weight_decay=1e-3,
                                                 lr=3e-3)
    assert val_curve[-1] <= min(val_curve) * 1.05 and val_curve[-1] < 0.6 * val_curve[0]
    log = gradprobe.RunLog.load(logdir)
    assert len(log.meta["eval_streams"]) == 2
    report = gradprobe.analyze(log)
    assert not [c for c in _codes(report) if c[0] == "GP506"], _codes(report)
    assert not _codes(report), _codes(report)


OVERFIT_SCRIPT = """
import torch
import torch.nn as nn

torch.manual_seed(54)


def make(n):
    x = torch.rand(n, 5) * 2 - 1
    return x, torch.sin(3 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.5 * torch.randn(n, 1)


def evaluate(model, x, y):
    with torch.no_grad():
        return criterion(model(x), y).item()


x_train, y_train = make(48)
x_val, y_val = make(400)
model = nn.Sequential(nn.Linear(5, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.MSELoss()
for epoch in range(70):
    perm = torch.randperm(48)
    for i in range(0, 48, 16):
        idx = perm[i:i + 16]
        optimizer.zero_grad()
        criterion(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
    train_loss = evaluate(model, x_train, y_train)
    val_loss = evaluate(model, x_val, y_val)
print(f"train {train_loss:.4f} val {val_loss:.4f}")
"""


def test_gradprobe_run_names_the_validation_line_of_a_plain_script(tmp_path):
    """``gradprobe run`` on a script whose one ``evaluate`` function computes the training-set
    and the validation loss from two lines: two streams, each call chain ending at the script
    (not in the launcher below it), and GP506 in the report, at the validation line."""
    script = tmp_path / "overfit.py"
    script.write_text(textwrap.dedent(OVERFIT_SCRIPT).lstrip())
    lines = script.read_text().splitlines()
    inner = 1 + next(i for i, line in enumerate(lines) if "return criterion" in line)
    val = 1 + next(i for i, line in enumerate(lines) if "val_loss = evaluate" in line)
    train = 1 + next(i for i, line in enumerate(lines) if "train_loss = evaluate" in line)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gradprobe", "run", "--logdir", "run", "--format", "json",
                           "--output", "report.json", "overfit.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = gradprobe.RunLog.load(tmp_path / "run")
    sites = [s["site"] for s in log.meta["eval_streams"]]
    assert sites == [[f"{script}:{inner}", f"{script}:{train}"], [f"{script}:{inner}", f"{script}:{val}"]]
    report = json.loads((tmp_path / "report.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GP506"]
    assert len(found) == 1, [(f["code"], f["message"]) for f in report["findings"]]
    assert found[0]["evidence"]["val_site"] == f"overfit.py:{inner} <- overfit.py:{val}"


@pytest.mark.slow
def test_a_lightning_sanity_check_and_the_validation_loop_are_one_stream(tmp_path):
    """Lightning reaches ``validation_step`` through one path for its sanity check and another
    for the validation proper: the trainer's frames are not the call site, the user's are."""
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from gradprobe.integrations.lightning import GradprobeCallback
    from tests.integrations.tiny import lightning_module, regression_loader

    pl.seed_everything(0, verbose=False)
    cb = GradprobeCallback(logdir=str(tmp_path / "gp"))
    trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=2)
    trainer.fit(lightning_module(), regression_loader(), regression_loader(64, seed=1))
    log = gradprobe.RunLog.load(cb.logdir)
    streams = log.meta["eval_streams"]
    assert len(streams) == 1 and os.path.join("integrations", "tiny.py:") in streams[0]["site"][0]  # validation_step
    assert all("site-packages" not in frame for frame in streams[0]["site"])
    assert log.steps["eval_loss"].notna().sum() == 4  # the sanity check, then 3 epochs
    assert not [n for n in log.scalars["name"].astype(str) if n.startswith(S.EVAL_STREAM_PREFIX)]


# ------------------------------------------------------------------ the analysis alone ------
def _streams_log(train_eval: np.ndarray, val: np.ndarray, user_val: np.ndarray | None = None,
                 listed: bool = True) -> gradprobe.RunLog:
    """A recorder log of 400 steps, evaluated every 20: stream 0 in the column, stream 1 a scalar."""
    n = 400
    steps = np.arange(n)
    loss = 0.02 + 1.0 * np.exp(-steps / 60.0)
    col = np.full(n, np.nan)
    eval_steps = np.arange(19, n, 20)
    col[eval_steps] = train_eval
    scalars = [(int(s), "eval_loss/1", float(v)) for s, v in zip(eval_steps, val)]
    if user_val is not None:
        scalars += [(int(s), "val_loss", float(v)) for s, v in zip(eval_steps, user_val)]
    meta = {"eval_streams": [{"name": "eval_loss/0", "site": ["/w/train.py:40", "/w/train.py:61"]},
                             {"name": "eval_loss/1", "site": ["/w/train.py:40", "/w/train.py:62"]}]} if listed else {}
    return gradprobe.RunLog.build({"step": steps, "loss": loss, "eval_loss": col}, scalars=scalars, meta=meta)


def _curves(k: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.arange(k)
    train_eval = 0.02 + 0.9 * np.exp(-t / 3.0)  # falls with the training loss
    rising = 0.5 + 0.02 * np.maximum(t - 4, 0) + 0.2 * np.exp(-t / 2.0)  # minimum early, then up 60%
    flat = 0.45 + 0.2 * np.exp(-t / 3.0)
    return train_eval, rising, flat


def test_gp506_reads_every_stream_of_the_recorder():
    train_eval, rising, flat = _curves()
    log = _streams_log(train_eval, rising)
    ctx = RunContext(log)
    assert [w for w, _ in eval_curves(ctx)] == ["train.py:40 <- train.py:62", "train.py:40 <- train.py:61"]
    f = [f for f in gradprobe.analyze(log).findings if f.code == "GP506"]
    assert len(f) == 1 and f[0].evidence["val_site"] == "train.py:40 <- train.py:62"
    # the training-set stream falling alone says nothing
    assert not [f for f in gradprobe.analyze(_streams_log(train_eval, flat)).findings if f.code == "GP506"]
    # the rising stream is found whichever stream is taken as the run's eval loss: here a
    # logged val_loss that does not rise comes first
    log = _streams_log(train_eval, rising, user_val=flat)
    ctx = RunContext(log)
    np.testing.assert_allclose(ctx.eval_loss.to_numpy(), flat)
    assert len(eval_curves(ctx)) == 3
    f = [f for f in gradprobe.analyze(log).findings if f.code == "GP506"]
    assert len(f) == 1 and f[0].evidence["val_site"] == "train.py:40 <- train.py:62"


def test_a_log_that_lists_no_streams_reads_as_before():
    train_eval, _, flat = _curves()
    # no eval_streams in the metadata (an earlier recorder, a reader): the scalar is a user
    # scalar named like a validation loss, the column is not read beside it
    ctx = RunContext(_streams_log(train_eval, flat, listed=False))
    assert len(eval_curves(ctx)) == 1
    np.testing.assert_allclose(ctx.eval_loss.to_numpy(), flat)
    foreign = gradprobe.RunLog.build({"step": np.arange(50), "loss": np.linspace(1, 0.1, 50),
                                      "eval_loss": np.where(np.arange(50) % 10 == 9, 0.5, np.nan)}, kind="hf")
    ctx = RunContext(foreign)
    assert [s.name for s in ctx.eval_streams] == ["eval_loss"] and ctx.eval_streams[0].site == ()
    assert len(ctx.eval_loss) == 5 and [w for w, _ in eval_curves(ctx)] == [""]


def test_a_non_finite_evaluation_makes_its_stream_the_eval_loss():
    _, rising, flat = _curves()
    bad = flat.copy()
    bad[-2] = math.inf  # (a NaN in the column reads as "no evaluation", as it always has)
    ctx = RunContext(_streams_log(bad, rising))
    assert ctx.validation_stream.name == "eval_loss/0"


def test_eval_streams_of_the_wrong_shape_are_dropped_on_load(tmp_path):
    train_eval, rising, _ = _curves()
    log = _streams_log(train_eval, rising)
    log.meta["eval_streams"] = [{"name": 3, "site": "x"}, {"name": "eval_loss/1", "site": ["a.py:1", 7]}, "junk"]
    log.save(tmp_path / "run")
    back = gradprobe.RunLog.load(tmp_path / "run")
    assert back.meta["eval_streams"] == [{}, {"name": "eval_loss/1", "site": ["a.py:1"]}]
    assert any("eval_streams" in s for s in back.source["skipped"])
    ctx = RunContext(back)
    assert [s.name for s in ctx.eval_streams] == ["eval_loss/1"]
    assert isinstance(ctx.eval_loss, pd.Series) and len(ctx.eval_loss) == len(rising)
