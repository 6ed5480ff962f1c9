"""GP501-GP506 (learning rate, weight decay, loss spikes, plateaus, overfitting): firing and
healthy cases on synthetic RunLogs and on real tiny CPU runs (see ``_runs_training``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import gradprobe
from gradprobe.report import CANONICAL_HYPERPARAMETERS, Finding, Report
from gradprobe.rules import get_rule
from tests.readers.writers import write_metrics
from tests.rules import _runs_training as R

MY_CODES = ("GP501", "GP502", "GP503", "GP504", "GP505", "GP506")
LAYERS = {"0.weight": [32, 8], "0.bias": [32], "2.weight": [1, 32], "2.bias": [1]}


def meta(opt: str = "Adam", lr: float = 1e-3, weight_decay: float = 0.0, **extra: Any) -> dict[str, Any]:
    m = {
        "optimizers": [{"index": 0, "class": opt, "param_groups": [{"lr": lr, "weight_decay": weight_decay}]}],
        "layer_segments": [{"id": 0, "first_step": 0, "layers": [
            {"name": n, "shape": s, "module": n.rsplit(".", 1)[0]} for n, s in LAYERS.items()]}],
    }
    m.update(extra)
    return m


def noisy(values: np.ndarray, rel: float = 0.05, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(values * (1.0 + rel * rng.standard_normal(values.size)))


def decaying(n: int, start: float = 2.0, end: float = 0.2, tau: float = 0.15) -> np.ndarray:
    t = np.arange(n) / n
    return end + (start - end) * np.exp(-t / tau)


SAMPLED = [0, 1, 2, 3, 5, 7, 10, 15, 22, 32, 46, 50, 68, 100, 147, 150, 200, 250]


def ratio_samples(ratio: float | list[float], steps: list[int] | None = None) -> list[tuple]:
    steps = steps if steps is not None else SAMPLED
    vals = ratio if isinstance(ratio, list) else [ratio] * len(steps)
    out = []
    for s, r in zip(steps, vals):
        out += [(s, "update", "0.weight", "ratio", 0, r), (s, "update", "2.weight", "ratio", 0, r),
                (s, "update", "0.bias", "ratio", 0, 10 * r)]
    return out


def mse_targets(steps: list[int], losses: list[float] | np.ndarray, var: float = 1.0, pred_std: float = 0.1,
                pred_spread: float = 0.1) -> list[tuple]:
    """Target samples of an mse_loss call; ``losses`` index by step."""
    out = []
    for s in steps:
        stats = {"numel": 32, "nonfinite": 0, "mean": 0.0, "std": math.sqrt(var), "var": var, "absmax": 3 * math.sqrt(var),
                 "integer": 0, "n_classes": 0, "pred_numel": 32, "pred_nonfinite": 0, "pred_mean": 0.0,
                 "pred_std": pred_std, "pred_absmax": 3 * pred_std, "pred_feature_std_min": pred_spread,
                 "pred_feature_std_max": pred_spread, "pred_integer": 0}
        out += [(s, "target", "mse_loss", k, 0, float(v)) for k, v in stats.items()]
    return out


def build(n: int, loss: list[float], *, m: dict[str, Any] | None = None, samples: list[tuple] | None = None,
          kind: str = "gradprobe", **cols: Any) -> gradprobe.RunLog:
    steps = {"step": list(range(n)), "loss": loss, "loss_fn": loss, "lr": [1e-3] * n, "grad_norm": [1.0] * n}
    steps.update(cols)
    return gradprobe.RunLog.build(steps, meta=m if m is not None else meta(), samples=samples, kind=kind)


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code}, got {[(f.code, f.message) for f in report.findings]}"
    return found[0]


def quiet(report: Report, *codes: str) -> None:
    noisy_ = [(f.code, f.severity, f.message) for f in report.findings if f.code in codes and f.severity != "info"]
    assert not noisy_, noisy_
    errors = [s for s in report.skipped_rules if s.code in codes and "rule error" in s.reason]
    assert not errors, errors


def hp(f: Finding, name: str) -> Any:
    recs = [r for r in f.recommendations if r.kind == "hyperparameter" and r.name == name]
    assert recs, f"{f.code} recommends no {name}: {f.recommendations}"
    return recs[0]


# ================================================================== GP501 ===================
def test_gp501_large_ratio_with_a_rising_loss_fires_and_scales_lr_by_the_ratio():
    n = 260
    loss = noisy(np.linspace(1.0, 3.0, n))
    f = only(gradprobe.analyze(build(n, loss, samples=ratio_samples(0.05))), "GP501")
    assert f.severity == "error" and "diverged" in f.evidence["harm"]
    assert f.evidence["update_ratio"] == pytest.approx(0.05)
    rec = hp(f, "lr")
    assert rec.current == pytest.approx(1e-3) and rec.suggested == pytest.approx(1e-3 * 10**-2.5 / 0.05, rel=0.05)
    assert 0.5 < f.confidence <= 1.0


def test_gp501_large_ratio_on_a_run_that_learns_well_is_not_a_finding():
    n = 260
    log = build(n, noisy(decaying(n)), samples=ratio_samples(0.05))
    quiet(gradprobe.analyze(log), "GP501")


def test_gp501_normal_ratio_with_a_rising_loss_is_not_lr():
    n = 260
    log = build(n, noisy(np.linspace(1.0, 3.0, n)), samples=ratio_samples(1e-3))
    quiet(gradprobe.analyze(log), "GP501")


def test_gp501_uses_the_ratio_before_the_harm_began():
    # an explosion inflates the late ratios (SGD: lr x huge gradient); the early ones count
    n = 260
    loss = decaying(n)
    loss[40:] = np.linspace(1.2, 40.0, n - 40)
    ratios = [0.02 if s < 40 else 5.0 for s in SAMPLED]
    log = build(n, noisy(loss), samples=ratio_samples(ratios), m=meta("SGD", 0.1), lr=[0.1] * n)
    f = only(gradprobe.analyze(log), "GP501")
    assert f.evidence["update_ratio"] == pytest.approx(0.02)
    assert hp(f, "lr").suggested == pytest.approx(0.1 * 10**-2.5 / 0.02, rel=0.05)
    assert "SGD step is lr x gradient" in hp(f, "lr").reason


def test_gp501_harm_after_a_long_stable_stretch_at_the_same_lr_is_not_the_lr():
    # 150 of 260 steps trained well at lr 0.1, then the loss climbs: the lr did not change,
    # something else did at step 150 (a batch, a gradient spike, a state): not GP501's
    n = 260
    loss = decaying(n)
    loss[150:] = np.linspace(0.5, 40.0, n - 150)
    ratios = [0.02 if s < 150 else 5.0 for s in SAMPLED]
    log = build(n, noisy(loss), samples=ratio_samples(ratios), m=meta("SGD", 0.1), lr=[0.1] * n)
    quiet(gradprobe.analyze(log), "GP501")
    # ... unless the lr climbed to where the harm began (a warmup or a bad schedule)
    lr = [0.1] * 140 + [0.5] * (n - 140)
    f = only(gradprobe.analyze(build(n, noisy(loss), samples=ratio_samples(ratios), m=meta("SGD", 0.1), lr=lr)),
             "GP501")
    assert "diverged" in f.evidence["harm"]


def test_gp501_nan_from_a_steady_run_is_not_the_lr_but_a_divergence_is():
    n = 120
    ratios = ratio_samples(0.05, [s for s in SAMPLED if s < n])
    loss = list(noisy(decaying(n)))
    steady = loss[:20] + [float("nan")] * (n - 20)  # NaN out of a steady loss: a loss or backward bug
    log = build(n, steady, samples=ratios, loss_nonfinite=[False] * 20 + [True] * (n - 20))
    f = gradprobe.analyze(log).finding("lr-too-high")
    assert f is None or "nonfinite" not in f.evidence["harm"]
    rising = loss[:16] + [loss[15] * 4, loss[15] * 16, loss[15] * 80, loss[15] * 400] + [float("nan")] * (n - 20)
    log = build(n, rising, samples=ratios, loss_nonfinite=[False] * 20 + [True] * (n - 20))
    f = only(gradprobe.analyze(log), "GP501")
    assert "nonfinite" in f.evidence["harm"] and f.severity == "error"


def test_gp501_early_spikes_the_run_outgrows_recommend_warmup_not_a_lower_lr():
    n = 260
    loss = decaying(n)
    loss[3:6] = [30.0, 25.0, 20.0]
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.02), samples=ratio_samples(0.05))), "GP501")
    assert f.severity == "warning"
    warm = hp(f, "warmup_steps")
    assert warm.suggested == 6
    assert not [r for r in f.recommendations if r.name == "lr"]


def test_gp501_without_ratios_fires_only_when_instability_follows_the_lr():
    # a foreign log: loss improving during warmup, then diverging once the lr peaks
    n = 200
    lr = np.minimum(1e-3 * (1 + np.arange(n)), 0.1)
    loss = decaying(n)
    loss[100:] = np.linspace(loss[100], 30.0, n - 100)
    log = build(n, noisy(loss, 0.02), m={"signals": ["loss", "lr"]}, kind="tensorboard", lr=list(lr))
    f = only(gradprobe.analyze(log), "GP501")
    assert f.evidence["update_ratio"] is None and f.evidence["lr_following"]
    rec = hp(f, "lr")
    assert rec.suggested < rec.current
    # the same loss with a constant lr: nothing says it is the lr
    log2 = build(n, noisy(loss, 0.02), m={"signals": ["loss", "lr"]}, kind="tensorboard", lr=[0.1] * n)
    quiet(gradprobe.analyze(log2), "GP501")


def test_gp501_a_nan_batch_that_the_loop_skipped_is_not_divergence():
    # one NaN loss from NaN inputs at step 100, finite training before and after
    n = 260
    loss = noisy(decaying(n))
    loss[100] = float("nan")
    nf = [False] * n
    nf[100] = True
    samples = ratio_samples(0.05) + [(100, "input", "model", "nonfinite", 0, 8.0), (100, "input", "model", "numel", 0, 256.0),
                                     (68, "input", "model", "nonfinite", 0, 0.0), (68, "input", "model", "numel", 0, 256.0)]
    quiet(gradprobe.analyze(build(n, loss, samples=samples, loss_nonfinite=nf)), "GP501")
    # the same NaN without NaN data, but training goes on finite afterwards: still not divergence
    quiet(gradprobe.analyze(build(n, loss, samples=ratio_samples(0.05), loss_nonfinite=nf)), "GP501")


def test_gp501_and_gp502_defer_to_tiny_targets():
    n = 260
    rising = noisy(np.linspace(1e-14, 3e-14, n))
    tiny = mse_targets(SAMPLED, rising, var=1e-14)  # targets of RMS 1e-7
    quiet(gradprobe.analyze(build(n, rising, samples=ratio_samples(0.05) + tiny)), "GP501")
    quiet(gradprobe.analyze(build(n, noisy(np.full(n, 1e-14)), samples=ratio_samples(1e-7) + tiny,
                                  m=meta("SGD", 1e-3))), "GP502")


def test_gp501_a_nan_after_an_ordinary_high_gradient_of_a_noisy_run_is_not_a_divergence():
    # small-batch gradient norms scatter 5x and more: 3.4x the median just before a NaN, below
    # the highs the run already had, is no runaway
    rng = np.random.default_rng(22)
    n = 120
    grad = rng.lognormal(0, 0.8, n)
    grad[59] = 3.4 * np.median(grad[39:59])
    grad[59] = min(grad[59], 0.9 * grad[39:59].max())
    loss = list(noisy(decaying(n), 0.05))
    loss = loss[:60] + [float("nan")] * (n - 60)
    log = build(n, loss, samples=ratio_samples(0.05, [s for s in SAMPLED if s < n]), grad_norm=list(grad),
                loss_nonfinite=[False] * 60 + [True] * (n - 60))
    f = gradprobe.analyze(log).finding("lr-too-high")
    assert f is None or "nonfinite" not in f.evidence["harm"]


def test_gp501_collapse_judged_on_the_early_ratio_when_the_weights_grow():
    # AdamW at lr 0.3: the first steps rewrite the weights (ratio 0.9 -> 0.1), the weights then
    # grow until the relative step is small; the loss sits at ln 3 from the start
    n = 80
    steps = [s for s in SAMPLED if s < n]
    ratios = [0.9, 0.41, 0.25, 0.17, 0.1, 0.075, 0.045, 0.022, 0.009, 0.002, 0.002, 0.002, 0.003][:len(steps)]
    loss = noisy(np.full(n, math.log(3)), 0.03)
    loss[1:5] = [6.5, 4.2, 3.9, 2.1]
    ce = []
    for st in steps:
        stats = {"numel": 16, "nonfinite": 0, "mean": 1.0, "std": 0.8, "var": 0.66, "absmax": 2, "integer": 1,
                 "n_classes": 3, "pred_std": 0.01, "pred_mean": 0.0, "pred_feature_std_max": 0.001}
        ce += [(st, "target", "cross_entropy", k, 0, float(v)) for k, v in stats.items()]
    f = only(gradprobe.analyze(build(n, loss, samples=ratio_samples(ratios, steps) + ce, m=meta("AdamW", 0.3),
                                     lr=[0.3] * n)), "GP501")
    assert f.evidence["harm"]["stalled"]["early_update_ratio"] >= 0.1
    # the same stall at ratios of 1e-2 throughout is the data's or the model's (GP505), not the lr's
    flat = [0.02] * len(steps)
    quiet(gradprobe.analyze(build(n, loss, samples=ratio_samples(flat, steps) + ce, m=meta("AdamW", 3e-3),
                                  lr=[3e-3] * n)), "GP501")


def test_gp501_leaves_the_aftermath_of_a_gradient_that_exploded_on_an_ordinary_batch_to_gp202():
    # the batch of step 30 had an ordinary loss but a 200x gradient (a recurrence, a scaling
    # bug), nothing clipped it, and the loss jumped after: the explosion's doing, at any lr
    n = 120
    loss = decaying(n)
    loss[31:] = loss[31:] * 20
    grad = np.full(n, 1.0)
    grad[30] = 200.0
    report = gradprobe.analyze(build(n, noisy(loss, 0.02), samples=ratio_samples(0.05), grad_norm=list(grad)))
    quiet(report, "GP501")
    assert report.findings[0].code == "GP202"
    # a loss that climbs first and drags the gradient along is the step size's (GP501)
    loss2 = decaying(n)
    loss2[8:] = np.geomspace(loss2[8], loss2[8] * 500, n - 8)
    grad2 = np.full(n, 1.0)
    grad2[12:] = np.geomspace(1.0, 1e4, n - 12)
    f = only(gradprobe.analyze(build(n, noisy(loss2, 0.02), samples=ratio_samples(0.05), grad_norm=list(grad2))),
             "GP501")
    assert f.severity == "error"


def test_gp501_names_raw_inputs_as_its_cause():
    n = 260
    inp = [(s, "first_layer", "0", k, 0, float(v)) for s in SAMPLED for k, v in
           zip(("numel", "nonfinite", "mean", "std", "absmax", "feature_std_min", "feature_std_max", "integer"),
               (256, 0, 1e3, 1e3, 4e3, 1e3, 1e3, 0))]
    report = gradprobe.analyze(build(n, noisy(np.linspace(1.0, 3.0, n)), samples=ratio_samples(0.5) + inp,
                                     m=meta("SGD", 0.05), lr=[0.05] * n))
    assert only(report, "GP501").caused_by == ["input-scale"] and report.findings[0].code == "GP601"


# ================================================================== GP502 ===================
def test_gp502_tiny_ratio_and_a_flat_loss_at_the_trivial_level_fires():
    n = 260
    loss = noisy(np.full(n, 1.05), 0.03)
    samples = ratio_samples(1e-7) + mse_targets(SAMPLED, np.full(n, 1.05))
    f = only(gradprobe.analyze(build(n, loss, samples=samples, m=meta("SGD", 1e-6), lr=[1e-6] * n)), "GP502")
    rec = hp(f, "lr")
    assert rec.current == pytest.approx(1e-6) and rec.suggested == pytest.approx(1e-6 * 1e-3 / 1e-7)
    assert f.evidence["loss_over_trivial"] == pytest.approx(1.05, rel=0.1)
    assert f.confidence > 0.8


def test_gp502_converged_run_with_the_lr_decayed_to_its_floor_is_quiet():
    # ReduceLROnPlateau: lr 1e-2 -> 1e-6, the ratio follows it; the loss fell 100x and stays
    n = 260
    lr = np.where(np.arange(n) < 60, 1e-2, 1e-6)
    ratios = [1e-3 if s < 60 else 1e-7 for s in SAMPLED]
    loss = np.maximum(decaying(n, 1.0, 0.01, 0.05), 0.01)
    samples = ratio_samples(ratios) + mse_targets(SAMPLED, loss)
    report = gradprobe.analyze(build(n, noisy(loss, 0.05), samples=samples, lr=list(lr)))
    quiet(report, "GP502", "GP505", "GP501")


def test_gp502_sgd_steps_shrunk_by_clipping_are_overclipping_not_a_low_lr():
    n = 260
    loss = noisy(np.full(n, 1.05), 0.03)
    samples = ratio_samples(1e-6) + mse_targets(SAMPLED, np.full(n, 1.05))
    log = build(n, loss, samples=samples, m=meta("SGD", 0.05), lr=[0.05] * n, grad_norm=[2.0] * n,
                step_grad_norm=[0.002] * n, clip_calls=[1] * n, clip_max_norm=[0.002] * n)
    quiet(gradprobe.analyze(log), "GP502")


def test_gp502_behind_overclipping_is_a_symptom_and_its_lr_is_not_merged():
    # clipping called on only 40% of the steps: GP502 judges the run, GP201 too (the steps
    # that clip are cut 1000x); the lr GP502 computes is then not merged next to max_norm
    n = 260
    loss = noisy(np.full(n, 1.05), 0.03)
    samples = ratio_samples(1e-6) + mse_targets(SAMPLED, np.full(n, 1.05))
    clip = (np.arange(n) % 5 < 2)  # clip_grad_norm_ called on 40% of the steps only
    log = build(n, loss, samples=samples, m=meta("SGD", 0.05), lr=[0.05] * n, grad_norm=[2.0] * n,
                step_grad_norm=list(np.where(clip, 0.002, 2.0)), clip_calls=list(clip.astype(int)),
                clip_max_norm=list(np.where(clip, 0.002, np.nan)))
    report = gradprobe.analyze(log)
    low = only(report, "GP502")
    assert low.caused_by == ["overclipping"] and report.findings[0].code == "GP201"
    assert "lr" not in report.suggested_hyperparameters and "max_norm" in report.suggested_hyperparameters
    assert "not merged" in hp(low, "lr").reason


def test_gp502_flat_loss_judged_beyond_one_hard_first_batch():
    # the first batch happened to be hard (1.2x the level, 4 noise units): it is no progress
    n = 260
    rng = np.random.default_rng(9)
    loss = 1.0 + 0.05 * rng.standard_normal(n)
    loss[0] = 1.2
    samples = ratio_samples(1e-7) + mse_targets(SAMPLED, np.full(n, 1.0))
    f = only(gradprobe.analyze(build(n, list(loss), samples=samples, m=meta("SGD", 1e-6), lr=[1e-6] * n)), "GP502")
    assert f.evidence["progress"] < 0.1


def test_gp502_tiny_ratio_while_the_loss_keeps_falling_is_quiet():
    n = 260
    samples = ratio_samples(5e-5) + mse_targets(SAMPLED, decaying(n))
    quiet(gradprobe.analyze(build(n, noisy(decaying(n)), samples=samples)), "GP502")


def test_gp502_flat_loss_well_below_the_trivial_level_is_converged():
    n = 260
    loss = np.full(n, 0.02)
    samples = ratio_samples(1e-7) + mse_targets(SAMPLED, loss, pred_std=1.0)
    # the first sampled loss must match the baseline's scale for it to be used: here it does not
    # (0.02 vs var 1), so the fallback applies: the gradient norm decayed with the loss
    gn = list(np.geomspace(1.0, 0.01, n))
    quiet(gradprobe.analyze(build(n, noisy(loss), samples=samples, grad_norm=gn)), "GP502", "GP505")


def _adam_lr_only(q: float, n: int = 300) -> gradprobe.RunLog:
    """A foreign-like log (no sampled ratios) of Adam at lr 5e-7, whose loss approaches its floor
    exponentially with the second half's drop ``q`` times the first half's."""
    tau = n / (2 * -math.log(q))
    loss = 0.5 + 1.5 * np.exp(-np.arange(n) / tau)
    return build(n, noisy(loss, 0.01), m=meta("Adam", 5e-7), lr=[5e-7] * n)


def test_gp502_without_ratios_a_loss_still_falling_with_a_tenth_of_its_drop_ahead_fires():
    # q = 0.41: 17% of the whole drop still ahead at the end (a corpus run's pace)
    f = only(gradprobe.analyze(_adam_lr_only(0.41)), "GP502")
    assert f.evidence["update_ratio_bound"] == pytest.approx(5e-5)
    assert "still falling" in f.message and "would still be ahead" in f.message


def test_gp502_without_ratios_a_loss_that_flattened_out_is_quiet():
    # q = 0.2: 4% of the drop left, the loss has levelled off (converging at this lr)
    quiet(gradprobe.analyze(_adam_lr_only(0.2)), "GP502")


# ================================================================== GP503 ===================
def _weights(n: int, norms: np.ndarray) -> dict[str, list[float]]:
    return {"0.weight": list(norms), "0.bias": [1.0] * n, "2.weight": [1.0] * n, "2.bias": [0.1] * n}


def test_gp503_unbounded_growth_without_decay_and_without_progress_fires():
    n = 300
    norms = np.linspace(3.0, 60.0, n)  # He norm of a [32, 8] matrix: 8
    loss = noisy(np.maximum(decaying(n, 2.0, 0.01, 0.05), 0.01))
    log = gradprobe.RunLog.build({"step": list(range(n)), "loss": loss, "lr": [1e-3] * n,
                                  "weight_norm": list(norms)}, meta=meta(), layer_weight=_weights(n, norms))
    f = only(gradprobe.analyze(log), "GP503")
    assert f.layer == "0.weight" and f.evidence["unproductive"]
    rec = hp(f, "weight_decay")
    # growth rate per step over the second half, divided by lr
    r = math.log(norms[-8:].mean() / norms[n // 2]) / (n // 2)
    assert rec.suggested == pytest.approx(r / 1e-3, rel=0.15)
    assert any("AdamW" in (r.snippet or "") for r in f.recommendations)


def test_gp503_is_quiet_with_weight_decay_or_growth_that_levels_off_or_buys_loss():
    n = 300
    norms = np.linspace(3.0, 60.0, n)
    flat = noisy(np.full(n, 0.01))
    for m, norm, loss in [
        (meta(weight_decay=0.01), norms, flat),                                  # decay is on
        (meta(), 3.0 + 30.0 * np.log1p(np.arange(n)) / np.log(n), flat),         # logarithmic: levels off
        (meta(), 3.0 + 57.0 * np.sqrt(np.arange(n) / n), flat),                  # a random walk's sqrt(t)
        (meta(), norms, noisy(np.linspace(50.0, 1.0, n))),                       # growth buys loss
        (meta(), np.linspace(0.005, 0.9, n), flat),                              # tiny init growing back to size
    ]:
        log = gradprobe.RunLog.build({"step": list(range(n)), "loss": loss, "lr": [1e-3] * n},
                                     meta=m, layer_weight=_weights(n, norm))
        quiet(gradprobe.analyze(log), "GP503")


def test_gp503_growth_followed_by_spikes_links_the_spike_to_it():
    n = 300
    norms = np.linspace(3.0, 60.0, n)
    loss = decaying(n, 2.0, 0.2, 0.05)
    loss[250:255] = 5.0
    log = gradprobe.RunLog.build({"step": list(range(n)), "loss": noisy(loss, 0.02), "lr": [1e-3] * n},
                                 meta=meta(), layer_weight=_weights(n, norms))
    report = gradprobe.analyze(log)
    f = only(report, "GP503")
    assert "spikes" in f.evidence["instability_after"] and f.first_step < 250
    assert "missing-weight-decay" in only(report, "GP504").caused_by


# ================================================================== GP504 ===================
def test_gp504_a_spike_the_loss_comes_straight_back_from_is_info_one_that_sets_it_back_a_warning():
    n = 200
    loss = decaying(n)
    loss[120:123] = [3.0, 2.5, 1.0]
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.03))), "GP504")
    assert f.severity == "info" and f.first_step == 120 and "came straight back" in f.message
    assert f.evidence["training"]["spikes"] == 1 and f.evidence["training"]["max_factor"] > 10
    loss[123:] = np.linspace(0.9, 0.5, n - 123)  # back below half-way, but settled far above its level before
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.03))), "GP504")
    assert f.severity == "warning" and f.evidence["training"]["set_back"] == 1 and "knocked off course" in f.message


def test_gp504_a_loss_lifted_for_a_window_and_back_at_its_level_soon_after_is_a_transient():
    # a catapult: 5x for a few steps, ~1.6x for one smoothing window, then back at its level
    n = 600
    loss = np.full(n, 0.15)
    loss[197:202] = [0.86, 0.66, 0.68, 0.59, 0.58]
    loss[202:232] = 0.24
    report = gradprobe.analyze(build(n, noisy(loss, 0.05)))
    f = only(report, "GP504")
    assert f.severity == "info" and f.evidence["training"]["set_back"] == 0 and "a transient" in f.message
    loss[202:] = 0.24  # the same lift that never goes away, after an exploded update: set back
    grad = np.ones(n)
    grad[196] = 50.0
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.05), grad_norm=grad)), "GP504")
    assert f.severity == "warning" and f.evidence["training"]["set_back"] == 1


def test_gp504_a_window_above_the_level_no_higher_than_the_run_wanders_is_no_set_back():
    # per-sample SGD: losses spread over three decades about a slowly falling level, so the
    # median of the 50 records after any record wanders to 3x the 50 before it and more; a
    # 5-record spike followed by a window 3.5x its level, as high as that wander, has not set
    # the run back
    rng = np.random.default_rng(7)
    n = 3000
    level = 0.05 + 0.3 * np.exp(-np.arange(n) / 500)
    loss = level * 10 ** rng.uniform(-2.0, 1.0, n)
    loss[2000:2005] = 40 * level[2000]
    loss[2005:2055] *= 3.5
    f = only(gradprobe.analyze(build(n, loss)), "GP504")
    assert f.severity == "info" and f.evidence["training"]["set_back"] == 0
    # the same run knocked to 10x its level for the rest of the run by an update of 50x the
    # usual gradient the step before: set back
    loss[2005:2055] /= 3.5
    loss[2005:] *= 10.0
    grad = np.ones(n)
    grad[1999] = 50.0
    f = only(gradprobe.analyze(build(n, loss, grad_norm=grad)), "GP504")
    assert f.severity in ("warning", "error")


def test_gp504_single_hard_batch_is_not_a_spike_but_two_steps_are():
    n = 200
    loss = decaying(n)
    loss[120] = 5.0  # ~25x, one batch: a hard or corrupt batch, not damaged weights
    quiet(gradprobe.analyze(build(n, noisy(loss, 0.03))), "GP504")
    loss[121] = 0.8  # the next step is still up (4x): the weights were knocked off course
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.03))), "GP504")
    assert f.first_step == 120 and f.evidence["training"]["events"][0]["records"] == 2


def test_gp504_two_high_steps_among_frequent_outliers_need_a_third():
    n = 400
    rng = np.random.default_rng(2)
    loss = decaying(n, 1.4, 0.05, 0.05) * rng.lognormal(0.0, 0.05, n)
    loss[np.arange(105, n, 25)] *= 8.0  # isolated one-batch outliers: p = 12/400, n p**2 = 0.36, n p**3 = 0.01
    loss[300:302] = 0.35  # 2 in a row, no higher than the lone outliers: expected by chance at their rate
    quiet(gradprobe.analyze(build(n, list(loss))), "GP504")
    loss[300:303] = 0.35  # 3 in a row: not
    assert only(gradprobe.analyze(build(n, list(loss))), "GP504").first_step == 300
    loss[300:303] = [5.0, 5.0, 0.05]  # 2 in a row far above any lone outlier: damage, not chance
    assert only(gradprobe.analyze(build(n, list(loss))), "GP504").first_step == 300


def test_gp504_heavy_tailed_batches_late_in_a_classification_run_are_quiet():
    # late in training most batches are ~0.02, a few carry a confidently wrong example (10-25x)
    n = 2000
    rng = np.random.default_rng(5)
    loss = decaying(n, 1.4, 0.02, 0.05) * rng.lognormal(0.0, 0.3, n)
    hard = rng.random(n) < 0.02
    loss[hard] *= rng.uniform(10, 25, hard.sum())
    quiet(gradprobe.analyze(build(n, list(loss))), "GP504", "GP501")


def test_gp504_loss_that_never_comes_back_is_an_error():
    n = 200
    loss = decaying(n)
    loss[150:] = 4.0
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.03))), "GP504")
    assert f.severity == "error" and "never came back" in f.message


def test_gp504_validation_spike_from_probe_log_fires():
    n = 200
    val_steps = list(range(9, n, 10))
    val = [0.5 + 0.02 * (i % 3) for i in range(len(val_steps))]
    val[12] = 10.0  # 45 mV -> 1000 mV
    log = gradprobe.RunLog.build({"step": list(range(n)), "loss": noisy(decaying(n), 0.03), "lr": [1e-3] * n},
                                 meta=meta(), scalars=[(s, "val_loss", v) for s, v in zip(val_steps, val)])
    f = only(gradprobe.analyze(log), "GP504")
    assert f.first_step == val_steps[12] and "validation" in f.evidence


def test_gp504_a_climb_over_the_first_records_is_measured_from_the_untrained_loss():
    # an oversized first step: 1.5 -> 110 -> 138 -> 8.6 -> ... the running median of the first
    # records climbs with the loss, the untrained model's loss does not
    n = 80
    loss = noisy(decaying(n, 1.5, 0.4, 0.1), 0.02)
    loss[1:5] = [110.0, 138.0, 8.6, 14.0]
    f = only(gradprobe.analyze(build(n, loss)), "GP504")
    assert f.first_step == 1 and f.evidence["training"]["events"][0]["records"] >= 2


def test_gp504_two_high_records_in_a_short_noisy_run_are_not_enough_unless_the_run_broke():
    # 80 records: two batches at 4x among them is what heavy-tailed batches make now and then
    rng = np.random.default_rng(21)
    n = 80
    loss = list(0.32 * rng.lognormal(0, 0.3, n))
    loss[66:68] = [1.40, 1.13]
    quiet(gradprobe.analyze(build(n, loss)), "GP504")
    # the same two records followed by NaN for good: the run never came back, not chance
    broken = loss[:68] + [float("nan")] * (n - 68)
    f = only(gradprobe.analyze(build(n, broken, loss_nonfinite=[False] * 68 + [True] * (n - 68))), "GP504")
    assert f.first_step == 66


def test_gp504_heavy_minibatch_noise_and_a_fast_initial_drop_are_quiet():
    n = 400
    rng = np.random.default_rng(3)
    loss = decaying(n, 10.0, 0.3, 0.02) * rng.lognormal(0.0, 0.35, n)
    quiet(gradprobe.analyze(build(n, list(loss))), "GP504")


# ================================================================== GP505 ===================
def test_gp505_loss_stuck_at_the_target_variance_fires():
    n = 260
    loss = np.full(n, 1.0)
    loss[:20] = np.linspace(1.5, 1.0, 20)
    samples = mse_targets(SAMPLED, loss, var=1.0, pred_std=0.01, pred_spread=0.001)
    f = only(gradprobe.analyze(build(n, noisy(loss, 0.05), samples=samples)), "GP505")
    assert f.evidence["loss_over_trivial"] == pytest.approx(1.0, abs=0.1)
    assert f.evidence["prediction_spread"] < 0.05 and f.first_step < n // 4  # the decline ends at 20
    assert "target mean" in f.message


def test_gp505_cross_entropy_stuck_at_ln_classes_fires():
    n = 260
    loss = noisy(np.full(n, math.log(10)), 0.02)
    samples = []
    for s in SAMPLED:
        stats = {"numel": 32, "nonfinite": 0, "mean": 4.5, "std": 2.9, "var": 8.3, "absmax": 9, "integer": 1,
                 "n_classes": 10, "pred_std": 0.01, "pred_mean": 0.0, "pred_feature_std_max": 0.001}
        samples += [(s, "target", "cross_entropy", k, 0, float(v)) for k, v in stats.items()]
    f = only(gradprobe.analyze(build(n, loss, samples=samples)), "GP505")
    assert "uniform" in f.message and f.evidence["trivial_kinds"] == ["uniform"]


def test_gp505_stuck_from_the_start_is_not_caused_by_units_that_died_later():
    # targets that carry no signal: the loss sits at ln 3 from the first update; ReLU units
    # die at step 10 (a net that can only predict the prior turns them off): not the cause
    n = 200
    level = np.full(n, math.log(3))
    level[:60] *= 1.08  # a slow drift down within the trivial level: the last "improvement" ends at ~60
    loss = noisy(level, 0.01)
    samples = []
    for s in SAMPLED:
        stats = {"numel": 32, "nonfinite": 0, "mean": 1.0, "std": 0.8, "var": 0.66, "absmax": 2, "integer": 1,
                 "n_classes": 3, "pred_std": 0.01, "pred_mean": 0.0, "pred_feature_std_max": 0.001}
        samples += [(s, "target", "cross_entropy", k, 0, float(v)) for k, v in stats.items()]
        samples += [(s, "activation", "1", k, 1, v) for k, v in
                    (("mean", 0.2), ("std", 0.5), ("absmax", 2.0), ("nonfinite", 0.0),
                     ("dead_frac", 0.9 if s >= 10 else 0.05))]
    samples += [(s, "first_layer", "0", k, 0, v) for s in SAMPLED for k, v in (("std", 1.0), ("mean", 0.0))]
    report = gradprobe.analyze(build(n, loss, samples=samples))
    f = only(report, "GP505")
    assert f.first_step == 1 and f.evidence["at_trivial_since_step"] == 1
    assert "dead-units" not in f.caused_by and report.findings[0].code == "GP505"


def test_gp505_converged_low_loss_is_not_a_plateau():
    n = 260
    loss = np.maximum(decaying(n, 1.0, 0.01, 0.05), 0.01)
    samples = mse_targets(SAMPLED, loss, var=1.0)
    quiet(gradprobe.analyze(build(n, noisy(loss), samples=samples)), "GP505")


def test_gp505_without_targets_fires_only_for_a_loss_that_never_moved():
    n = 200
    flat = build(n, noisy(np.full(n, 2.3), 0.02), m={"signals": ["loss"]}, kind="hf-trainer-state")
    f = only(gradprobe.analyze(flat), "GP505")
    assert f.confidence < 0.75 and "never decreased" in f.message
    learned = build(n, noisy(np.maximum(decaying(n, 2.3, 0.5, 0.1), 0.5), 0.02), m={"signals": ["loss"]},
                    kind="hf-trainer-state")
    quiet(gradprobe.analyze(learned), "GP505")


def test_gp505_sum_reduction_does_not_compare_with_the_baseline():
    # loss = 32 x MSE (reduction="sum"): the first loss does not match var + pred terms
    n = 260
    loss = np.full(n, 32 * 0.3)
    loss[:60] = np.linspace(32.0, 32 * 0.3, 60)
    samples = mse_targets(SAMPLED, loss, var=1.0)
    quiet(gradprobe.analyze(build(n, noisy(loss, 0.03), samples=samples)), "GP505")


# ================================================================== GP506 ===================
def _overfit_log(val: list[float], train: np.ndarray) -> gradprobe.RunLog:
    n = train.size
    val_steps = list(range(9, n, 10))[: len(val)]
    return gradprobe.RunLog.build({"step": list(range(n)), "loss": noisy(train, 0.02), "lr": [1e-3] * n},
                                  meta=meta(), scalars=[(s, "val_loss", v) for s, v in zip(val_steps, val)])


def test_gp506_validation_rising_while_training_falls_fires():
    n = 300
    val = list(np.concatenate([np.linspace(2.0, 0.8, 10), np.linspace(0.8, 1.4, 20)]))
    f = only(gradprobe.analyze(_overfit_log(val, decaying(n, 2.0, 0.01, 0.2))), "GP506")
    assert f.first_step == 99 and f.evidence["val_rise"] > 0.5
    assert any(r.kind == "code" and "best.pt" in r.snippet for r in f.recommendations)


def test_gp506_a_noisy_level_above_a_lucky_minimum_is_not_a_climb():
    # a fine-tune evaluated 11 times: one lucky evaluation at 0.23, then a finite evaluation
    # set's scatter about 0.28 (15% above it) with no trend, while the training loss falls
    n = 220
    scatter = [0.31, 0.26, 0.27, 0.23, 0.30, 0.27, 0.25, 0.28, 0.29, 0.29, 0.29]
    quiet(gradprobe.analyze(_overfit_log(scatter, decaying(n, 0.5, 0.02, 0.03))), "GP506")
    # the same size of rise, climbing with every epoch or two: memorising
    climb = [0.31, 0.26, 0.24, 0.23, 0.24, 0.25, 0.25, 0.26, 0.27, 0.28, 0.29]
    f = only(gradprobe.analyze(_overfit_log(climb, decaying(n, 0.5, 0.02, 0.03))), "GP506")
    assert f.evidence["val_rise"] >= 0.1


def test_gp506_a_climb_that_pauses_is_a_climb():
    # a small fine-tune: the validation loss climbs 6-8% from its best, stepping back now and
    # then, its steps from one evaluation to the next as large as the rise is per step; its
    # order is a rising trend (Kendall), not a noisy band's
    n = 160
    climb = [0.631, 0.541, 0.515, 0.531, 0.553, 0.549, 0.570, 0.562, 0.574, 0.569, 0.585]
    f = only(gradprobe.analyze(_overfit_log(climb, decaying(n, 0.8, 0.02, 0.2))), "GP506")
    assert 0.05 <= f.evidence["val_rise"] < 0.1
    # the same evaluations in an order with no trend (a band over a lucky minimum): quiet
    band = [0.631, 0.541, 0.515, 0.569, 0.531, 0.574, 0.549, 0.585, 0.553, 0.562, 0.570]
    quiet(gradprobe.analyze(_overfit_log(band, decaying(n, 0.8, 0.02, 0.2))), "GP506")
    # a climb of 3%: the best checkpoint is hardly better than the last
    small = [0.631, 0.541, 0.515, 0.517, 0.520, 0.519, 0.523, 0.524, 0.526, 0.527, 0.530]
    quiet(gradprobe.analyze(_overfit_log(small, decaying(n, 0.8, 0.02, 0.2))), "GP506")


def test_gp506_a_model_at_the_trivial_loss_memorises_nothing():
    # shuffled targets: the training loss falls 8% from a noisy start onto the trivial level
    # (MSE = the target variance) and stays; the validation loss creeps up 8% at the end
    n = 300
    train = np.concatenate([np.linspace(1.1, 1.01, 100), np.full(n - 100, 1.01)])
    val = [1.04, 1.02, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09, 1.10]
    steps = list(range(9, n, 27))[: len(val)]

    def log(samples):
        return gradprobe.RunLog.build({"step": list(range(n)), "loss": noisy(train, 0.005), "loss_fn": list(train),
                                       "lr": [1e-3] * n}, meta=meta(), samples=samples,
                                      scalars=[(s, "val_loss", v) for s, v in zip(steps, val)])

    quiet(gradprobe.analyze(log(mse_targets(SAMPLED, train, var=1.0))), "GP506")
    # the same curves where the trivial loss is not known: the curves alone say overfitting
    only(gradprobe.analyze(log(None)), "GP506")


def test_gp506_is_the_cause_of_a_validation_loss_that_climbs_past_3x():
    # memorising 16 examples: the validation loss climbs 7x while the training loss falls
    n = 250
    val = list(np.concatenate([np.linspace(0.42, 0.16, 3), np.linspace(0.2, 1.2, 22)]))
    report = gradprobe.analyze(_overfit_log(val, decaying(n, 1.1, 0.02, 0.1)))
    assert only(report, "GP506")
    spike = report.finding("loss-spike")
    assert spike is None or spike.caused_by == ["overfitting"]
    assert report.findings[0].code == "GP506"


def test_gp506_is_quiet_when_validation_follows_training_or_both_rise():
    n = 300
    down = list(np.linspace(2.0, 0.5, 30))
    quiet(gradprobe.analyze(_overfit_log(down, decaying(n))), "GP506")
    up = list(np.concatenate([np.linspace(2.0, 0.8, 10), np.linspace(0.8, 3.0, 20)]))
    rising_train = np.concatenate([decaying(100), np.linspace(0.3, 3.0, 200)])
    quiet(gradprobe.analyze(_overfit_log(up, rising_train)), "GP506")


def test_gp506_one_noisy_evaluation_is_not_overfitting():
    n = 300
    val = list(np.linspace(2.0, 0.5, 30))
    val[-1] = 0.7
    quiet(gradprobe.analyze(_overfit_log(val, decaying(n))), "GP506")


# ================================================================== real runs ===============
def test_real_adam_with_a_huge_lr(real):
    report = real("adam_huge_lr")
    f = only(report, "GP501")
    assert f.severity == "error" and f.evidence["update_ratio"] > 0.1
    rec = hp(f, "lr")
    assert rec.current == 1.0 and 1e-4 < rec.suggested < 1e-2
    assert report.suggested_hyperparameters["lr"] == rec.suggested
    # the symptoms name it
    assert "lr-too-high" in only(report, "GP504").caused_by
    assert "lr-too-high" in only(report, "GP505").caused_by


def test_real_sgd_with_lr_1e6(real):
    report = real("sgd_tiny_lr")
    f = only(report, "GP502")
    rec = hp(f, "lr")
    assert rec.current == pytest.approx(1e-6)
    # lr x 1e-3 / ratio: three decades or more above the configured lr
    assert rec.suggested == pytest.approx(1e-6 * 1e-3 / f.evidence["update_ratio"], rel=0.05)  # 2 digits
    assert rec.suggested > 1e-4
    assert "lr-too-low" in only(report, "GP505").caused_by
    quiet(report, "GP501")


def test_real_overfitting_a_tiny_dataset(real):
    report = real("overfit_tiny_dataset")
    f = only(report, "GP506")
    assert f.evidence["val_rise"] >= 0.1 and f.evidence["train_fall"] > 0.5
    quiet(report, "GP501", "GP502", "GP504", "GP505")


def test_real_converged_run_with_reduce_lr_on_plateau_at_its_floor(real):
    report = real("converged_plateau_scheduler")
    lr = report.runlog.steps["lr"].to_numpy()
    assert lr[0] == pytest.approx(0.05) and lr[-1] == pytest.approx(1e-6)
    quiet(report, *MY_CODES)


@pytest.mark.parametrize("name, kind", [("stuck_at_mean", "target mean"), ("stuck_at_uniform", "uniform")])
def test_real_stuck_at_the_trivial_predictor(real, name, kind):
    f = only(real(name), "GP505")
    assert kind in f.message
    assert 0.8 <= f.evidence["loss_over_trivial"] <= 1.2


def test_real_bounded_weight_growth_is_not_missing_weight_decay(real):
    quiet(real("growing_weights"), "GP503", "GP501")


@pytest.mark.parametrize("name", ["mlp", "classifier", "cnn", "lstm", "transformer", "lbfgs"])
def test_real_healthy_runs_are_quiet(real, name):
    quiet(real(name), *MY_CODES)


# ================================================================== foreign logs ============
def test_foreign_trainer_state_overfitting_and_spike(tmp_path):
    import json

    hist = []
    for s in range(1, 201):
        hist.append({"loss": 2.0 * math.exp(-s / 40) + 0.05, "grad_norm": 1.0, "learning_rate": 1e-3,
                     "epoch": s / 20, "step": s})
        if s % 20 == 0:
            k = s // 20
            hist.append({"eval_loss": 1.0 - 0.1 * k if k <= 4 else 0.6 + 0.08 * (k - 4), "epoch": k, "step": s})
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 200, "log_history": hist, "logging_steps": 1}))
    report = gradprobe.analyze(str(p))
    f = only(report, "GP506")
    assert f.first_step == 80 and report.source["kind"] == "hf-trainer-state"
    quiet(report, "GP501", "GP502", "GP504", "GP505")


def test_foreign_tensorboard_divergence_as_the_lr_warms_up(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    d = str(tmp_path / "tb")
    w = SummaryWriter(log_dir=d)
    rng = np.random.default_rng(0)
    for s in range(300):
        lr = 1e-4 * min(s + 1, 100)
        loss = 3.0 * math.exp(-s / 30) + 0.3 if s < 100 else 0.35 * math.exp((s - 100) / 40)
        w.add_scalar("train/learning_rate", lr, s)
        w.add_scalar("train/loss", loss * (1 + 0.03 * rng.standard_normal()), s)
    w.close()
    report = gradprobe.analyze(d)
    f = only(report, "GP501")
    assert f.evidence["update_ratio"] is None and f.evidence["lr_following"]["lr_at_onset"] >= 9e-3
    assert hp(f, "lr").suggested < 9e-3 and f.severity == "error"
    assert "as the learning rate climbed" in f.message


def test_foreign_metrics_csv_loss_that_never_moved(tmp_path):
    import csv

    p = tmp_path / "metrics.csv"
    rng = np.random.default_rng(1)
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["epoch", "step", "train_loss_step"])
        w.writeheader()
        for s in range(120):
            w.writerow({"epoch": s // 40, "step": s, "train_loss_step": 12.06 * (1 + 0.01 * rng.standard_normal())})
    f = only(gradprobe.analyze(str(p)), "GP505")
    assert "never decreased" in f.message and f.confidence < 0.75


def _short_csv(path, losses: np.ndarray, every: int = 50) -> str:
    """A Lightning metrics.csv of ``self.log("train_loss", loss)`` every ``every`` steps."""
    return write_metrics(str(path), [((i + 1) * every - 1, {"epoch": i // 10, "train_loss": float(v)})
                                     for i, v in enumerate(losses)])


def test_short_noisy_log_that_never_learned_is_a_plateau(tmp_path):
    # a probe on random features, logged every 50 steps: 28 records at ln 17 with 10% noise,
    # the first one low by chance (nothing fell from it)
    rng = np.random.default_rng(3)
    stuck = 2.9 * (1 + 0.10 * rng.standard_normal(28))
    stuck[0] = 2.35
    stuck[-5:] = 2.9 * np.array([1.08, 0.95, 1.02, 1.05, 0.99])  # it ends 3% above where it began
    f = only(gradprobe.analyze(_short_csv(tmp_path / "stuck.csv", stuck)), "GP505")
    assert "never decreased" in f.message
    # the same, its first logged batch 12% dearer than its level (inside the 10% noise): one
    # hard first batch is not where the loss started, and nothing fell from it
    hard_first = 2.9 * (1 + 0.10 * rng.standard_normal(28))
    hard_first[:5] = 2.9 * np.array([1.12, 0.97, 1.03, 0.95, 1.01])
    hard_first[-5:] = 2.9 * np.array([0.98, 1.01, 0.99, 1.00, 1.02])
    f = only(gradprobe.analyze(_short_csv(tmp_path / "hard_first.csv", hard_first)), "GP505")
    assert "never decreased" in f.message


def test_short_noisy_logs_that_learned_are_not_a_plateau(tmp_path):
    rng = np.random.default_rng(4)
    # as noisy, but falling 30% over the run
    falling = 2.9 * np.linspace(1.0, 0.7, 28) * (1 + 0.10 * rng.standard_normal(28))
    quiet(gradprobe.analyze(_short_csv(tmp_path / "falling.csv", falling)), "GP505")
    # a quiet loss falling 7%: beyond its noise, slow learning is learning
    slow = 1.3 * np.linspace(1.0, 0.93, 25) * (1 + 0.003 * rng.standard_normal(25))
    quiet(gradprobe.analyze(_short_csv(tmp_path / "slow.csv", slow)), "GP505")
    # a robust loss over gross outliers: it fell 15% in its first records, then sat on the floor
    # the outliers set, with noise half its level: a fall is a fall, however noisy
    robust = 1.7 * (1 + 0.5 * np.abs(rng.standard_normal(60)))
    robust[:6] *= 1.25
    quiet(gradprobe.analyze(_short_csv(tmp_path / "robust.csv", robust)), "GP505")
    # converged within its first record, then flat (a model that keeps training at its floor)
    fast = np.full(30, 0.4) * (1 + 0.02 * rng.standard_normal(30))
    fast[0] = 2.3
    quiet(gradprobe.analyze(_short_csv(tmp_path / "fast.csv", fast)), "GP505")
    # under 50 optimizer steps: too young to call stuck
    young = 2.9 * (1 + 0.10 * rng.standard_normal(20))
    quiet(gradprobe.analyze(_short_csv(tmp_path / "young.csv", young, every=2)), "GP505")


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
    slugs = {c.slug for c in [get_rule(x) for x in ("GP101", "GP102", "GP103", "GP201", "GP202", "GP203", "GP204",
                                                     "GP301", "GP302", "GP303", "GP304", "GP305", "GP401", "GP402",
                                                     "GP403", "GP404", "GP501", "GP502", "GP503", "GP504", "GP505",
                                                     "GP506", "GP601", "GP602", "GP603", "GP604", "GP605", "GP701")]
             if c is not None}
    assert set(cls.causes) <= slugs


# ================================================================== robustness ==============
ALL_MINE = MY_CODES + ("GP601", "GP602", "GP603", "GP604", "GP605", "GP701")


def _odd_logs() -> list[gradprobe.RunLog]:
    nan, inf = float("nan"), float("inf")
    rng = np.random.default_rng(7)
    odd_samples = ratio_samples([nan, inf, 0.0] * 6) + mse_targets(SAMPLED[:3], [nan] * 300, var=0.0, pred_std=nan)
    odd_samples += [(0, "activation", "x", "std", 0, nan), (0, "activation", "x", "dead_frac", 0, inf),
                    (1, "gates", "lstm.l0.input", "low_frac", 0, nan), (0, "first_layer", "x", "std", 0, 0.0),
                    (0, "input", "y", "integer", 0, 1.0)]
    return [
        gradprobe.RunLog.build({}),
        build(1, [1.0]),
        build(30, [nan] * 30),
        build(30, [inf] * 30),
        build(60, list(-np.abs(rng.standard_normal(60)) * 1e3)),
        build(60, [0.0] * 60),
        build(60, list(np.geomspace(1e-30, 1e30, 60))),
        build(300, list(rng.standard_normal(300)), samples=odd_samples),
        build(40, [1.0] * 40, kind="tensorboard", m={"signals": ["loss", "duplicates"],
                                                      "raw_records": {"loss": {"name": "loss", "step": []}}}),
        gradprobe.RunLog.build({"step": [0, 0, 1, 1], "loss": [1.0, 1.0, 2.0, 2.0]}, kind="lightning-csv",
                               meta={"signals": ["loss", "duplicates"], "raw_steps": "garbage", "duplicates": {"x": 3}}),
    ]


@pytest.mark.parametrize("k", range(10))
def test_rules_never_crash_on_odd_logs(k):
    report = gradprobe.analyze(_odd_logs()[k])
    errors = [(s.code, s.reason) for s in report.skipped_rules if s.code in ALL_MINE and "rule error" in s.reason]
    assert not errors, errors
    for f in report.findings:
        assert 0.0 <= f.confidence <= 1.0
