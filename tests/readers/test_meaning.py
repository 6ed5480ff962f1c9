"""Names read by meaning on real files from each format's writer: TensorFlow's
``cost/cross_entropy``, Keras' train/validation folders, an estimator's ``eval/`` folder,
perplexities, and logs with no loss at all, which are never called healthy."""

from __future__ import annotations

import json
import math

import numpy as np

from gradprobe.readers import load
from tests.readers.test_cli import analyze, assert_clean_exit_2
from tests.readers.writers import write_metrics, write_run, write_state, write_tf2_run


def test_tensorflow_cost_cross_entropy_is_the_loss(tmp_path) -> None:
    """The case that was refused (exit 2): TensorFlow 2 tensors named cost/cross_entropy."""
    f = write_tf2_run(str(tmp_path / "tf" / "train"), {
        "cost/cross_entropy": [(s, 2.3 * math.exp(-s / 10)) for s in range(30)],
        "learning_rate": [(s, 0.1) for s in range(30)],
        "accuracy": [(s, 0.1 + s / 40) for s in range(30)],
    })
    log = load(f)
    assert log.meta["names"]["columns"] == {"loss": "cost/cross_entropy", "lr": "learning_rate"}
    np.testing.assert_allclose(log.steps["loss"], [2.3 * math.exp(-s / 10) for s in range(30)], rtol=1e-6)
    r = analyze(str(tmp_path / "tf"), "--format", "json")
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(r.stdout)
    assert report["source"]["kind"] == "tensorboard" and report["source"]["steps"] == 30
    assert report["source"]["unmapped"] == ["accuracy"]


def test_keras_train_and_validation_folders_are_one_run(tmp_path) -> None:
    """Keras' TensorBoard callback: per-batch loss and per-epoch values in train/, the
    validation loss per epoch and per iteration in validation/ (3 epochs of 4 batches)."""
    write_tf2_run(str(tmp_path / "logs" / "train"), {
        "batch_loss": [(s, 5.0 / s) for s in range(1, 13)],
        "epoch_loss": [(e, 5.0 / (4 * e + 2)) for e in range(3)],
        "epoch_learning_rate": [(e, 0.01) for e in range(3)],
    })
    write_tf2_run(str(tmp_path / "logs" / "validation"), {
        "epoch_loss": [(e, 6.0 / (4 * e + 4)) for e in range(3)],
        "evaluation_loss_vs_iterations": [(4 * e + 4, 6.0 / (4 * e + 4)) for e in range(3)],
    })
    log = load(str(tmp_path / "logs"))
    names = log.meta["names"]
    assert names["columns"]["loss"] == "train/batch_loss"
    assert names["columns"]["eval_loss"] == "validation/evaluation_loss_vs_iterations"  # per iteration, like the loss
    assert "lr" not in names["columns"]  # epoch numbers, not training steps
    assert any("train/epoch_learning_rate" in n and "not aligned" in n for n in log.source["notes"])
    assert log.steps.set_index("step")["eval_loss"].dropna().index.tolist() == [4, 8, 12]
    assert "run" not in log.source  # the parent of train/ and validation/ is the run
    # with per-epoch values only, everything is per epoch
    write_tf2_run(str(tmp_path / "epochs" / "train"), {"epoch_loss": [(e, 1.0 / (e + 1)) for e in range(5)],
                                                       "epoch_learning_rate": [(e, 0.01) for e in range(5)]})
    write_tf2_run(str(tmp_path / "epochs" / "validation"), {"epoch_loss": [(e, 1.2 / (e + 1)) for e in range(5)],
                                                            "evaluation_loss_vs_iterations": [(10 * (e + 1), 1.2 / (e + 1))
                                                                                              for e in range(5)]})
    log = load(str(tmp_path / "epochs"))
    assert log.meta["names"]["columns"] == {"loss": "train/epoch_loss", "lr": "train/epoch_learning_rate",
                                            "eval_loss": "validation/epoch_loss"}
    assert log.n_steps == 5


def test_estimator_eval_folder_feeds_the_eval_loss(tmp_path) -> None:
    """A TF estimator writes training summaries in model_dir and evaluation in model_dir/eval."""
    write_run(str(tmp_path / "model"), {"loss": [(s, 1.0 / (s + 1)) for s in range(0, 100, 10)],
                                        "global_step/sec": [(s, 50.0) for s in range(0, 100, 10)]})
    write_run(str(tmp_path / "model" / "eval"), {"loss": [(50, 0.05), (99, 0.02)], "accuracy": [(50, 0.9), (99, 0.95)]})
    log = load(str(tmp_path / "model"))
    assert log.meta["names"]["columns"] == {"loss": "loss", "eval_loss": "eval/loss"}
    ev = log.steps.set_index("step")["eval_loss"].dropna()
    assert ev.index.tolist() == [50, 99]
    np.testing.assert_allclose(ev, [0.05, 0.02], rtol=1e-6)


def test_perplexity_is_read_as_its_log(tmp_path) -> None:
    write_run(str(tmp_path / "lm"), {"train/ppl": [(s, 100.0 * math.exp(-s / 20)) for s in range(40)],
                                     "valid/ppl": [(s, 120.0 * math.exp(-s / 25)) for s in range(0, 40, 10)]})
    log = load(str(tmp_path / "lm"))
    np.testing.assert_allclose(log.steps["loss"], [math.log(100.0) - s / 20 for s in range(40)], rtol=1e-5)
    assert log.meta["names"]["transforms"] == {"loss": "ln", "eval_loss": "ln"}
    r = analyze(str(tmp_path / "lm"))
    assert r.returncode in (0, 1), r.stderr
    assert "note: training loss = ln('train/ppl')" in r.stdout


def test_a_log_without_a_loss_is_not_called_healthy(tmp_path) -> None:
    write_run(str(tmp_path / "noloss"), {"learning_rate": [(s, 0.01) for s in range(20)],
                                         "accuracy": [(s, s / 20) for s in range(20)]})
    log = load(str(tmp_path / "noloss"))
    assert "loss" not in log.meta["signals"]
    note = " ".join(log.source["skipped"])
    assert "no training loss in this log" in note and "accuracy" in note and "cannot call the run healthy" in note
    r = analyze(str(tmp_path / "noloss"), "--format", "json", "--fail-on", "never")
    report = json.loads(r.stdout)
    assert report["source"]["unmapped"] == ["accuracy"]
    assert any("cannot call the run healthy" in s for s in report["source"]["skipped"])
    assert any(s["rule"] == "nonfinite-loss" for s in report.get("skipped_rules", [])) or "skipped_rules" not in report
    r = analyze(str(tmp_path / "noloss"))
    assert "cannot call the run healthy" in " ".join(r.stdout.split())
    # nothing recognisable at all: one line, exit 2, naming what is there
    write_run(str(tmp_path / "acc"), {"accuracy": [(s, s / 20) for s in range(20)], "best_val_loss": [(19, 0.3)]})
    r = analyze(str(tmp_path / "acc"))
    assert_clean_exit_2(r, "no recognised metric")
    assert "accuracy" in r.stderr and "best_val_loss" in r.stderr


def test_lightning_and_hugging_face_names_by_meaning(tmp_path) -> None:
    rows = [(s, {"train_nll_step": 3.0 / (s + 1), "lr-AdamW": 1e-3}) for s in range(12)]
    rows += [(s, {"valid_nll": 2.5 / (s + 1), "epoch": s // 4}) for s in (3, 7, 11)]
    log = load(write_metrics(str(tmp_path / "pl"), rows))
    assert log.meta["names"]["columns"]["loss"] == "train_nll_step"
    assert log.meta["names"]["columns"]["eval_loss"] == "valid_nll"
    history = [{"step": s, "loss": 4.0 - 0.1 * s, "learning_rate": 1e-4, "epoch": s / 10} for s in range(1, 11)]
    history += [{"step": s, "eval_perplexity": math.exp(4.1 - 0.1 * s), "epoch": s / 10} for s in (5, 10)]
    log = load(write_state(str(tmp_path / "hf" / "trainer_state.json"), history))
    assert log.meta["names"]["columns"]["eval_loss"] == "eval_perplexity"
    np.testing.assert_allclose(log.steps.set_index("step")["eval_loss"].dropna(), [3.6, 3.1], rtol=1e-5)
