"""GP601-GP605 (input scale, targets, initialisation, saturation, dead units): firing and
healthy cases on synthetic RunLogs and on real tiny CPU runs (see ``_runs_training``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import gradprobe
from gradprobe.report import CANONICAL_HYPERPARAMETERS, Finding, Report
from gradprobe.rules import get_rule
from tests.rules import _runs_training as R

MY_CODES = ("GP601", "GP602", "GP603", "GP604", "GP605")
SAMPLED = [0, 1, 2, 3, 5, 7, 10, 15, 22, 32, 46, 50, 68, 100]
INPUT_STATS = ("numel", "nonfinite", "mean", "std", "absmax", "feature_std_min", "feature_std_max", "integer")


def layers_meta(modules: list[tuple[str, list[int]]]) -> dict[str, Any]:
    layers = []
    for mod, shape in modules:
        layers.append({"name": f"{mod}.weight", "shape": shape, "module": mod})
        layers.append({"name": f"{mod}.bias", "shape": shape[:1], "module": mod})
    return {"optimizers": [{"index": 0, "class": "Adam", "param_groups": [{"lr": 1e-3, "weight_decay": 0.0}]}],
            "layer_segments": [{"id": 0, "first_step": 0, "layers": layers}]}


def build(samples: list[tuple], n: int = 101, m: dict[str, Any] | None = None, **cols: Any) -> gradprobe.RunLog:
    steps = {"step": list(range(n)), "loss": list(np.linspace(2.0, 1.0, n)), "lr": [1e-3] * n}
    steps.update(cols)
    return gradprobe.RunLog.build(steps, meta=m if m is not None else layers_meta([("0", [32, 8])]), samples=samples)


def input_samples(mean: float, std: float, absmax: float, fmin: float | None = None, fmax: float | None = None,
                  integer: int = 0, probe: str = "first_layer", target: str = "0") -> list[tuple]:
    vals = [256, 0, mean, std, absmax, std if fmin is None else fmin, std if fmax is None else fmax, integer]
    return [(s, probe, target, k, 0, float(v)) for s in SAMPLED for k, v in zip(INPUT_STATS, vals)]


def target_samples(mean: float, std: float, absmax: float, name: str = "mse_loss", integer: int = 0,
                   n_classes: int = 0, steps: list[int] | None = None, vary: float = 0.0) -> list[tuple]:
    out = []
    for i, s in enumerate(steps or SAMPLED):
        m = mean + vary * i
        stats = {"numel": 32, "nonfinite": 0, "mean": m, "std": std, "var": std * std, "absmax": absmax,
                 "integer": integer, "n_classes": n_classes, "pred_numel": 32, "pred_nonfinite": 0, "pred_mean": 0.0,
                 "pred_std": 0.5, "pred_absmax": 1.5, "pred_feature_std_min": 0.5, "pred_feature_std_max": 0.5,
                 "pred_integer": 0}
        out += [(s, "target", name, k, 0, float(v)) for k, v in stats.items()]
    return out


def act(step: int, target: str, index: int, **stats: float) -> list[tuple]:
    return [(step, "activation", target, k, index, float(v)) for k, v in stats.items()]


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code}, got {[(f.code, f.message) for f in report.findings]}"
    return found[0]


def quiet(report: Report, *codes: str) -> None:
    noisy_ = [(f.code, f.severity, f.message) for f in report.findings if f.code in codes and f.severity != "info"]
    assert not noisy_, noisy_
    errors = [s for s in report.skipped_rules if s.code in codes and "rule error" in s.reason]
    assert not errors, errors


def snippets(f: Finding) -> str:
    return "\n".join(r.snippet or "" for r in f.recommendations if r.kind == "code")


# ================================================================== GP601 ===================
def test_gp601_raw_features_of_scale_1e4_fire_with_the_measured_statistics():
    f = only(gradprobe.analyze(build(input_samples(1.2e4, 3e3, 5.1e4, 1e2, 4e3))), "GP601")
    assert f.layer == "0" and f.evidence["problem"] == "large"
    assert "1.2e+04" in snippets(f) and "3e+03" in snippets(f)
    assert f.confidence == pytest.approx(1.0)


def test_gp601_one_feature_in_other_units_fires():
    # most features standardised, one in millimetres: the largest per-feature std gives it away
    f = only(gradprobe.analyze(build(input_samples(0.5, 8.0, 900.0, 0.9, 250.0))), "GP601")
    assert f.evidence["feature_std_max"] == 250.0


def test_gp601_tiny_features_fire():
    f = only(gradprobe.analyze(build(input_samples(0.0, 1e-4, 5e-4))), "GP601")
    assert f.evidence["problem"] == "small"


@pytest.mark.parametrize("stats", [
    dict(mean=0.0, std=1.0, absmax=12.0),               # standardised, heavy-tailed
    dict(mean=0.45, std=0.3, absmax=1.0),               # pixels in [0, 1]
    dict(mean=4000.0, std=2000.0, absmax=9999.0, integer=1),  # token ids
])
def test_gp601_unit_scale_and_token_ids_are_quiet(stats):
    quiet(gradprobe.analyze(build(input_samples(**stats))), "GP601")


def test_gp601_uses_the_first_layer_not_the_raw_input():
    # the model normalises internally: raw input 1e4, first parametric layer sees unit scale
    samples = input_samples(1e4, 3e3, 5e4, probe="input", target="model") + input_samples(0.0, 1.0, 4.0)
    quiet(gradprobe.analyze(build(samples)), "GP601")


# ================================================================== GP602 ===================
def test_gp602_constant_targets_are_an_error():
    f = only(gradprobe.analyze(build(target_samples(3.0, 0.0, 3.0))), "GP602")
    assert f.severity == "error" and f.evidence["value"] == 3.0


def test_gp602_a_zero_target_penalty_next_to_a_real_loss_is_not_degenerate():
    samples = target_samples(0.0, 0.0, 0.0, name="l1_loss") + target_samples(0.1, 3.0, 9.0)
    quiet(gradprobe.analyze(build(samples)), "GP602")


def test_gp602_unshuffled_class_batches_are_not_constant_targets():
    # every batch holds one class, but the class changes: a sorted dataset, not degenerate labels
    log = build(target_samples(0.0, 0.0, 9.0, name="cross_entropy", integer=1, n_classes=10, vary=1.0))
    quiet(gradprobe.analyze(log), "GP602")


def test_gp602_targets_of_scale_1e7_fire():
    f = only(gradprobe.analyze(build(target_samples(1e-7, 3e-7, 9e-7))), "GP602")
    assert f.severity == "warning" and f.evidence["rms"] == pytest.approx(math.hypot(1e-7, 3e-7), rel=1e-3)
    assert "(y - y_mean) / y_std" in snippets(f)


def test_gp602_mse_near_zero_against_the_variance_is_possible_leakage():
    n = 101
    loss = np.geomspace(4.0, 1e-6, n)  # var 4: R^2 -> 1 - 2.5e-7
    samples = target_samples(0.0, 2.0, 6.0) + input_samples(0.0, 1.0, 4.0, fmin=0.9, fmax=1.1)
    # each sampled batch is a different one
    samples = [(s, p, t, k, i, v + (0.01 * s if k == "mean" and p == "first_layer" else 0.0))
               for s, p, t, k, i, v in samples]
    log = build(samples, n=n, loss=list(loss), loss_fn=list(loss))
    f = only(gradprobe.analyze(log), "GP602")
    assert "leak" in f.message and f.evidence["loss_over_variance"] <= 1e-4


def test_gp602_memorising_one_batch_is_not_leakage():
    n = 101
    loss = np.geomspace(4.0, 1e-6, n)
    samples = target_samples(0.0, 2.0, 6.0) + input_samples(0.0, 1.0, 4.0)  # the same batch every step
    quiet(gradprobe.analyze(build(samples, n=n, loss=list(loss), loss_fn=list(loss))), "GP602")


def test_gp602_ordinary_targets_are_quiet():
    quiet(gradprobe.analyze(build(target_samples(0.1, 3.0, 9.0))), "GP602")
    quiet(gradprobe.analyze(build(target_samples(1.5, 1.1, 3.0, name="cross_entropy", integer=1, n_classes=4))), "GP602")


# ================================================================== GP603 ===================
def _chain(stds: list[float], step: int = 0, act_name: str = "tanh") -> list[tuple]:
    """Linear -> activation -> Linear -> ... with the given Linear output stds (last = head)."""
    out = []
    idx = 0
    for k, s in enumerate(stds):
        out += act(step, f"l{k}", idx, mean=0.0, std=s, absmax=3 * s, nonfinite=0)
        idx += 1
        if k < len(stds) - 1:
            extra = {"saturated_frac": 0.0} if act_name == "tanh" else {"dead_frac": 0.05}
            out += act(step, f"a{k}", idx, mean=0.0 if act_name == "tanh" else 0.2, std=s, absmax=3 * s, nonfinite=0,
                       **extra)
            idx += 1
    return out


def _chain_meta(k: int) -> dict[str, Any]:
    return layers_meta([(f"l{i}", [32, 32]) for i in range(k)])


def test_gp603_xavier_gain_0001_collapse_fires_and_never_recommends_a_tiny_gain():
    stds = [6e-4, 6e-7, 6e-10, 6e-13, 6e-16, 1e-16]
    f = only(gradprobe.analyze(build(_chain(stds), m=_chain_meta(6))), "GP603")
    assert f.severity == "error" and f.first_step == 0
    assert f.evidence["per_layer_factor"] == pytest.approx(1e-3, rel=0.05)
    assert f.evidence["nonlinearity"] == "tanh"
    code = snippets(f)
    assert 'calculate_gain("tanh")' in code and "0.001" not in code and "0.01" not in code


def test_gp603_exploding_relu_stack_fires_with_kaiming():
    stds = [1.0, 5.0, 30.0, 160.0, 900.0, 1.0]
    f = only(gradprobe.analyze(build(_chain(stds, act_name="relu"), m=_chain_meta(6))), "GP603")
    assert "explode" in f.title and f.severity == "warning"
    assert 'kaiming_normal_(m.weight, nonlinearity="relu")' in snippets(f)


def test_gp603_a_first_layer_that_alone_shrinks_unit_inputs_100x_fires_with_recurrent_init():
    # a GRU initialised with gain 0.001: input std 0.8 -> its output 2e-4 -> the head
    samples = input_samples(0.0, 0.8, 2.0, target="gru")
    samples += act(0, "gru", 0, mean=0.0, std=2e-4, absmax=1e-3, nonfinite=0)
    samples += act(0, "head", 1, mean=0.0, std=3e-7, absmax=1e-6, nonfinite=0)
    m = layers_meta([("gru", [48, 4]), ("head", [1, 16])])
    m["recurrent"] = [{"module": "gru", "class": "GRU", "hidden_size": 16}]
    f = only(gradprobe.analyze(build(samples, m=m)), "GP603")
    assert f.layer == "gru" and f.evidence["layers"] == ["input", "gru"]
    code = snippets(f)
    assert "orthogonal_(p)" in code and "0.001" not in code
    # the same layer fed by unit-scale inputs that it keeps at scale: quiet
    ok = input_samples(0.0, 0.8, 2.0, target="gru") + act(0, "gru", 0, mean=0.0, std=0.2, absmax=0.9, nonfinite=0)
    ok += act(0, "head", 1, mean=0.0, std=0.1, absmax=0.3, nonfinite=0)
    quiet(gradprobe.analyze(build(ok, m=m)), "GP603")


@pytest.mark.parametrize("stds", [
    [0.6, 0.5, 0.55, 0.5, 0.52, 0.01],     # a healthy init; the head small on purpose
    [0.6, 0.2, 1e-3],                      # only two hidden layers: no trend to speak of
    [0.6, 1e-4, 0.5, 0.5, 0.5, 0.1],       # one odd layer, not layer over layer
])
def test_gp603_healthy_or_shallow_inits_are_quiet(stds):
    quiet(gradprobe.analyze(build(_chain(stds), m=_chain_meta(len(stds)))), "GP603")


def test_gp603_normalised_networks_are_not_judged_on_activations():
    # a LayerNorm resets the scale: raw inputs of scale 1e3 through a first layer (std 800)
    # then a norm (std 0.6) read as a collapse, and no init gain compounds through depth
    stds = [820.0, 350.0, 0.63, 0.2, 0.41, 0.6, 0.18, 0.43]
    m = _chain_meta(len(stds))
    m["modules"] = {f"l{i}": "Linear" for i in range(len(stds))} | {"norm1": "LayerNorm"}
    quiet(gradprobe.analyze(build(_chain(stds), m=m)), "GP603")
    collapse = [6e-4, 6e-7, 6e-10, 6e-13, 6e-16, 1e-16]
    m = _chain_meta(6)
    m["modules"] = {f"l{i}": "Linear" for i in range(6)}  # no norm layer: judged
    assert only(gradprobe.analyze(build(_chain(collapse), m=m)), "GP603")


def test_gp603_judges_initialisation_only():
    # the same collapse seen first at step 40 is not an initialisation (the log starts late)
    stds = [6e-4, 6e-7, 6e-10, 6e-13, 1e-16]
    quiet(gradprobe.analyze(build(_chain(stds, step=40), m=_chain_meta(5))), "GP603")


# ================================================================== GP604 ===================
def _sat_samples(target: str, fracs: list[float], index: int = 1, mean: float = 0.0) -> list[tuple]:
    out = []
    for s, f in zip(SAMPLED, fracs):
        out += act(s, "lin", 0, mean=0.0, std=5.0, absmax=20.0, nonfinite=0)
        out += act(s, target, index, mean=mean, std=0.9, absmax=1.0, nonfinite=0, saturated_frac=f)
        out += act(s, "head", index + 1, mean=0.0, std=1.0, absmax=3.0, nonfinite=0)
    return out


def test_gp604_tanh_stuck_at_its_bounds_fires():
    f = only(gradprobe.analyze(build(_sat_samples("tanh", [0.95] * len(SAMPLED)))), "GP604")
    assert f.layer == "tanh" and f.evidence["saturated"][0]["fraction"] == pytest.approx(0.95)


def test_gp604_saturation_only_at_init_or_below_half_is_quiet():
    resolved = [0.95, 0.9, 0.8] + [0.05] * (len(SAMPLED) - 3)
    quiet(gradprobe.analyze(build(_sat_samples("tanh", resolved))), "GP604")
    quiet(gradprobe.analyze(build(_sat_samples("tanh", [0.2] * len(SAMPLED)))), "GP604")


def test_gp604_saturation_training_produced_is_judged_by_the_learning_it_stopped():
    # units below half saturated at the start, at 95% from step 22 on
    n = 260
    sat = _sat_samples("tanh", [0.0] * 8 + [0.95] * (len(SAMPLED) - 8))
    rng = np.random.default_rng(0)
    jitter = 1 + 0.01 * rng.standard_normal(n)
    # the loss was falling, and stopped when they saturated: they stopped the learning
    stopped = np.concatenate([np.linspace(2.0, 1.0, 23), np.full(n - 23, 1.0)]) * jitter
    f = only(gradprobe.analyze(build(sat, n=n, loss=list(stopped))), "GP604")
    assert f.severity == "warning"
    # the loss went on falling after they saturated: it learned through them
    on = np.linspace(2.0, 0.3, n) * jitter
    f = only(gradprobe.analyze(build(sat, n=n, loss=list(on))), "GP604")
    assert f.severity == "info" and "learned through them" in f.message
    # the loss was not falling before they saturated (it follows targets that grow): they did not stop it
    up = np.linspace(1.0, 3.0, n) * jitter
    f = only(gradprobe.analyze(build(sat, n=n, loss=list(up))), "GP604")
    assert f.severity == "info" and "did not stop it" in f.message
    # saturated from the first sampled step, before any update: warning, whatever the loss does
    f = only(gradprobe.analyze(build(_sat_samples("tanh", [0.95] * len(SAMPLED)), n=n, loss=list(on))), "GP604")
    assert f.severity == "warning"


def test_gp604_a_saturated_output_sigmoid_is_by_design():
    # the last module of the forward: confident predictions under BCE
    samples = []
    for s in SAMPLED:
        samples += act(s, "lin", 0, mean=0.0, std=5.0, absmax=20.0, nonfinite=0)
        samples += act(s, "out", 1, mean=0.5, std=0.49, absmax=1.0, nonfinite=0, saturated_frac=0.97)
    quiet(gradprobe.analyze(build(samples)), "GP604")


def _gates(name: str, layer: int = 0, **fracs: float) -> list[tuple]:
    return [(s, "gates", f"lstm.l{layer}.{name}", k, 0, v) for s in SAMPLED for k, v in fracs.items()]


def test_gp604_open_gates_are_by_design_closed_ones_are_not():
    # forget gate near 1 (the memory path), output gates that learned to open fully
    healthy = (_gates("forget", low_frac=0.0, high_frac=0.97, mean=0.99) + _gates("input", low_frac=0.1, high_frac=0.1, mean=0.5)
               + _gates("output", low_frac=0.05, high_frac=0.9, mean=0.9) + _gates("cell", sat_frac=0.1, absmean=0.4))
    quiet(gradprobe.analyze(build(healthy)), "GP604")
    stuck = healthy + _gates("input", layer=1, low_frac=0.8, high_frac=0.0, mean=0.02)
    f = only(gradprobe.analyze(build(stuck)), "GP604")
    assert f.layer == "lstm.l1.input" and f.evidence["saturated"][0]["gate"] == "input"
    closed_forget = _gates("forget", low_frac=0.9, high_frac=0.0, mean=0.01)
    assert only(gradprobe.analyze(build(closed_forget)), "GP604").layer == "lstm.l0.forget"
    saturated_candidate = _gates("cell", sat_frac=0.7, absmean=0.95)
    assert only(gradprobe.analyze(build(saturated_candidate)), "GP604").layer == "lstm.l0.cell"


# ================================================================== GP605 ===================
def _relu_samples(fracs: list[float], mean: float = 0.3, first_input_dead: float = 0.0) -> list[tuple]:
    out = []
    for s, f in zip(SAMPLED, fracs):
        out += act(s, "0", 0, mean=0.0, std=1.0, absmax=3.0, nonfinite=0, input_dead_frac=first_input_dead)
        out += act(s, "1", 1, mean=mean, std=0.5, absmax=2.0, nonfinite=0, dead_frac=f)
        out += act(s, "2", 2, mean=0.0, std=1.0, absmax=3.0, nonfinite=0, input_dead_frac=f)
    return out + input_samples(0.0, 1.0, 3.0)


def test_gp605_all_units_dead_is_an_error_and_named_once():
    f = only(gradprobe.analyze(build(_relu_samples([1.0] * len(SAMPLED)))), "GP605")
    assert f.severity == "error" and f.layer == "1" and f.first_step == 0
    # the Linear after the ReLU module sees the same zeros: not counted twice
    assert [h["layer"] for h in f.evidence["dead"]] == ["1"]


def test_gp605_a_module_called_twice_a_step_is_named_once():
    # a GAN critic on the real and the fake batch: each call is judged, the layer listed once
    samples = []
    for s in SAMPLED:
        for base, frac in ((0, 0.6), (3, 0.7)):
            samples += act(s, "0", base, mean=0.0, std=1.0, absmax=3.0, nonfinite=0)
            samples += act(s, "1", base + 1, mean=0.3, std=0.5, absmax=2.0, nonfinite=0, dead_frac=frac)
            samples += act(s, "2", base + 2, mean=0.0, std=1.0, absmax=3.0, nonfinite=0, input_dead_frac=frac)
    f = only(gradprobe.analyze(build(samples + input_samples(0.0, 1.0, 3.0))), "GP605")
    assert [(h["layer"], h["fraction"]) for h in f.evidence["dead"]] == [("1", 0.7)]
    assert f.message.count("1 (") == 1


#: a loss that stops improving at step 10, when the units die
STALLED = list(np.concatenate([np.linspace(2.0, 1.6, 11), np.full(90, 1.6)]))


def test_gp605_half_dead_is_a_warning_when_training_killed_them():
    # alive before the first update (5% off), 60% dead from step 10 on: the updates killed them
    # and the loss stopped improving with them
    killed = _relu_samples([0.05] * 6 + [0.6] * (len(SAMPLED) - 6))
    f = only(gradprobe.analyze(build(killed, loss=STALLED)), "GP605")
    assert f.severity == "warning"
    # the same units dead while the loss goes on falling (1.9 -> 1.0 after they died): the live
    # units carry the task, the dead ones cost capacity the run did not need
    f = only(gradprobe.analyze(build(killed)), "GP605")
    assert f.severity == "info" and "live units carry the task" in f.message
    # off before any update (a low-dimensional input, a 1-D GAN critic or curve fit) and no more
    # since: the data's geometry or the init, reported with its number, not a warning
    f = only(gradprobe.analyze(build(_relu_samples([0.6] * len(SAMPLED)))), "GP605")
    assert f.severity == "info" and "before any update" in f.message
    # 40% off at the start, 75% later: more than half of the 60% alive were killed
    f = only(gradprobe.analyze(build(_relu_samples([0.4] + [0.75] * (len(SAMPLED) - 1)), loss=[1.6] * 101)), "GP605")
    assert f.severity == "warning"
    quiet(gradprobe.analyze(build(_relu_samples([0.4] + [0.6] * (len(SAMPLED) - 1)))), "GP605")


def test_gp605_functional_relu_is_seen_through_the_next_layer_input():
    samples = []
    for s in SAMPLED:
        samples += act(s, "0", 0, mean=0.0, std=1.0, absmax=3.0, nonfinite=0, input_dead_frac=0.0)
        samples += act(s, "2", 1, mean=0.0, std=1.0, absmax=3.0, nonfinite=0, input_dead_frac=0.8)
    f = only(gradprobe.analyze(build(samples + input_samples(0.0, 1.0, 3.0))), "GP605")
    assert f.layer == "2" and f.evidence["dead"][0]["what"] == "inputs"


@pytest.mark.parametrize("kw", [
    dict(fracs=[0.05] * len(SAMPLED)),                                  # healthy
    dict(fracs=[1.0, 1.0, 0.9] + [0.05] * (len(SAMPLED) - 3)),          # revived early on
    dict(fracs=[1.0] * len(SAMPLED), mean=-0.05),                       # a LeakyReLU/GELU: gradient still flows
    dict(fracs=[0.05] * len(SAMPLED), first_input_dead=0.9),            # sparse raw input features
])
def test_gp605_quiet_cases(kw):
    quiet(gradprobe.analyze(build(_relu_samples(**kw))), "GP605")


def test_gp605_a_batch_that_does_not_vary_says_nothing_about_the_units():
    # every example of the batch is the same input (a preprocessing bug feeding zeros): each
    # unit is on or off for the whole batch, so "off for every example" is no evidence
    samples = []
    for s in SAMPLED:
        samples += act(s, "0", 0, mean=0.0, std=0.3, absmax=1.0, nonfinite=0)
        samples += act(s, "1", 1, mean=0.2, std=0.3, absmax=1.0, nonfinite=0, dead_frac=0.55)
        samples += act(s, "2", 2, mean=0.0, std=1.0, absmax=3.0, nonfinite=0)
    quiet(gradprobe.analyze(build(samples + input_samples(0.0, 0.0, 0.0))), "GP605")
    assert only(gradprobe.analyze(build(samples + input_samples(0.0, 1.0, 3.0))), "GP605")


def test_gp605_after_closed_recurrent_gates_is_their_symptom():
    samples = []
    for s in SAMPLED:
        samples += act(s, "1", 1, mean=0.2, std=0.5, absmax=2.0, nonfinite=0, dead_frac=0.7)
        samples += [(s, "gates", "rnn.l0.input", "low_frac", 0, 0.99), (s, "gates", "rnn.l0.input", "mean", 0, 1e-4)]
    report = gradprobe.analyze(build(samples + input_samples(0.0, 1.0, 3.0)))
    assert only(report, "GP604") and only(report, "GP605").caused_by == ["saturated-activations"]


# ================================================================== real runs ===============
def test_real_dead_relus_from_negative_biases(real):
    report = real("dead_relus")
    f = only(report, "GP605")
    assert f.severity == "error" and f.layer == "1" and f.first_step == 0
    assert "dead-units" in only(report, "GP505").caused_by


def test_real_xavier_gain_0001_in_a_deep_tanh_mlp(real):
    report = real("tiny_gain_tanh")
    f = only(report, "GP603")
    assert f.evidence["per_layer_factor"] < 0.01 and f.evidence["nonlinearity"] == "tanh"
    code = snippets(f)
    assert 'calculate_gain("tanh")' in code and "0.001" not in code
    quiet(report, "GP501")  # big relative steps on tiny weights are the weights growing back, not the lr


def test_real_raw_features_of_scale_1e4(real):
    f = only(real("raw_features"), "GP601")
    assert f.evidence["scale"] > 1e3 and f.layer == "0"
    assert "x = (x - " in snippets(f)


def test_real_targets_of_scale_1e7(real):
    f = only(real("tiny_targets"), "GP602")
    assert f.evidence["rms"] < 1e-6


def test_real_saturated_tanh_from_unscaled_inputs(real):
    report = real("saturated_tanh")
    f = only(report, "GP604")
    assert f.layer == "1" and f.evidence["saturated"][0]["fraction"] > 0.8
    assert "input-scale" in f.caused_by


def test_real_zero_init_tanh_is_poor_init_not_dead_relus(real):
    # exact zeros from tanh(0) of a zero initialisation are not ReLU units: the init erased the input
    report = real("stuck_at_mean")
    quiet(report, "GP605")
    f = only(report, "GP603")
    assert f.severity == "error" and f.layer == "0" and "zero" in f.title
    assert "poor-initialization" in only(report, "GP505").caused_by


@pytest.mark.parametrize("name", ["mlp", "classifier", "cnn", "lstm", "transformer", "lbfgs"])
def test_real_healthy_runs_are_quiet(real, name):
    quiet(real(name), *MY_CODES)


# ================================================================== catalog =================
@pytest.mark.parametrize("code", MY_CODES)
def test_rule_documents_itself(code):
    cls = get_rule(code)
    assert cls is not None
    doc = cls.__doc__ or ""
    assert "Confidence" in doc or "confidence" in doc
    for attr in ("what", "why", "causes", "fix", "example"):
        assert getattr(cls.explanation, attr).strip()
    for name in cls.computes:
        assert name in CANONICAL_HYPERPARAMETERS


def test_real_units_killed_by_one_huge_step_while_the_rest_learn_are_reported(real):
    # one SGD step at 50x the lr kills ~78% of the second ReLU layer; the loss goes on falling
    # on the live units: reported with its numbers (info), the capacity lost named
    f = only(real("killed_relus"), "GP605")
    assert f.layer == "3" and f.evidence["dead"][0]["fraction"] > 0.5
    assert f.severity == "info" and "Training killed them" in f.message


def test_real_weight_clipped_1d_critic_units_off_from_the_start_are_info(real):
    # the original WGAN on 1-D data: 58% of the critic's second ReLU layer off from its first
    # forward on and no more since, while it learns the distribution: not a warning
    report = real("clipped_critic_1d")
    f = only(report, "GP605")
    assert f.severity == "info" and f.layer.endswith(".3") and "before any update" in f.message
    quiet(report, "GP605")
