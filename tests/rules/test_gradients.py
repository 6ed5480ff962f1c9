"""GP201-GP204 (gradient magnitude): firing and healthy cases, on synthetic RunLogs and on
real tiny CPU runs (see ``_runs_recurrent``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.analysis import RunContext, grad_spikes, stable_window, suggested_max_norm
from gradprobe.report import CANONICAL_HYPERPARAMETERS, Finding, Report
from gradprobe.rules import get_rule
from tests.rules import _runs_recurrent as R

GRAD_CODES = ("GP201", "GP202", "GP203", "GP204")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny real runs are latency-bound: one intra-op thread is several times faster than
    two on a shared CPU, where OpenMP threads spin waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code}, got {[(f.code, f.message) for f in report.findings]}"
    return found[0]


def quiet(report: Report, *codes: str) -> None:
    noisy = [(f.code, f.severity, f.message) for f in report.findings if f.code in codes and f.severity != "info"]
    assert not noisy, noisy


def opt_meta(cls: str = "SGD", lr: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {"optimizers": [{"index": 0, "class": cls, "param_groups": [dict({"lr": lr}, **extra)]}]}


def layers_meta(names: list[str], shapes: list[list[int]]) -> dict[str, Any]:
    layers = [{"name": n, "shape": s, "numel": int(np.prod(s)), "module": n.rsplit(".", 1)[0]}
              for n, s in zip(names, shapes)]
    return {"layer_segments": [{"id": 0, "first_step": 0, "layers": layers}]}


def clip_log(n: int, *, preclip: np.ndarray, max_norm: float, loss: np.ndarray, optimizer: str = "SGD",
             lr: float = 0.5, numel: int = 10_000, clip_on_scaled: bool = False, **extra: Any) -> gradprobe.RunLog:
    post = np.minimum(preclip, max_norm)
    meta = dict(opt_meta(optimizer, lr, eps=1e-8), **layers_meta(["w"], [[numel]]))
    return gradprobe.RunLog.build(
        {"step": np.arange(n), "loss": loss, "grad_norm": preclip, "step_grad_norm": post, "lr": [lr] * n,
         "clip_calls": [1] * n, "clip_max_norm": [max_norm] * n, "clip_on_scaled": [clip_on_scaled] * n, **extra},
        meta=meta)


# ================================================================== GP201 ===================
RNG = np.random.default_rng(0)
N = 120
PRECLIP = 0.2 * RNG.lognormal(0, 0.2, N)
FLAT = 3.9 - 0.0005 * np.arange(N) + 0.02 * RNG.standard_normal(N)
FALLING = 1.3 + 2.6 * np.exp(-np.arange(N) / 20) + 0.02 * RNG.standard_normal(N)


def test_gp201_sgd_step_cut_20x_with_a_flat_loss_fires():
    f = only(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=FLAT)), "GP201")
    assert f.rule == "overclipping" and f.severity == "error" and f.first_step == 0
    assert f.evidence["clipped_fraction"] == 1.0
    assert f.evidence["median_shrink"] == pytest.approx(0.05, rel=0.1)
    assert f.evidence["effective_lr"] == pytest.approx(0.5 * f.evidence["median_shrink"])
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "max_norm" and rec.current == pytest.approx(0.01)
    warm = max(1, min(50, N // 10))
    assert rec.suggested == pytest.approx(np.percentile(PRECLIP[warm:], 95), rel=0.02)
    assert f.confidence > 0.85


def test_gp201_a_low_first_batch_does_not_read_as_a_rising_loss():
    # a stationary loss whose first record happened to be an easy batch: 8% "above" it at the
    # end, well within one record's noise; the steps are cut 20x, the loss does not move
    rng = np.random.default_rng(11)
    loss = 0.49 + 0.04 * rng.standard_normal(N)
    loss[0] = 0.40
    f = only(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=loss)), "GP201")
    assert f.severity == "error"
    # a loss that really rose (by 10% and by noise) is not what clipping causes
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=np.linspace(0.49, 0.8, N))), "GP201")


def test_gp201_a_run_that_stays_at_the_untrained_level_barely_moved_but_one_that_blew_up_did_not():
    # the loss drifted 12% down (batch noise of a 5-record window) yet sits at the trivial level
    rng = np.random.default_rng(12)
    var = 0.49
    loss = var * (1.0 + 0.05 * rng.standard_normal(N))
    loss[:8] *= 1.14
    tgt = [(s, "target", "mse_loss", k, 0, v) for s in range(0, N, 6) for k, v in
           (("numel", 32), ("mean", 0.0), ("std", var ** 0.5), ("var", var), ("absmax", 2.0), ("integer", 0),
            ("pred_std", 0.05), ("pred_mean", 0.0), ("pred_feature_std_max", 0.05))]
    log = clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=loss)
    log = gradprobe.RunLog.build(log.steps.assign(loss_fn=loss), meta=log.meta, samples=tgt)
    assert only(gradprobe.analyze(log), "GP201")
    blown = loss * 3000.0  # 3000x the trivial level: a run that blew up, not one clipping held still
    log = clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=blown)
    log = gradprobe.RunLog.build(log.steps.assign(loss_fn=blown), meta=log.meta, samples=tgt)
    quiet(gradprobe.analyze(log), "GP201")


def test_gp201_word_language_model_recipe_is_healthy():
    # SGD lr 20, max_norm 0.05: clipped on every step, 4x, and the loss falls well
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.05, loss=FALLING, lr=20.0)), "GP201")


def test_gp201_adam_normalises_clipping_away():
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=FLAT, optimizer="Adam", lr=1e-3)),
          "GP201")


def test_gp201_adam_clipped_down_to_eps_fires():
    # 1e6 parameters, clipped to norm 1e-6: per-element RMS 1e-9 << eps 1e-8
    log = clip_log(N, preclip=PRECLIP, max_norm=1e-6, loss=FLAT, optimizer="AdamW", lr=1e-3, numel=1_000_000)
    f = only(gradprobe.analyze(log), "GP201")
    assert f.evidence["clipped_grad_rms"] < f.evidence["eps"]
    assert f.evidence["effective_update_factor"] < 0.2


def test_gp201_rare_or_mild_clipping_is_quiet():
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.25, loss=FLAT)), "GP201")  # rarely clips
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.12, loss=FLAT)), "GP201")  # cuts < 2x


def test_gp201_clipping_scaled_gradients_is_left_to_scaler_misuse():
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=FLAT, clip_on_scaled=True)), "GP201")


def test_gp201_line_search_optimizers_are_not_judged():
    quiet(gradprobe.analyze(clip_log(N, preclip=PRECLIP, max_norm=0.01, loss=FLAT, optimizer="LBFGS")), "GP201")


def test_real_sgd_overclipping_cripples_learning(logdir):
    R.sgd_overclipped(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP201")
    assert f.severity == "error" and f.evidence["clipped_fraction"] > 0.95
    assert f.evidence["median_shrink"] < 0.1 and abs(f.evidence["relative_loss_decrease"]) < 0.05
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "max_norm" and rec.suggested > 10 * rec.current
    assert report.suggested_hyperparameters["max_norm"] == rec.suggested


def test_real_word_language_model_clipping_every_step_is_healthy(logdir):
    R.word_lm(logdir)
    report = gradprobe.analyze(logdir)
    log = report.runlog
    st = log.steps
    clipped = (st["step_grad_norm"] < 0.999 * st["grad_norm"]).mean()
    assert clipped > 0.9  # the recipe clips (nearly) every step...
    quiet(report, *GRAD_CODES)  # ...and is healthy


# ================================================================== GP202 ===================
def spike_log(norms: np.ndarray, *, layers: dict[str, np.ndarray] | None = None, clip: float | None = None,
              loss: np.ndarray | None = None, meta: dict[str, Any] | None = None, **extra: Any) -> gradprobe.RunLog:
    n = len(norms)
    post = np.minimum(norms, clip) if clip is not None else norms
    cols = {"step": np.arange(n), "grad_norm": norms, "step_grad_norm": post,
            "loss": loss if loss is not None else 2.0 - np.arange(n) / (2 * n), "lr": [0.1] * n,
            "clip_calls": [1 if clip is not None else 0] * n,
            "clip_max_norm": [clip if clip is not None else math.nan] * n, **extra}
    m = dict(opt_meta("SGD", 0.1), **(meta or {}))
    if layers:
        m.update(layers_meta(list(layers), [[16, 16]] * len(layers)))
    return gradprobe.RunLog.build(cols, meta=m, layer_grad=layers)


def test_gp202_spike_names_the_layer_it_starts_in():
    n = 60
    base = 1.0 + 0.1 * np.sin(np.arange(n))
    layers = {"encoder.weight": 0.3 * base.copy(), "rnn.weight_hh_l0": 0.5 * base.copy(),
              "rnn.weight_ih_l0": 0.4 * base.copy(), "decoder.weight": 0.7 * base.copy()}
    for name, factor in (("encoder.weight", 400.0), ("rnn.weight_hh_l0", 900.0), ("rnn.weight_ih_l0", 300.0)):
        layers[name][30] *= factor  # the decoder stays calm: the amplification arose in the RNN
    norms = np.sqrt(sum(v**2 for v in layers.values()))
    f = only(gradprobe.analyze(spike_log(norms, layers=layers)), "GP202")
    # >= 100x and nothing clipped it, but the loss did not feel it: a fact, not a fault
    assert f.rule == "exploding-gradients" and f.severity == "info"
    assert f.first_step == 30 and f.layer == "rnn.weight_hh_l0"
    assert f.evidence["pattern"] == "spike" and f.evidence["max_ratio"] > 100
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "max_norm" and rec.current is None
    assert rec.suggested == pytest.approx(np.percentile(norms[6:30], 95), rel=0.05)  # before the explosion


def test_gp202_geometric_growth_fires():
    norms = np.concatenate([np.full(20, 1.0), 1.6 ** np.arange(1, 16)])
    f = only(gradprobe.analyze(spike_log(norms)), "GP202")
    assert f.evidence["pattern"] in ("geometric growth", "spike")
    assert f.severity == "warning"  # compounding growth is a warning even before it hurts the loss
    loss = np.where(np.arange(len(norms)) >= 30, 9.0, 2.0)  # ... and an error once the loss jumps with it
    assert only(gradprobe.analyze(spike_log(norms, loss=loss)), "GP202").severity == "error"


def test_gp202_noisy_norms_are_quiet():
    rng = np.random.default_rng(1)
    quiet(gradprobe.analyze(spike_log(rng.lognormal(0, 0.5, 500))), "GP202", "GP204")


def test_gp202_decaying_norms_of_a_converging_run_are_quiet():
    rng = np.random.default_rng(2)
    norms = 2.0 * np.exp(-np.arange(300) / 10) * rng.lognormal(0, 0.3, 300)  # down to ~1e-13
    quiet(gradprobe.analyze(spike_log(norms)), "GP202", "GP204")


def test_gp202_rare_spike_contained_by_clipping_is_info():
    rng = np.random.default_rng(3)
    norms = rng.lognormal(0, 0.2, 200)
    norms[120] = 50.0
    f = only(gradprobe.analyze(spike_log(norms, clip=2.0)), "GP202")
    assert f.severity == "info" and f.evidence["contained_by_clipping"]
    assert not [r for r in f.recommendations if r.kind == "hyperparameter"]


def test_gp202_an_isolated_unclipped_spike_the_loss_does_not_feel_is_info_recurring_ones_a_warning():
    rng = np.random.default_rng(4)
    norms = rng.lognormal(0, 0.2, 200)
    norms[120] = 20.0
    f = only(gradprobe.analyze(spike_log(norms)), "GP202")
    assert f.severity == "info" and 0.4 <= f.confidence < 0.7 and "did not feel" in f.message
    norms[[140, 170]] = 25.0  # three unbounded spikes the loss does not feel: still facts, not a regime
    assert only(gradprobe.analyze(spike_log(norms)), "GP202").severity == "info"
    norms[60:200:10] = 25.0  # one step in ten spikes: the run lives in an unstable regime
    assert only(gradprobe.analyze(spike_log(norms)), "GP202").severity == "warning"


def test_gp202_frequent_spikes_within_the_norms_own_scatter_of_decades_are_info():
    """Batches of one example: per-example gradient norms differ by orders of magnitude, so
    records 10x (and 1000x) their level are the ordinary spread, not a regime of explosions."""
    rng = np.random.default_rng(4)
    norms = rng.lognormal(0, 3.0, 200)  # ~1.3 decades of scatter
    f = only(gradprobe.analyze(spike_log(norms)), "GP202")
    assert f.evidence["spike_fraction"] >= 0.05 and f.severity == "info" and "ordinary spread" in f.message
    assert 1.0 < f.evidence["scatter_decades"] < 1.6


def test_gp202_a_loss_jump_too_small_to_matter_at_convergence_is_no_harm():
    """A converged run (loss 1e-6 after starting at 2) whose tiny loss triples after a spike:
    the rise undoes nothing the run had bought."""
    rng = np.random.default_rng(6)
    n = 200
    norms = 1e-4 * rng.lognormal(0, 0.2, n)
    norms[:20] = 1.0
    norms[120] = 1e-2
    loss = np.where(np.arange(n) < 20, 2.0, np.where(np.arange(n) > 120, 3e-6, 1e-6))
    f = gradprobe.analyze(spike_log(norms, loss=loss)).finding("GP202")
    assert f is None or f.severity != "error"


def test_gp202_spike_followed_by_a_loss_jump_is_an_error():
    rng = np.random.default_rng(5)
    norms = rng.lognormal(0, 0.2, 100)
    norms[50] = 20.0
    loss = np.where(np.arange(100) > 50, 6.0, 2.0)
    f = only(gradprobe.analyze(spike_log(norms, loss=loss)), "GP202")
    assert f.severity == "error" and f.evidence["loss_after_over_before"] == pytest.approx(3.0)


def test_gp202_spikes_within_the_scale_the_run_already_trained_at_are_quiet():
    # a run that converges (or memorises) shrinks its gradient 10x; its ordinary scatter then
    # reaches 10x the shrunken level but never the scale of the start: not an explosion
    rng = np.random.default_rng(12)
    n = 250
    norms = np.where(np.arange(n) < 40, 0.35, 0.03) * rng.lognormal(0, 0.15, n)
    norms[[150, 190]] = [0.4, 0.45]  # 13-15x the level, 1.3x the sustained start
    quiet(gradprobe.analyze(spike_log(norms)), "GP202", "GP204")
    norms[150] = 5.0  # 14x above anything sustained: an explosion
    assert only(gradprobe.analyze(spike_log(norms)), "GP202").first_step == 150


def test_gp202_clipped_back_to_the_sustained_scale_is_contained():
    rng = np.random.default_rng(13)
    n = 250
    norms = np.where(np.arange(n) < 40, 0.9, 0.1) * rng.lognormal(0, 0.1, n)
    norms[[150, 200]] = 4.0
    f = only(gradprobe.analyze(spike_log(norms, clip=1.0)), "GP202")  # clipped to 1.0 ~ the start's scale
    assert f.severity == "info" and f.evidence["contained_by_clipping"]


def test_gp202_tiny_targets_are_not_judged():
    # targets of RMS 1e-7: the residual, and the gradient, jump from the targets' scale to the
    # first step's (GP602 says why); nothing exploded
    n = 40
    norms = np.concatenate([[3.6e-8], np.full(n - 1, 4.7e-3)])
    tgt = [(s, "target", "mse_loss", k, 0, v) for s in (0, 1, 2, 3, 5) for k, v in
           (("numel", 32), ("mean", 1e-8), ("std", 3e-8), ("var", 9e-16), ("absmax", 9e-8), ("integer", 0))]
    log = gradprobe.RunLog.build({"step": np.arange(n), "grad_norm": norms, "step_grad_norm": norms,
                                  "loss": np.full(n, 1e-7), "lr": [3e-3] * n}, meta=opt_meta("Adam", 3e-3),
                                 samples=tgt)
    quiet(gradprobe.analyze(log), "GP202")
    assert only(gradprobe.analyze(spike_log(norms)), "GP202")  # the same norms with ordinary targets fire


def test_gp202_a_gradient_that_follows_a_harder_data_stream_did_no_harm_of_its_own():
    # new classes join the data at step 60: the loss of the first such batch is already 30x its
    # level (computed before any update on them), the gradient jumps with it, and the loss stays
    # high while the model learns them; the rise is the data's, not this gradient's doing
    rng = np.random.default_rng(15)
    n = 120
    norms = rng.lognormal(0, 0.1, n)
    loss = 0.1 * rng.lognormal(0, 0.1, n)
    norms[60:64] *= 40
    loss[60:] = 3.0 * np.exp(-np.arange(n - 60) / 200) * rng.lognormal(0, 0.1, n - 60)
    g = only(gradprobe.analyze(spike_log(norms, loss=loss)), "GP202")
    assert "loss-spike" in g.caused_by and g.severity != "error"


def _harder_stream(n: int = 160) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """A data stream that gets harder at step 60: the gradient 20x for 10 steps, the loss high
    from the first new batch and brought down since. Returns (norms, loss, rng)."""
    rng = np.random.default_rng(15)
    norms = rng.lognormal(0, 0.1, n)
    loss = 0.1 * rng.lognormal(0, 0.1, n)
    norms[60:70] *= 20
    loss[60:] = 3.0 * np.exp(-np.arange(n - 60) / 30) + 0.15
    return norms, loss, rng


def test_gp504_a_loss_that_jumped_with_harder_data_was_not_knocked_off_course():
    # the step before the jump ordinary, the loss high from the first new batch and brought
    # down since: not a set-back
    norms, loss, rng = _harder_stream()
    n = len(norms)
    f = only(gradprobe.analyze(spike_log(norms, loss=loss)), "GP504")
    assert f.severity == "info" and f.evidence["training"]["harder_data"] == 1 and "data got harder" in f.message
    # an exploded update one step before (the gradient 40x its level at step 59): the weights
    f = only(gradprobe.analyze(spike_log(np.where(np.arange(n) == 59, 40.0, norms), loss=loss)), "GP504")
    assert f.severity == "warning" and "harder_data" not in f.evidence["training"]
    # the weights rescaled between steps (their norm 8x into the jump's step): not the data
    wn = np.where(np.arange(n) >= 60, 80.0, 10.0)
    f = only(gradprobe.analyze(spike_log(norms, loss=loss, weight_norm=wn)), "GP504")
    assert f.severity == "warning" and "harder_data" not in f.evidence["training"]
    # the updates after the first new batch pushed the loss 3x higher and it settled above where
    # the new data began: the run lost ground to the updates
    lifted = loss.copy()
    lifted[61:70] *= 3.0
    lifted[70:] = 3.5 * rng.lognormal(0, 0.05, n - 70)
    f = only(gradprobe.analyze(spike_log(norms, loss=lifted)), "GP504")
    assert f.severity in ("warning", "error")


def test_harder_data_is_no_harm_any_lr_did():
    """GP501 counts a loss spike as the lr's harm only when an update could have caused it: the
    jump of a harder data stream after an ordinary step is no harm; the same jump one step
    after an exploded update is."""
    from gradprobe.analysis import loss_harm
    from gradprobe.analysis.context import RunContext

    norms, loss, _ = _harder_stream()
    assert "spikes" not in loss_harm(RunContext(spike_log(norms, loss=loss)))
    exploded = np.where(np.arange(len(norms)) == 59, 40.0, norms)
    assert loss_harm(RunContext(spike_log(exploded, loss=loss)))["spikes"]["step"] == 60


def test_gp202_spike_on_a_batch_whose_loss_already_jumped_is_the_loss_spikes_symptom():
    # a stretch of corrupt batches: the loss of those very batches is 30x its level, and the
    # gradient follows it; the gradient spike cannot have caused a loss computed before it
    rng = np.random.default_rng(14)
    n = 100
    norms = rng.lognormal(0, 0.1, n)
    loss = 0.1 * rng.lognormal(0, 0.1, n)
    norms[60:64] *= 40
    loss[60:64] = 3.0
    report = gradprobe.analyze(spike_log(norms, loss=loss))
    g = only(report, "GP202")
    spike = only(report, "GP504")
    assert "loss-spike" in g.caused_by and g.evidence["loss_spike_step"] == 60
    assert g.severity != "error"  # the loss's rise came before the gradient: it is the spike's harm
    assert "exploding-gradients" not in spike.caused_by  # no cycle: the loss is the root
    assert report.findings[0].code == "GP504"


def test_real_mlp_diverging_explodes(logdir):
    R.mlp_diverging(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP202")
    assert f.severity == "error" and f.layer is not None
    assert "nonfinite_step" in f.evidence and f.evidence["nonfinite_step"] > f.first_step


def test_real_rnn_spiking_unclipped(logdir):
    R.rnn_spiking_unclipped(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP202")
    assert f.layer is not None and f.layer.startswith("rnn.")
    g = only(report, "GP204")
    assert g.severity == "warning" and g.caused_by == ["exploding-gradients"]
    (rec,) = [r for r in g.recommendations if r.kind == "hyperparameter"]
    log = report.runlog
    norms = log.steps["grad_norm"].to_numpy()
    assert rec.name == "max_norm" and np.median(norms) < rec.suggested < np.nanmax(norms)
    # SGD at lr 10 moves the weights by ~30% of their norm per step, and the loss doubled at
    # step 2, before the gradient spiked at step 3: the step size made the spike (GP501), the
    # missing guard let it through; the guard's max_norm is the symptom's, the lr the cause's
    low = only(report, "GP501")
    assert low.evidence["update_ratio"] > 0.1 and f.caused_by == ["lr-too-high"]
    assert "lr" in report.suggested_hyperparameters and "not merged" in rec.reason
    # root cause first: the lr, then the exploding symptom, then the missing guard
    order = [x.code for x in report.findings]
    assert order[0] == "GP501" and order.index("GP202") < order.index("GP204")


# ================================================================== GP203 ===================
def depth_log(rel: list[float], *, names: list[str] | None = None, n: int = 40, optimizer: str = "SGD",
              samples: list[tuple[int, str, str, str, int, float]] | None = None, loss: np.ndarray | None = None,
              ) -> gradprobe.RunLog:
    names = names or [f"{i}.weight" for i in range(len(rel))]
    rng = np.random.default_rng(6)
    grads = {nm: r * rng.lognormal(0, 0.2, n) for nm, r in zip(names, rel)}
    weights = {nm: np.ones(n) for nm in names}
    total = np.sqrt(sum(v**2 for v in grads.values()))
    meta = dict(opt_meta(optimizer, 0.05, eps=1e-8), **layers_meta(names, [[32, 32]] * len(names)))
    return gradprobe.RunLog.build(
        {"step": np.arange(n), "grad_norm": total, "step_grad_norm": total, "lr": [0.05] * n,
         "loss": loss if loss is not None else 3.0 - np.arange(n) / n, "weight_norm": [math.sqrt(len(names))] * n},
        meta=meta, layer_grad=grads, layer_weight=weights, samples=samples)


def test_gp203_gradients_vanishing_with_depth_fire():
    rel = [10.0 ** (-8 + k) for k in range(8)]  # a decade per layer
    f = only(gradprobe.analyze(depth_log(rel)), "GP203")
    assert f.rule == "vanishing-gradients" and f.severity == "warning"
    assert f.layer == "0.weight" and f.evidence["decades"] == pytest.approx(6, abs=0.3)
    assert f.evidence["rank_correlation"] > 0.95 and f.confidence > 0.7


def test_gp203_similar_scales_are_quiet():
    quiet(gradprobe.analyze(depth_log([0.05, 0.2, 0.1, 0.03, 0.3, 0.08])), "GP203")


def test_gp203_one_odd_layer_is_not_a_depth_trend():
    quiet(gradprobe.analyze(depth_log([1e-6, 0.1, 0.3, 0.05, 0.2, 0.1, 0.4, 0.2])), "GP203")


def test_gp203_embedding_table_is_not_an_early_layer():
    # word LM: a sparse embedding ("encoder", fed integer ids) far below the rest
    names = ["encoder.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "decoder.weight"]
    ids = [(0, "input", "lm", "integer", 0, 1.0), (0, "input", "lm", "numel", 0, 700.0)]
    quiet(gradprobe.analyze(depth_log([1e-6, 1e-2, 8e-3, 2e-2], names=names, samples=ids)), "GP203")
    # the same numbers from a float input (no embedding) are a depth trend over 4 layers
    assert only(gradprobe.analyze(depth_log([1e-6, 1e-4, 1e-3, 2e-2], names=names)), "GP203")


def test_gp203_adam_depth_trend_is_info_unless_below_eps():
    rel = [10.0 ** (-6 + k) for k in range(6)]
    f = only(gradprobe.analyze(depth_log(rel, optimizer="Adam")), "GP203")
    assert f.severity == "info"  # early grad RMS ~ 3e-8 > eps
    rel = [10.0 ** (-12 + k * 2) for k in range(6)]
    assert only(gradprobe.analyze(depth_log(rel, optimizer="Adam")), "GP203").severity == "warning"


def test_gp203_layers_with_exactly_zero_gradients_take_no_part():
    # a zero input makes the first layer's gradient exactly 0: no gradient path, not a small one
    n = 40
    rel = [0.0, 0.05, 0.2, 0.1, 0.3]
    quiet(gradprobe.analyze(depth_log(rel, n=n)), "GP203")


def test_gp203_depth_trend_is_the_cause_of_small_steps_not_their_symptom():
    rel = [10.0 ** (-8 + k) for k in range(8)]
    report = gradprobe.analyze(depth_log(rel))
    assert "lr-too-low" not in only(report, "GP203").caused_by


def test_gp203_negligible_sgd_steps_from_a_tiny_lr_name_lr_too_low():
    n = 60
    ratios = [(s, "update", "w", "ratio", 0, 1e-8) for s in (0, 1, 2, 3, 5, 7, 10, 15, 22, 32, 46)]
    tgt = [(s, "target", "mse_loss", k, 0, v) for s in (0, 1, 2, 3, 5, 7, 10, 15, 22, 32, 46) for k, v in
           (("numel", 32), ("mean", 0.0), ("std", 1.0), ("var", 1.0), ("absmax", 3.0), ("integer", 0),
            ("pred_std", 0.1), ("pred_mean", 0.0), ("pred_feature_std_max", 0.1))]
    meta = dict(opt_meta("SGD", 1e-7), **layers_meta(["w"], [[32, 32]]))
    log = gradprobe.RunLog.build(
        {"step": np.arange(n), "grad_norm": np.full(n, 0.4), "loss": 1.0 + 0.01 * np.sin(np.arange(n)),
         "loss_fn": 1.0 + 0.01 * np.sin(np.arange(n)), "lr": [1e-7] * n, "weight_norm": [5.0] * n},
        meta=meta, samples=ratios + tgt)
    report = gradprobe.analyze(log)
    f = only(report, "GP203")
    assert f.severity == "error" and f.caused_by == ["lr-too-low"]
    assert report.findings[0].code == "GP502"


def test_gp203_all_gradients_zero_with_a_flat_loss_is_an_error():
    n = 30
    log = gradprobe.RunLog.build({"step": np.arange(n), "grad_norm": np.zeros(n), "step_grad_norm": np.zeros(n),
                                  "loss": np.full(n, 2.3), "lr": [0.1] * n, "weight_norm": [5.0] * n},
                                 meta=opt_meta("SGD", 0.1))
    f = only(gradprobe.analyze(log), "GP203")
    assert f.severity == "error" and f.evidence["negligible_fraction"] == 1.0


def test_gp203_sgd_updates_below_float32_resolution_fire():
    n = 30
    log = gradprobe.RunLog.build({"step": np.arange(n), "grad_norm": np.full(n, 1e-7), "loss": np.full(n, 2.3),
                                  "lr": [0.01] * n, "weight_norm": [10.0] * n}, meta=opt_meta("SGD", 0.01))
    f = only(gradprobe.analyze(log), "GP203")
    assert "float32 epsilon" in f.evidence["criterion"]


def test_gp203_vanished_gradients_of_a_converged_run_are_quiet():
    n = 30
    loss = np.concatenate([[1.3, 0.5, 0.01], np.zeros(n - 3)])
    norms = np.concatenate([[1.0, 0.5, 0.01], np.zeros(n - 3)])
    log = gradprobe.RunLog.build({"step": np.arange(n), "grad_norm": norms,
                                  "loss": loss, "lr": [0.1] * n, "weight_norm": [5.0] * n}, meta=opt_meta("SGD", 0.1))
    quiet(gradprobe.analyze(log), "GP203", "GP202")


def test_real_deep_sigmoid_mlp_vanishes_with_depth(logdir):
    R.deep_sigmoid_mlp(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP203")
    assert f.severity == "warning" and f.layer == "0.weight" and f.evidence["decades"] > 4
    quiet(report, "GP202")


# ================================================================== GP204 ===================
def test_gp204_recurrent_spike_without_clipping_fires():
    rng = np.random.default_rng(7)
    norms = rng.lognormal(0, 0.2, 100)
    norms[40] = 30.0
    meta = {"recurrent": [{"module": "rnn", "class": "LSTM", "hidden_size": 10, "lookback": 400}]}
    f = only(gradprobe.analyze(spike_log(norms, meta=meta)), "GP204")
    assert f.rule == "missing-gradient-clipping" and f.severity == "warning" and f.first_step == 40
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "max_norm" and 1.0 < rec.suggested < 2.0
    assert "clip_grad_norm_" in [r for r in f.recommendations if r.kind == "code"][0].snippet


def test_gp204_quiet_when_clipping_or_not_recurrent():
    rng = np.random.default_rng(8)
    norms = rng.lognormal(0, 0.2, 100)
    norms[40] = 30.0
    meta = {"recurrent": [{"module": "rnn", "class": "LSTM", "hidden_size": 10, "lookback": 400}]}
    quiet(gradprobe.analyze(spike_log(norms, meta=meta, clip=3.0)), "GP204")
    quiet(gradprobe.analyze(spike_log(norms)), "GP204")  # one spike in a feed-forward run: GP202's
    norms[[60, 75]] = 25.0  # three spikes in a feed-forward run: still GP202's, never "missing clipping"
    quiet(gradprobe.analyze(spike_log(norms)), "GP204")
    assert only(gradprobe.analyze(spike_log(norms)), "GP202")


def test_stable_window_and_suggested_max_norm_exclude_spikes():
    norms = np.ones(100)
    norms[50] = 1e4
    ctx = RunContext(spike_log(norms))
    assert grad_spikes(ctx).rows.tolist() == [50]
    mask = stable_window(ctx)
    assert not mask[:10].any() and mask[10:50].all() and not mask[50:].any()  # the 40 steps before the spike
    sug = suggested_max_norm(ctx)
    assert sug.value == 1.0 and sug.details["n"] == mask.sum() and sug.details["window"] == [10, 49]
    norms[5] = 1e4  # too few steps before the spike: spikes and their aftermath are cut out instead
    ctx = RunContext(spike_log(norms))
    mask = stable_window(ctx)
    assert not mask[:10].any() and mask[10:50].all() and not mask[50:53].any() and mask[53:].all()


# ================================================================== catalog =================
@pytest.mark.parametrize("code", GRAD_CODES)
def test_rule_documents_itself(code):
    cls = get_rule(code)
    assert cls is not None and "Confidence" in (cls.__doc__ or "")
    for attr in ("what", "why", "causes", "fix", "example"):
        assert getattr(cls.explanation, attr).strip()
    assert set(cls.computes) <= set(CANONICAL_HYPERPARAMETERS)
