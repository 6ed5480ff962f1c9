"""The name -> column mapping shared by every foreign-log reader."""

from __future__ import annotations

import pytest

from gradprobe.readers import mapping as M
from gradprobe.runlog import LogError


@pytest.mark.parametrize(
    "name, column",
    [
        # Hugging Face (log_history keys and TensorBoardCallback tags)
        ("loss", "loss"),
        ("train/loss", "loss"),
        ("grad_norm", "grad_norm"),
        ("train/grad_norm", "grad_norm"),
        ("learning_rate", "lr"),
        ("train/learning_rate", "lr"),
        ("eval_loss", "eval_loss"),
        ("eval/loss", "eval_loss"),
        ("train/epoch", "epoch"),
        # Lightning
        ("train_loss", "loss"),
        ("train_loss_step", "loss"),
        ("train_loss_epoch", "loss"),
        ("val_loss", "eval_loss"),
        ("val_loss_epoch", "eval_loss"),
        ("lr-Adam", "lr"),
        ("lr-SGD/pg1", "lr"),
        ("grad_2.0_norm_total", "grad_norm"),
        ("grad_2.0_norm/net.0.weight", "layer_grad"),
        ("epoch", "epoch"),
        # plain PyTorch SummaryWriter habits
        ("lr", "lr"),
        ("Loss/train", "loss"),
        ("loss_val", "eval_loss"),
        ("validation_loss", "eval_loss"),
        ("loss_scale", "scale"),
        ("train/loss_scale", "scale"),
        # gradprobe's own dashboard tags
        ("gradprobe/grad_norm/preclip", "grad_norm"),
        ("gradprobe/loss/train", "loss"),
        ("gradprobe/amp/scale", "scale"),
        ("gradprobe/amp/skipped", "skipped"),
        ("gradprobe/layer_grad_norm/fc1.weight", "layer_grad"),
    ],
)
def test_default_names(name: str, column: str) -> None:
    m = M.match(name)
    assert m is not None, name
    assert m.column == column


@pytest.mark.parametrize(
    "name",
    ["train/train_loss", "test_loss", "val_loss_step", "lr-Adam-1", "lr-Adam/pg2", "momentum-Adam", "accuracy",
     "eval/runtime", "train/total_flos", "hp_metric"],
)
def test_names_that_must_not_map(name: str) -> None:
    # train/train_loss is HF's whole-run mean, lr-Adam-1 a second optimizer, test/val_loss_step
    # are not the eval loss series: mapping them would put wrong numbers in a column
    assert M.match(name) is None


def test_one_name_per_column_by_priority() -> None:
    res = M.resolve(["train_loss_epoch", "train_loss_step", "val_loss", "lr-Adam", "epoch", "grad_2.0_norm/a", "grad_2.0_norm/b"])
    assert res.columns["loss"] == "train_loss_step"
    assert "train_loss_epoch" in res.unused
    assert res.columns["eval_loss"] == "val_loss"
    assert res.optimizer == "Adam"
    assert res.layers == {"grad_2.0_norm/a": "a", "grad_2.0_norm/b": "b"}


def test_lightning_optimizer_and_param_group_names() -> None:
    res = M.resolve(["lr-Adam/pg1", "lr-Adam/pg2"])
    assert res.columns["lr"] == "lr-Adam/pg1"
    assert res.optimizer == "Adam"


def test_register_tag_takes_priority_and_unregisters() -> None:
    assert M.match("my/objective") is None
    rule = M.register_tag(r"my/objective", "loss")
    try:
        assert M.match("my/objective").column == "loss"
        res = M.resolve(["loss", "my/objective"])
        assert res.columns["loss"] == "my/objective"
        ignore = M.register_tag(r"loss", "ignore")
        assert M.resolve(["loss"]).ignored == ["loss"]
        M.unregister_tag(ignore)
    finally:
        M.unregister_tag(rule)
    assert M.match("my/objective") is None
    assert M.match("loss").column == "loss"


def test_register_tag_validates() -> None:
    with pytest.raises(ValueError, match="unknown column"):
        M.register_tag("x", "not_a_column")
    with pytest.raises(ValueError, match="invalid tag pattern"):
        M.register_tag("(", "loss")
    with pytest.raises(ValueError, match="layer"):
        M.register_tag("norms/.*", "layer_grad")


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(M.ENV_VAR, '{"objective": "loss", "gn/(?P<layer>.+)": "layer_grad"}')
    assert M.match("objective").column == "loss"
    m = M.match("gn/fc.weight")
    assert m.column == "layer_grad" and m.layer == "fc.weight"
    monkeypatch.setenv(M.ENV_VAR, "[1, 2]")
    with pytest.raises(LogError, match=M.ENV_VAR):
        M.active_rules()


def test_every_default_rule_targets_a_known_column() -> None:
    for rule in M.DEFAULT_RULES:
        assert rule.column in M.STEP_TARGETS + M.EXTRA_TARGETS
