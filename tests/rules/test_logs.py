"""GP701 (duplicate log records): the pattern classifier on raw step sequences, synthetic
RunLogs carrying the readers' raw records, and real foreign logs (TensorBoard event files
written by torch's SummaryWriter, a trainer_state.json, a metrics.csv) read by the readers."""

from __future__ import annotations

import csv
import glob
import json
import os
import time
from typing import Any

import pytest

import gradprobe
from gradprobe.report import Finding, Report
from gradprobe.rules import get_rule
from gradprobe.rules.logs import classify


def only(report: Report, code: str = "GP701") -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code}, got {[(f.code, f.message) for f in report.findings]}"
    return found[0]


def quiet(report: Report) -> None:
    assert not [f for f in report.findings if f.code == "GP701"]
    assert not [s for s in report.skipped_rules if s.code == "GP701" and "rule error" in s.reason]


def foreign(raw: dict[str, dict[str, Any]], n: int = 20, kind: str = "tensorboard") -> gradprobe.RunLog:
    steps = sorted({s for rec in raw.values() for s in rec["step"]})
    return gradprobe.RunLog.build({"step": steps, "loss": [1.0] * len(steps)}, kind=kind,
                                  meta={"signals": ["loss", "duplicates"], "raw_records": raw})


# ================================================================== classifier ==============
def test_classify_clean_stream_is_none():
    assert classify(list(range(10))) is None


def test_classify_every_step_written_twice_in_a_row():
    c = classify([0, 0, 1, 1, 2, 2, 3, 3])
    assert c["repeated"] == 4 and c["repeat_factor"] == 2 and "restarted" not in c
    assert c["duplicated_steps"] == 4 and c["extra_records"] == 4


def test_classify_restart_from_the_first_step():
    c = classify(list(range(10)) + list(range(10)), ["a"] * 10 + ["b"] * 10)
    assert c["restarted"] == 1 and "repeated" not in c and c["origins"] == ["a", "b"]


def test_classify_range_logged_again_without_going_on_is_not_a_resume():
    c = classify(list(range(10)) + list(range(4, 10)))
    assert c["restarted"] == 1 and "resumed" not in c


def test_classify_resume_from_a_checkpoint():
    c = classify(list(range(10)) + list(range(6, 15)))
    assert c["resumed"] == 1 and c["resumes"] == [[9, 6]] and "restarted" not in c
    assert c["duplicated_steps"] == 4


# ================================================================== synthetic logs ==========
def test_gp701_several_handlers_fire_as_warning():
    raw = {"loss": {"name": "train/loss", "step": [s for s in range(20) for _ in range(4)]}}
    f = only(gradprobe.analyze(foreign(raw)))
    assert f.severity == "warning" and f.first_step == 0
    assert "appears 4 times" in f.message and f.evidence["main"] == "loss"
    assert f.confidence == pytest.approx(1.0)
    assert any("dist.get_rank() == 0" in (r.snippet or "") for r in f.recommendations)


def test_gp701_two_processes_writing_one_log_fire():
    raw = {"loss": {"name": "loss", "step": list(range(20)) * 2, "origin": ["events.1"] * 20 + ["events.2"] * 20}}
    f = only(gradprobe.analyze(foreign(raw)))
    assert f.severity == "warning" and "2 writers" in f.message and "logged again" in f.message


def test_gp701_resume_is_info_and_suggests_purge_step():
    raw = {"loss": {"name": "loss", "step": list(range(20)) + list(range(15, 30))}}
    f = only(gradprobe.analyze(foreign(raw)))
    assert f.severity == "info" and "resume" in f.message
    assert any("purge_step=15" in (r.snippet or "") for r in f.recommendations)


def test_gp701_epoch_level_stream_speaks_of_epochs():
    raw = {"eval_loss": {"name": "val_loss", "step": [0, 0, 1, 1, 2, 2], "epoch": [0, 0, 1, 1, 2, 2]}}
    f = only(gradprobe.analyze(foreign(raw)))
    assert "epochs of 'val_loss'" in f.message


def test_gp701_clean_foreign_log_is_quiet():
    quiet(gradprobe.analyze(foreign({"loss": {"name": "loss", "step": list(range(20))}})))


def test_gp701_a_final_evaluation_run_again_is_not_a_fault():
    raw = {"loss": {"name": "loss", "step": list(range(20))},
           "eval_loss": {"name": "eval_loss", "step": [4, 9, 14, 19, 19]}}
    quiet(gradprobe.analyze(foreign(raw)))


def test_gp701_raw_steps_contract_and_summary_fallback():
    log = gradprobe.RunLog.build({"step": list(range(5)), "loss": [1.0] * 5}, kind="lightning-csv",
                                 meta={"signals": ["loss", "duplicates"], "raw_steps": [0, 1, 1, 2, 2, 3, 4]})
    assert only(gradprobe.analyze(log)).evidence["streams"]["loss"]["duplicated_steps"] == 2
    summary = {"loss": {"name": "loss", "records": 12, "distinct_steps": 10, "duplicated_steps": 2,
                        "extra_records": 2, "examples": [[3, 2], [4, 2]]}}
    log2 = gradprobe.RunLog.build({"step": list(range(10)), "loss": [1.0] * 10}, kind="hf-trainer-state",
                                  meta={"signals": ["loss", "duplicates"], "duplicates": summary})
    f = only(gradprobe.analyze(log2))
    assert f.first_step == 3 and "2 steps" in f.message


def test_gp701_gradprobe_logs_are_not_judged(logdir):
    # gradprobe's own log keeps one row per step: the rule is skipped, and says why
    report = gradprobe.analyze(gradprobe.RunLog.build({"step": list(range(5)), "loss": [1.0] * 5}))
    quiet(report)
    assert any(s.code == "GP701" and "duplicates" in s.reason for s in report.skipped_rules)


# ================================================================== real foreign logs =======
def _write_tb(logdir: str, steps: list[int], value: float = 1.0, suffix: str = "", repeat: int = 1) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=logdir, filename_suffix=suffix)
    for s in steps:
        for _ in range(repeat):
            w.add_scalar("train/loss", value / (s + 1), global_step=s)
    w.close()


def test_real_tensorboard_callback_registered_twice(tmp_path):
    d = str(tmp_path / "tb")
    _write_tb(d, list(range(30)), repeat=2)
    f = only(gradprobe.analyze(d))
    assert f.severity == "warning" and f.evidence["streams"]["loss"]["repeat_factor"] == 2


def test_real_tensorboard_two_writers_in_one_directory(tmp_path):
    d = str(tmp_path / "tb")
    _write_tb(d, list(range(30)), suffix=".rank0")
    time.sleep(1.1)  # event file names carry the creation second
    _write_tb(d, list(range(30)), value=1.1, suffix=".rank1")
    assert len(glob.glob(os.path.join(d, "*tfevents*"))) == 2
    f = only(gradprobe.analyze(d))
    assert f.severity == "warning" and f.evidence["streams"]["loss"]["restarted"] == 1
    assert len(f.evidence["streams"]["loss"]["origins"]) == 2


def test_real_tensorboard_resumed_run_is_info(tmp_path):
    d = str(tmp_path / "tb")
    _write_tb(d, list(range(30)))
    time.sleep(1.1)
    _write_tb(d, list(range(20, 50)), suffix=".resumed")
    f = only(gradprobe.analyze(d))
    assert f.severity == "info" and f.evidence["streams"]["loss"]["resumes"] == [[29, 20]]


def test_real_tensorboard_clean_log_is_quiet(tmp_path):
    d = str(tmp_path / "tb")
    _write_tb(d, list(range(30)))
    quiet(gradprobe.analyze(d))


def test_real_trainer_state_with_duplicated_entries(tmp_path):
    hist = [{"loss": 2.0 - 0.05 * s, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": s / 10, "step": s}
            for s in range(1, 21)]
    hist += [dict(h) for h in hist[10:]]  # a second process appended the same entries
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 20, "log_history": hist, "logging_steps": 1}, indent=2))
    f = only(gradprobe.analyze(str(p)))
    assert f.severity == "warning" and f.evidence["streams"]["loss"]["duplicated_steps"] == 10
    assert f.evidence["streams"]["loss"]["restarted"] == 1 and "resumed" not in f.evidence["streams"]["loss"]


def test_real_metrics_csv_with_every_epoch_logged_twice(tmp_path):
    rows = []
    for epoch in range(5):
        for s in range(epoch * 4, epoch * 4 + 4):
            rows.append({"epoch": epoch, "step": s, "train_loss_step": 1.0 / (s + 1)})
        for _ in range(2):  # two validation callbacks log the epoch's result
            rows.append({"epoch": epoch, "step": epoch * 4 + 3, "val_loss": 1.0 / (epoch + 1)})
    p = tmp_path / "metrics.csv"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["epoch", "step", "train_loss_step", "val_loss"])
        w.writeheader()
        w.writerows(rows)
    f = only(gradprobe.analyze(str(p)))
    assert f.evidence["main"] == "eval_loss" and f.evidence["streams"]["eval_loss"]["repeat_factor"] == 2
    assert f.severity == "warning"


# ================================================================== catalog =================
def test_rule_documents_itself():
    cls = get_rule("GP701")
    assert cls is not None and cls.requires == ("duplicates",)
    assert "Confidence" in (cls.__doc__ or "")
    for attr in ("what", "why", "causes", "fix", "example"):
        assert getattr(cls.explanation, attr).strip()


def test_a_duplicated_lr_column_is_info_a_duplicated_loss_a_warning():
    """An lr monitor writing the lr twice per step changes nothing the diagnosis reads; a loss
    written twice per step mixes two writers' values into it."""
    steps = list(range(40))
    twice = [s for s in steps for _ in range(2)]
    f = only(gradprobe.analyze(foreign({"loss": {"name": "train_loss", "step": steps},
                                        "lr": {"name": "lr-Adam", "step": twice}})))
    assert f.severity == "info"
    f = only(gradprobe.analyze(foreign({"loss": {"name": "train_loss", "step": twice},
                                        "lr": {"name": "lr-Adam", "step": steps}})))
    assert f.severity == "warning"
