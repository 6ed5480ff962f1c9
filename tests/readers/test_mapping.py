"""The name -> column mapping shared by every foreign-log reader: structured names by rule,
everything else by meaning."""

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
        ("Train Loss", "loss"),
        ("loss_scale", "scale"),
        ("train/loss_scale", "scale"),
        # TensorFlow, Keras, and other programs: by meaning
        ("cost/cross_entropy", "loss"),
        ("cross_entropy", "loss"),
        ("CrossEntropyLoss", "loss"),
        ("xent", "loss"),
        ("nll", "loss"),
        ("NLLLoss", "loss"),
        ("neg_log_likelihood", "loss"),
        ("objective", "loss"),
        ("Loss/total_loss", "loss"),
        ("epoch_loss", "loss"),
        ("batch_loss", "loss"),
        ("loss_1", "loss"),
        ("validation/epoch_loss", "eval_loss"),
        ("validation/evaluation_loss_vs_iterations", "eval_loss"),
        ("valLoss", "eval_loss"),
        ("test_loss", "eval_loss"),
        ("loss/test", "eval_loss"),
        ("train/perplexity", "loss"),
        ("eval_ppl", "eval_loss"),
        ("bpc", "loss"),
        ("train/mse", "loss"),
        ("epoch_learning_rate", "lr"),
        ("optimizer/lr", "lr"),
        ("lr/pg0", "lr"),
        ("gradients/global_norm", "grad_norm"),
        ("gnorm", "grad_norm"),
        ("grad_norm_clipped", "step_grad_norm"),
        ("param_norm", "weight_norm"),
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
    ["lr-Adam-1", "lr-Adam/pg2", "momentum-Adam", "accuracy", "eval/runtime", "train/total_flos", "hp_metric", "distortion",
     "global_step/sec", "eval_accuracy"],
)
def test_names_that_must_not_map(name: str) -> None:
    # lr-Adam-1 is a second optimizer: mapping it would put wrong numbers in a column
    assert M.match(name) is None


@pytest.mark.parametrize(
    "name, why",
    [
        ("train/train_loss", "whole-run summary"),
        ("val_loss_step", "per-batch validation"),
        ("best_val_loss", "not a loss value"),
        ("nan_loss_count", "not a loss value"),
        ("loss_weight", "not a loss value"),
        ("lr_scale", "not the learning rate"),
        ("lr_group_1", "another parameter group"),
        ("lr-Adam-1", "second optimizer"),
        ("elbo", "sign"),
        ("loss_D", "discriminator"),
        ("train/disc_loss", "discriminator"),
        ("critic_loss", "discriminator"),
        ("log_likelihood", "sign"),
    ],
)
def test_look_alikes_are_refused_with_a_reason(name: str, why: str) -> None:
    reasons: dict[str, str] = {}
    assert M.match(name, why=reasons) is None
    assert why in reasons[name]
    assert name in M.resolve([name]).not_mapped


def test_words_join_terms_and_split_camel_case() -> None:
    assert M.words("cost/CrossEntropy") == ["cost", "xent"]
    assert M.words("train/learning_rate") == ["train", "lr"]
    assert M.words("valPerplexity") == ["val", "perplexity"]
    assert M.words("NLLLoss") == ["nll", "loss"]
    assert M.words("gradients/global_norm") == ["gradients", "gradnorm"]


def test_one_name_per_column_by_priority() -> None:
    res = M.resolve(["train_loss_epoch", "train_loss_step", "val_loss", "lr-Adam", "epoch", "grad_2.0_norm/a", "grad_2.0_norm/b"])
    assert res.columns["loss"] == "train_loss_step"
    assert "train_loss_epoch" in res.unused
    assert res.columns["eval_loss"] == "val_loss"
    assert res.optimizer == "Adam"
    assert res.layers == {"grad_2.0_norm/a": "a", "grad_2.0_norm/b": "b"}


def test_the_total_beats_its_parts_and_per_step_beats_per_epoch() -> None:
    res = M.resolve(["Loss/classification_loss", "Loss/localization_loss", "Loss/total_loss", "train/loss_ema"])
    assert res.columns["loss"] == "Loss/total_loss"
    res = M.resolve(["epoch_loss", "batch_loss"])
    assert res.columns["loss"] == "batch_loss"
    # a loss by name beats a perplexity, a perplexity beats an error metric
    assert M.resolve(["ppl", "loss", "mse"]).columns["loss"] == "loss"
    assert M.resolve(["mse", "ppl"]).columns["loss"] == "ppl"
    # validation before test
    assert M.resolve(["test_loss", "val_loss"]).columns["eval_loss"] == "val_loss"
    assert M.resolve(["test_loss"]).columns["eval_loss"] == "test_loss"


def test_ties_go_to_the_series_logged_at_more_steps() -> None:
    # Hugging Face in MLflow: the per-step "loss" and the one-point summary "train_loss"
    res = M.resolve(["train_loss", "loss"], counts={"loss": 50, "train_loss": 1})
    assert res.columns["loss"] == "loss"
    res = M.resolve(["train_loss", "train_loss_step"], counts={"train_loss": 5, "train_loss_step": 500})
    assert res.columns["loss"] == "train_loss_step"


def test_a_series_too_short_to_judge_gives_way_to_one_that_is_not() -> None:
    # Lightning logging train_loss every 50 steps of a 160-step run (3 records) beside its
    # per-epoch training MSE (10): the loss is read from the series a trend can be read from
    names = ["train_loss", "train_mean_squared_error", "valid_loss"]
    res = M.resolve(names, counts={"train_loss": 3, "train_mean_squared_error": 10, "valid_loss": 10})
    assert res.columns["loss"] == "train_mean_squared_error" and res.columns["eval_loss"] == "valid_loss"
    # both long enough: the loss by name still wins over an error metric
    res = M.resolve(names, counts={"train_loss": 30, "train_mean_squared_error": 10, "valid_loss": 10})
    assert res.columns["loss"] == "train_loss"


def test_the_eval_loss_follows_the_granularity_of_the_loss() -> None:
    keras = ["train/epoch_loss", "validation/epoch_loss", "validation/evaluation_loss_vs_iterations"]
    assert M.resolve(keras).columns["eval_loss"] == "validation/epoch_loss"
    assert M.resolve(keras + ["train/batch_loss"]).columns["eval_loss"] == "validation/evaluation_loss_vs_iterations"


def test_conversions_and_their_notes() -> None:
    res = M.resolve(["train/perplexity", "valid/ppl"])
    assert res.transforms == {"loss": "ln", "eval_loss": "ln"}
    assert any("ln('train/perplexity')" in n for n in res.notes())
    assert M.resolve(["bpd"]).transforms == {"loss": "bits"}
    assert M.resolve(["mse"]).notes() == ["training loss read from the error metric 'mse': no series is named as a loss"]
    parts = M.resolve(["loss_G", "loss_kl"])
    assert "one part of the loss" in parts.notes()[0] and "loss_kl" in parts.notes()[0]
    gan = M.resolve(["loss_G", "loss_D"])
    assert gan.columns["loss"] == "loss_G" and "loss_D" in gan.not_mapped


def test_lightning_optimizer_and_param_group_names() -> None:
    res = M.resolve(["lr-Adam/pg1", "lr-Adam/pg2"])
    assert res.columns["lr"] == "lr-Adam/pg1"
    assert res.optimizer == "Adam"


def test_register_tag_takes_priority_and_unregisters() -> None:
    assert M.match("my/distortion") is None
    rule = M.register_tag(r"my/distortion", "loss")
    try:
        assert M.match("my/distortion").column == "loss"
        res = M.resolve(["loss", "my/distortion"])
        assert res.columns["loss"] == "my/distortion"
        ignore = M.register_tag(r"loss", "ignore")
        assert M.resolve(["loss"]).ignored == ["loss"]
        M.unregister_tag(ignore)
    finally:
        M.unregister_tag(rule)
    assert M.match("my/distortion") is None
    assert M.match("loss").column == "loss"


def test_register_tag_validates() -> None:
    with pytest.raises(ValueError, match="unknown column"):
        M.register_tag("x", "not_a_column")
    with pytest.raises(ValueError, match="invalid tag pattern"):
        M.register_tag("(", "loss")
    with pytest.raises(ValueError, match="layer"):
        M.register_tag("norms/.*", "layer_grad")


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(M.ENV_VAR, '{"distortion": "loss", "gn/(?P<layer>.+)": "layer_grad"}')
    assert M.match("distortion").column == "loss"
    m = M.match("gn/fc.weight")
    assert m.column == "layer_grad" and m.layer == "fc.weight"
    monkeypatch.setenv(M.ENV_VAR, "[1, 2]")
    with pytest.raises(LogError, match=M.ENV_VAR):
        M.active_rules()


def test_every_default_rule_targets_a_known_column() -> None:
    for rule in M.DEFAULT_RULES:
        columns = rule.columns if isinstance(rule, M.MeaningRule) else (rule.column,)
        for column in columns:
            assert column in M.STEP_TARGETS + M.EXTRA_TARGETS


def test_readers_doc_has_the_current_meaning_table() -> None:
    import os
    import re

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "readers.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- meaning-table:[^>]*-->\n(.*?)<!-- /meaning-table -->", text, re.S)
    assert m, "docs/readers.md lost its meaning-table markers"
    assert m.group(1) == M.meaning_markdown(), "regenerate the table with gradprobe.readers.mapping.meaning_markdown()"


def test_the_eval_loss_measures_the_training_loss_quantity() -> None:
    # a validation RMSE is not the validation value of a training NLL
    res = M.resolve(["train/nll_loss", "val/rmse_loss"])
    assert "eval_loss" not in res.columns and "rmse" in res.not_mapped["val/rmse_loss"]
    assert M.resolve(["train/nll_loss", "val/rmse_loss", "val/nll_loss"]).columns["eval_loss"] == "val/nll_loss"
    # names of one cross-entropy, and a generic loss, are comparable
    assert M.resolve(["train_nll", "val_ce"]).columns["eval_loss"] == "val_ce"
    assert M.resolve(["Train loss", "Valid MSE"]).columns["eval_loss"] == "Valid MSE"
