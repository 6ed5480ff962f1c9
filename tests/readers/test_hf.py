"""Hugging Face ``trainer_state.json`` reader (files written with HF's own ``TrainerState``
writer when transformers is installed; the real Trainer runs are in test_frameworks.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from gradprobe.readers import detect, load
from gradprobe.runlog import LogError
from tests.readers.writers import train_history, write_state


def test_reads_train_and_eval_records(tmp_path) -> None:
    p = write_state(str(tmp_path / "trainer_state.json"), train_history(), global_step=20, max_steps=20)
    assert detect(p) == "hf-trainer-state"
    log = load(p)
    assert log.source["kind"] == "hf-trainer-state" and log.source["skipped"] == []
    st = log.steps
    assert st["step"].tolist() == list(range(1, 21))
    np.testing.assert_allclose(st["loss"], [4.0 - 0.05 * s for s in range(1, 21)])
    np.testing.assert_allclose(st["grad_norm"], [0.5 + 0.01 * s for s in range(1, 21)])
    np.testing.assert_allclose(st["lr"], [1e-3 * (1 - (s - 1) / 20) for s in range(1, 21)])
    ev = st.set_index("step")["eval_loss"].dropna()
    assert ev.index.tolist() == [5, 10, 15, 20]
    # the final summary (train_loss = whole-run mean) is metadata, not a step
    assert log.meta["hf"]["summary"]["train_loss"] == 3.6
    assert "train_loss" not in log.meta["names"]["columns"].values()
    assert log.meta["hf"]["global_step"] == 20
    assert set(log.meta["signals"]) == {"loss", "grad_norm", "lr", "eval_loss", "duplicates"}
    assert log.meta["raw_records"]["eval_loss"] == {"name": "eval_loss", "step": [5, 10, 15, 20], "epoch": [0.625, 1.25, 1.875, 2.5]}


def test_bare_nan_and_infinity(tmp_path) -> None:
    hist = train_history(10, eval_every=0, decay=False)
    hist[3]["loss"] = float("nan")
    hist[5]["grad_norm"] = float("inf")
    hist[6]["grad_norm"] = float("nan")
    p = write_state(str(tmp_path / "trainer_state.json"), hist)
    text = open(p).read()
    assert "NaN" in text and "Infinity" in text  # as Python's json writes them
    st = load(p).steps.set_index("step")
    assert st.loc[4, "loss_nonfinite"] and math.isnan(st.loc[4, "loss"])
    assert math.isinf(st.loc[6, "grad_norm"]) and math.isinf(st.loc[7, "grad_norm"])  # logged non-finite: +inf
    assert st.loc[6, "grad_nonfinite_layers"] == 1 and st.loc[7, "grad_nonfinite_layers"] == 1
    # a constant lr carries no evidence of a skipped step: nothing is inferred
    assert not st["skipped"].any()


@pytest.mark.parametrize("lr_logged_after_scheduler", [False, True])
def test_amp_skipped_steps_from_unchanged_lr(tmp_path, lr_logged_after_scheduler: bool) -> None:
    """fp16 overflow in HF: grad_norm inf/NaN, the optimizer step and the scheduler step are
    skipped, so the lr does not move across the skipped step."""
    lr, hist = 1e-3, []
    skips = {4, 9}
    for s in range(1, 16):
        used = lr
        if s not in skips:
            lr *= 0.9
        logged = lr if lr_logged_after_scheduler else used
        gn = float("inf") if s == 4 else float("nan") if s == 9 else 1.0
        hist.append({"epoch": s / 10, "grad_norm": gn, "learning_rate": logged, "loss": 2.0, "step": s})
    p = write_state(str(tmp_path / "trainer_state.json"), hist)
    log = load(p)
    st = log.steps.set_index("step")
    assert st.index[st["skipped"]].tolist() == [4, 9]
    assert log.meta["skipped_inferred"] == {"from_scale": 0, "from_lr": 2}
    assert "loss_scale" in log.meta["signals"]


def test_no_skip_inferred_when_steps_are_not_consecutive(tmp_path) -> None:
    hist = [{"grad_norm": float("inf") if s == 20 else 1.0, "learning_rate": 1e-3 * 0.9 ** (s // 10), "loss": 1.0, "step": s}
            for s in range(5, 60, 5)]
    log = load(write_state(str(tmp_path / "trainer_state.json"), hist))
    assert not log.steps["skipped"].any()


def test_duplicate_records_are_kept_for_gp701(tmp_path) -> None:
    hist = [{"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3, "step": s} for s in range(1, 11)]
    hist += [{"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3, "step": s} for s in range(6, 13)]  # a stale resume
    log = load(write_state(str(tmp_path / "trainer_state.json"), hist))
    assert log.n_steps == 12
    assert log.steps.set_index("step").loc[6, "loss"] == 2.0  # last written wins
    assert log.meta["raw_records"]["loss"]["step"] == list(range(1, 11)) + list(range(6, 13))
    dup = log.meta["duplicates"]
    assert set(dup) == {"loss", "grad_norm", "lr"}
    assert dup["loss"]["duplicated_steps"] == 5 and dup["loss"]["examples"][0] == [6, 2]


def test_truncated_inside_log_history_reads_complete_entries(tmp_path) -> None:
    p = write_state(str(tmp_path / "trainer_state.json"), train_history(20), global_step=20)
    text = open(p).read()
    cut = text.index('"step": 12') + 4
    open(p, "w").write(text[:cut])
    log = load(p)
    assert log.steps["step"].max() == 11
    assert any("truncated or corrupt JSON" in s and "complete log_history entries" in s for s in log.source["skipped"])
    assert log.meta["hf"]["global_step"] == 20


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("   \n", "empty file"),
        ('{"best_metric": null, "epoch": 1.0, "global_', "truncated or invalid JSON"),
        ('{"global_step": 3, "log_history": [\n  {"loss": 1.0, "st', "truncated or invalid JSON"),
        ('{"a": 1}', "not a Hugging Face trainer state"),
        ("[1, 2, 3]", "not a Hugging Face trainer state"),
        ('{"log_history": {"loss": 1}}', "not a Hugging Face trainer state"),
        ('{"log_history": [], "logging_steps": 500}', "without log records.*logging_steps=500"),
        ('{"log_history": [{"loss": "high", "step": 1}]}', "without log records"),
    ],
)
def test_bad_json_is_a_clear_error(tmp_path, content: str, message: str) -> None:
    p = tmp_path / "trainer_state.json"
    p.write_text(content)
    with pytest.raises(LogError, match=message) as info:
        load(str(p))
    assert "\n" not in str(info.value)


def test_binary_garbage_json(tmp_path) -> None:
    p = tmp_path / "trainer_state.json"
    p.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(LogError, match="not a Hugging Face trainer state"):
        load(str(p))


def test_entries_without_a_step_are_noted(tmp_path) -> None:
    hist = [{"loss": 1.0, "step": 1}, {"loss": 1.0}, "junk", {"loss": 0.9, "step": 2}]
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": hist}))
    log = load(str(p))
    assert log.n_steps == 2
    assert any("2 log_history entries without a numeric step" in s for s in log.source["skipped"])


def test_directory_with_checkpoints_uses_the_latest_state(tmp_path) -> None:
    out = tmp_path / "output"
    write_state(str(out / "checkpoint-10" / "trainer_state.json"), train_history(10), global_step=10)
    write_state(str(out / "checkpoint-20" / "trainer_state.json"), train_history(20), global_step=20)
    (out / "config.json").write_text("{}")
    assert detect(str(out)) == "hf-trainer-state"
    log = load(str(out))
    assert log.source["path"].endswith(os.path.join("checkpoint-20", "trainer_state.json"))
    assert log.n_steps == 20
    # a checkpoint directory itself
    assert load(str(out / "checkpoint-10")).n_steps == 10
