"""Lightning ``metrics.csv`` reader (files written with Lightning's own CSV experiment writer
when Lightning is installed; the real fits are in test_frameworks.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradprobe.readers import detect, load
from gradprobe.runlog import LogError
from tests.readers.writers import fit_rows, write_metrics


def test_sparse_rows_merge_by_step(tmp_path) -> None:
    p = write_metrics(str(tmp_path / "lightning_logs" / "version_0"), fit_rows())
    assert detect(p) == "lightning-csv"
    log = load(p)
    assert log.source["kind"] == "lightning-csv" and log.source["skipped"] == []
    st = log.steps
    assert st["step"].tolist() == list(range(24))
    np.testing.assert_allclose(st["loss"], [5.0 / (s + 1) for s in range(24)], rtol=1e-6)
    np.testing.assert_allclose(st["grad_norm"], [2.0 + s for s in range(24)])
    assert (st["lr"] == 0.01).all()
    assert st.set_index("step")["eval_loss"].dropna().to_dict() == {7: 3.0, 15: 2.0, 23: 1.0}
    assert log.meta["names"]["columns"]["loss"] == "train_loss_step"
    assert "train_loss_epoch" in log.meta["names"]["unused"]
    assert log.meta["optimizers"][0]["class"] == "Adam" and log.meta["optimizers"][0]["partial"]
    assert list(log.layer_grad.columns) == ["net.0.bias", "net.0.weight"]
    np.testing.assert_allclose(log.layer_grad["net.0.weight"], [1.0 + s for s in range(24)])
    assert set(log.meta["signals"]) == {"loss", "grad_norm", "lr", "eval_loss", "layer_grad", "duplicates"}
    assert log.meta["raw_records"]["eval_loss"]["epoch"] == [0, 1, 2]
    assert log.meta["duplicates"] == {}


def test_epoch_level_loss_when_no_step_loss(tmp_path) -> None:
    rows = [(s, {"epoch": s // 4, "train_loss_epoch": 1.0 / (s + 1)}) for s in range(3, 20, 4)]
    log = load(write_metrics(str(tmp_path), rows))
    assert log.meta["names"]["columns"]["loss"] == "train_loss_epoch"
    assert log.steps["step"].tolist() == [3, 7, 11, 15, 19]


def test_nonfinite_cells(tmp_path) -> None:
    rows = [(s, {"train_loss": float("nan") if s == 3 else 1.0, "grad_2.0_norm_total": float("inf") if s == 2 else 1.0})
            for s in range(6)]
    p = write_metrics(str(tmp_path), rows)
    st = load(p).steps.set_index("step")
    assert st.loc[3, "loss_nonfinite"] and not st.drop(3)["loss_nonfinite"].any()
    assert math.isinf(st.loc[2, "grad_norm"])


def test_duplicate_records(tmp_path) -> None:
    rows = fit_rows(epochs=2)
    rows.append((7, {"epoch": 0, "val_loss": 3.5}))  # the same step logged again (a second handler)
    log = load(write_metrics(str(tmp_path), rows))
    dup = log.meta["duplicates"]
    assert list(dup) == ["eval_loss"]
    assert dup["eval_loss"]["examples"] == [[7, 2]] and dup["eval_loss"]["name"] == "val_loss"


def test_truncated_last_line_and_bad_rows(tmp_path) -> None:
    p = write_metrics(str(tmp_path), [(s, {"train_loss": 1.0, "lr-SGD": 0.1}) for s in range(10)])
    text = open(p, newline="").read()
    lines = text.splitlines(keepends=True)
    broken = lines[:4] + ["1,2\r\n"] + lines[4:-1] + [lines[-1][:3]]
    open(p, "w", newline="").write("".join(broken))
    log = load(p)
    assert log.n_steps == 9
    skipped = " ".join(log.source["skipped"])
    assert "truncated last line skipped" in skipped and "1 row(s) with a wrong number of cells" in skipped


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("\r\n\r\n", "empty file"),
        ("epoch,train_loss\r\n0,1.0\r\n", "CSV without the expected columns.*'step'.*found: epoch, train_loss"),
        ("step,accuracy,epoch\r\n0,0.5,0\r\n", "CSV without the expected columns.*no loss, grad-norm, lr or eval-loss"),
        ("epoch,step,train_loss\r\n", "without data rows"),
        ("epoch,step,train_loss\r\n,x,\r\n", "without data rows"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path, content: str, message: str) -> None:
    p = tmp_path / "metrics.csv"
    p.write_text(content, newline="")
    with pytest.raises(LogError, match=message) as info:
        load(str(p))
    assert "\n" not in str(info.value)


def test_binary_csv(tmp_path) -> None:
    p = tmp_path / "metrics.csv"
    p.write_bytes(b"\x00\x01\x02step,loss")
    with pytest.raises(LogError, match="not a CSV"):
        load(str(p))


def test_version_directories_pick_the_longest_run(tmp_path) -> None:
    root = tmp_path / "logs" / "lightning_logs"
    write_metrics(str(root / "version_0"), [(s, {"train_loss": 1.0}) for s in range(5)])
    write_metrics(str(root / "version_1"), [(s, {"train_loss": 2.0}) for s in range(12)])
    assert detect(str(tmp_path / "logs")) == "lightning-csv"
    log = load(str(tmp_path / "logs"))
    assert log.n_steps == 12 and (log.steps["loss"] == 2.0).all()
    assert any("1 other metrics.csv run(s)" in s and "version_0" in s for s in log.source["skipped"])
    assert load(str(root / "version_0")).n_steps == 5


def test_sniffed_without_extension(tmp_path) -> None:
    p = write_metrics(str(tmp_path), [(s, {"train_loss": 1.0}) for s in range(3)])
    other = tmp_path / "metrics"
    other.write_bytes(open(p, "rb").read())
    assert detect(str(other)) == "lightning-csv"
