"""TensorBoard reader on logs written by TensorBoard's own writer (torch's SummaryWriter)."""

from __future__ import annotations

import glob
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import gradprobe
from gradprobe.readers import detect, load
from gradprobe.readers.tensorboard import framed_records, read_tensorboard
from gradprobe.runlog import LogError
from tests.readers.writers import hf_style, write_run


def test_hf_style_tags(tmp_path) -> None:
    d = str(tmp_path / "runs" / "Nov21_vm")
    write_run(d, hf_style())
    log = load(str(tmp_path))
    assert log.source["kind"] == "tensorboard"
    assert log.source["run"] == os.path.join("runs", "Nov21_vm")
    st = log.steps
    assert st["step"].tolist() == list(range(1, 21))
    np.testing.assert_allclose(st["loss"], [4.0 - 0.05 * s for s in range(1, 21)], rtol=1e-6)
    np.testing.assert_allclose(st["grad_norm"], [0.5 + 0.01 * s for s in range(1, 21)], rtol=1e-6)
    np.testing.assert_allclose(st["lr"], [1e-3 * (1 - s / 21) for s in range(1, 21)], rtol=1e-6)
    ev = st.set_index("step")["eval_loss"]
    np.testing.assert_allclose(ev.loc[[5, 10, 15, 20]], [4.1 - 0.05 * s for s in (5, 10, 15, 20)], rtol=1e-6)
    assert ev.drop([5, 10, 15, 20]).isna().all()
    assert set(log.meta["signals"]) == {"loss", "grad_norm", "lr", "eval_loss", "duplicates"}
    names = log.meta["names"]
    assert names["columns"]["loss"] == "train/loss"
    assert "train/train_loss" in names["not_mapped"]  # the whole-run mean is not a step's loss
    assert log.meta["raw_records"]["loss"]["epoch"][:2] == [0.125, 0.25]
    assert log.meta["duplicates"] == {}
    assert not log.steps["skipped"].any()


def test_event_file_path_and_detection(tmp_path) -> None:
    f = write_run(str(tmp_path / "r"), hf_style(8))
    assert detect(f) == "tensorboard"
    log = load(f)
    assert log.source["kind"] == "tensorboard" and log.n_steps == 8
    # a file named otherwise is still recognised by its first record
    other = tmp_path / "renamed.bin"
    shutil.copy(f, other)
    assert detect(str(other)) == "tensorboard"


def test_several_runs_pick_the_one_with_most_steps(tmp_path) -> None:
    write_run(str(tmp_path / "lightning_logs" / "version_0"), {"train_loss": [(s, 1.0) for s in range(10)]})
    write_run(str(tmp_path / "lightning_logs" / "version_1"), {"train_loss": [(s, 2.0) for s in range(25)]})
    write_run(str(tmp_path / "lightning_logs" / "version_2"), {"train_loss": [(s, 3.0) for s in range(5)]})
    log = load(str(tmp_path))
    assert log.n_steps == 25
    assert log.source["run"] == os.path.join("lightning_logs", "version_1")
    assert (log.steps["loss"] == 2.0).all()
    note = " ".join(log.source["skipped"])
    assert "2 other run(s)" in note and "version_0 (10 steps)" in note and "not merged" in note
    other = {r["run"]: r["steps"] for r in log.meta["tensorboard"]["other_runs"]}
    assert other == {os.path.join("lightning_logs", "version_0"): 10, os.path.join("lightning_logs", "version_2"): 5}


def test_files_of_one_run_are_merged_and_duplicates_kept(tmp_path) -> None:
    d = str(tmp_path / "run")
    first = write_run(d, {"loss": [(s, 1.0) for s in range(10)]})
    time.sleep(1.1)  # event file names carry the creation second
    second = write_run(d, {"loss": [(s, 2.0) for s in range(5, 15)]}, suffix=".resumed")
    assert first != second
    log = load(d)
    assert log.steps["step"].tolist() == list(range(15))
    # the last record written wins
    assert log.steps.set_index("step")["loss"].loc[5:].eq(2.0).all()
    raw = log.meta["raw_records"]["loss"]
    assert raw["step"] == list(range(10)) + list(range(5, 15))
    assert set(raw["origin"]) == {os.path.basename(first), os.path.basename(second)}
    dup = log.meta["duplicates"]["loss"]
    assert dup["duplicated_steps"] == 5 and dup["extra_records"] == 5 and dup["records"] == 20
    assert dup["examples"][0] == [5, 2]
    assert len(dup["origins"]) == 2


def test_add_scalars_children_belong_to_their_run(tmp_path) -> None:
    d = str(tmp_path / "exp")
    w = SummaryWriter(log_dir=d)
    for s in range(12):
        w.add_scalars("loss", {"train": 1.0 / (s + 1), "val": 1.5 / (s + 1)}, s)
        w.add_scalar("lr", 0.1, s)
    w.close()
    log = load(str(tmp_path))
    assert log.source.get("run") == "exp"
    assert log.meta["names"]["columns"]["loss"] == "loss_train"
    assert log.meta["names"]["columns"]["eval_loss"] == "loss_val"
    np.testing.assert_allclose(log.steps["eval_loss"], [1.5 / (s + 1) for s in range(12)], rtol=1e-6)
    assert not log.source["skipped"]


def test_truncated_event_file_reads_what_is_readable(tmp_path) -> None:
    f = write_run(str(tmp_path / "r"), {"train/loss": [(s, float(s)) for s in range(50)]})
    n, tail = framed_records(f)
    assert tail == 0 and n == 51  # file_version + 50 scalars
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 7)
    log = load(f)
    assert log.n_steps == 49
    assert any("truncated or corrupt after 50 records" in s for s in log.source["skipped"])


def test_corrupt_record_stops_there_and_says_so(tmp_path) -> None:
    f = write_run(str(tmp_path / "r"), {"train/loss": [(s, float(s)) for s in range(40)]})
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside a record: its CRC no longer matches
    open(f, "wb").write(bytes(data))
    log = load(str(tmp_path / "r"))
    assert 0 < log.n_steps < 40
    assert any("truncated or corrupt" in s for s in log.source["skipped"])


def test_nonfinite_values_and_loss_scale(tmp_path) -> None:
    loss = [(s, 1.0) for s in range(10)]
    loss[6] = (6, float("nan"))
    gn = [(s, 2.0) for s in range(10)]
    gn[3] = (3, float("inf"))
    scale = [(s, 65536.0 if s < 3 else 32768.0) for s in range(10)]
    write_run(str(tmp_path), {"loss": loss, "grad_norm": gn, "loss_scale": scale})
    log = load(str(tmp_path))
    st = log.steps.set_index("step")
    assert st.loc[6, "loss_nonfinite"] and not st.drop(6)["loss_nonfinite"].any()
    assert math.isinf(st.loc[3, "grad_norm"]) and st.loc[3, "grad_nonfinite_layers"] == 1
    # a logged scale below the previous one is a skipped step (the scaler backs off on skips)
    assert st["skipped"].tolist() == [s == 3 for s in range(10)]
    assert "loss_scale" in log.meta["signals"]
    assert log.meta["skipped_inferred"]["from_scale"] == 1


def test_only_unmapped_or_non_scalar_data_is_a_clear_error(tmp_path) -> None:
    write_run(str(tmp_path / "a"), {"accuracy": [(s, 0.5) for s in range(5)]})
    with pytest.raises(LogError, match=r"no recognised metric.*accuracy.*GRADPROBE_TAG_MAP"):
        load(str(tmp_path / "a"))
    w = SummaryWriter(log_dir=str(tmp_path / "t"))
    w.add_text("notes", "hello", 0)
    w.close()
    with pytest.raises(LogError, match="without scalars"):
        load(str(tmp_path / "t"))


def test_registered_tag_makes_a_custom_log_readable(tmp_path) -> None:
    write_run(str(tmp_path), {"objective/total": [(s, 1.0 / (s + 1)) for s in range(6)]})
    rule = gradprobe.readers.register_tag(r"objective/total", "loss")
    try:
        log = load(str(tmp_path))
    finally:
        gradprobe.readers.unregister_tag(rule)
    assert log.n_steps == 6 and log.meta["names"]["columns"]["loss"] == "objective/total"


def test_garbage_event_file_is_a_clear_error(tmp_path) -> None:
    f = tmp_path / "events.out.tfevents.123.host"
    f.write_bytes(b"this is not a record file at all" * 10)
    with pytest.raises(LogError, match="not a readable TensorBoard event file"):
        load(str(f))
    empty = tmp_path / "e" / "events.out.tfevents.1.x"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(LogError, match="empty file"):
        load(str(empty))
    with pytest.raises(LogError, match="no TensorBoard event files"):
        read_tensorboard(str(empty.parent))


def _tiny_watched_run(logdir: str, steps: int = 12) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with gradprobe.watch(model, opt, logdir=logdir, profile="light"):
        for _ in range(steps):
            x = torch.randn(16, 4, generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()


def test_gradprobe_run_inside_a_log_directory_goes_to_the_gradprobe_reader(tmp_path) -> None:
    _tiny_watched_run(str(tmp_path / "runs" / "exp1"))
    write_run(str(tmp_path / "runs" / "other"), {"loss": [(s, 1.0) for s in range(3)]})
    log = load(str(tmp_path / "runs"))
    assert log.source["kind"] == "gradprobe"
    assert log.source["run"] == "exp1"
    assert log.n_steps == 12
    assert any("other (3 steps)" in s for s in log.source["skipped"])


def test_gradprobe_dashboard_tags_read_back(tmp_path) -> None:
    run = str(tmp_path / "run")
    _tiny_watched_run(run)
    native = gradprobe.RunLog.load(run)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in glob.glob(os.path.join(run, "*tfevents*")):
        shutil.copy(f, copy)
    log = load(str(copy))
    assert log.source["kind"] == "tensorboard"
    for col in ("loss", "grad_norm", "step_grad_norm", "clip_max_norm", "lr"):
        np.testing.assert_allclose(log.steps[col], native.steps[col], rtol=1e-6, err_msg=col)
    assert (log.steps["clip_calls"] == 1).all()
    assert {"loss", "grad_norm", "lr", "clip", "layer_grad"} <= set(log.meta["signals"])
