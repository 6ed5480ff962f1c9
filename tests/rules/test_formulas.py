"""Each rule's recommended values follow the formula its catalog entry documents
(``Rule.computes``), on a real tiny run where the rule fires: the test recomputes the number
from the recorded log, by the documented formula, and compares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradprobe
from gradprobe.analysis import (
    RunContext,
    grad_spikes,
    nice,
    stable_window,
    update_ratio_by_step,
)
from gradprobe.report import Finding, Recommendation
from gradprobe.rules.base import get_rule
from tests.helpers import mlp, regression_batches
from tests.rules import _runs_recurrent as RR
from tests.rules import _runs_training as RT
from tests.rules.test_amp import _amp_run

#: every hyperparameter a rule computes, and the test that checks it
COVERED = {
    "GP102": {"lookback"}, "GP201": {"max_norm"}, "GP202": {"max_norm"}, "GP204": {"max_norm"},
    "GP301": {"init_scale", "growth_interval"}, "GP302": {"amp_dtype"}, "GP303": {"init_scale"}, "GP501": {"lr", "warmup_steps"},
    "GP502": {"lr"}, "GP503": {"weight_decay"},
}


def test_every_computed_hyperparameter_has_a_formula_test():
    from gradprobe.rules.base import registry

    declared = {cls.code: set(cls.computes) for cls in registry() if cls.computes}
    assert declared == COVERED


def _finding(report: gradprobe.Report, code: str) -> Finding:
    f = report.finding(code)
    assert f is not None, [x.code for x in report.findings]
    return f


def _hp(f: Finding, name: str) -> Recommendation:
    recs = [r for r in f.recommendations if r.kind == "hyperparameter" and r.name == name]
    assert recs, f"{f.code} recommends no {name}: {[r.to_json() for r in f.recommendations]}"
    assert recs[0].suggested is not None, recs[0].reason
    return recs[0]


def _p95_of_stable_window(log_dir: str) -> float:
    """MAX_NORM_FORMULA, recomputed: the 95th percentile of the pre-clip norms over the stable
    window, to 2 significant digits."""
    ctx = RunContext(gradprobe.RunLog.load(log_dir))
    norms = grad_spikes(ctx).norm[stable_window(ctx)]
    norms = norms[np.isfinite(norms) & (norms > 0)]
    assert norms.size >= 5
    return nice(float(np.percentile(norms, 95)))


def test_gp201_max_norm_is_the_95th_percentile_of_the_stable_window(tmp_path):
    d = RR.sgd_overclipped(str(tmp_path / "run"))
    rec = _hp(_finding(gradprobe.analyze(d), "GP201"), "max_norm")
    assert rec.suggested == _p95_of_stable_window(d) and rec.suggested > rec.current


def test_gp202_and_gp204_max_norm_is_the_95th_percentile_of_the_stable_window(tmp_path):
    d = RR.rnn_spiking_unclipped(str(tmp_path / "run"))
    report = gradprobe.analyze(d)
    want = _p95_of_stable_window(d)
    for code in ("GP202", "GP204"):
        rec = _hp(_finding(report, code), "max_norm")
        assert rec.current is None and rec.suggested == want, code
    # recommendations come from the healthy part only: never above a norm the run trained with
    ctx = RunContext(gradprobe.RunLog.load(d))
    assert want <= float(np.nanmax(ctx.grad_norm[stable_window(ctx)]))


def _bptt(log_dir: str, module: str) -> dict[str, np.ndarray]:
    s = gradprobe.RunLog.load(log_dir).samples_of("bptt")
    s = s[(s["target"].astype(str) == module) & (s["stat"] != "profile")]
    piv = s.pivot_table(index="step", columns="stat", values="value", aggfunc="last").sort_index()
    recent = piv.iloc[len(piv) // 2:] if len(piv) >= 2 else piv
    return {c: recent[c].to_numpy(dtype=np.float64) for c in recent.columns}


def test_gp102_lookback_vanishing_is_twice_the_median_horizon(tmp_path):
    d = RR.gru_past_horizon(str(tmp_path / "run"))
    f = _finding(gradprobe.analyze(d), "GP102")
    rec = _hp(f, "lookback")
    b = _bptt(d, f.layer)
    T = float(np.nanmedian(b["lookback"]))
    assert rec.current == int(T)
    assert rec.suggested == int(min(T, math.ceil(2 * max(float(np.nanmedian(b["horizon"])), 1.0))))


def test_gp102_lookback_exploding_keeps_the_growth_within_10x(tmp_path):
    d = RR.vanilla_rnn_exploding(str(tmp_path / "run"))
    f = _finding(gradprobe.analyze(d), "GP102")
    rec = _hp(f, "lookback")
    b = _bptt(d, f.layer)
    g = float(np.nanmedian(b["growth_per_step"]))
    T = float(np.nanmedian(b["lookback"]))
    assert rec.suggested == int(min(T, max(2, math.floor(math.log(10) / math.log(g)))))
    assert g ** rec.suggested <= 10.0 + 1e-9


def test_gp301_init_scale_is_the_settled_scale_rounded_down_to_a_power_of_two(tmp_path):
    r = _amp_run(str(tmp_path / "run"), init_scale=2.0**40)
    f = _finding(r, "GP301")
    rec = _hp(f, "init_scale")
    settled = f.evidence["settled_scale"]
    # the settled scale: median scale of the successful steps before the scaler first grew
    st = r.runlog.steps
    scaled = st[np.isfinite(st["scale_before"].to_numpy(dtype=float))]
    sb, sa, skipped = (scaled["scale_before"].to_numpy(dtype=float), scaled["scale"].to_numpy(dtype=float),
                       scaled["skipped"].to_numpy(dtype=bool))
    grew = np.flatnonzero(~skipped & (sa > sb * (1 + 1e-6)))
    end = int(grew[0]) if grew.size else len(sb)
    assert settled == float(np.median(sb[:end][~skipped[:end]]))
    assert rec.suggested == 2.0 ** math.floor(math.log2(settled)) and rec.current == 2.0**40


def test_gp301_growth_interval_keeps_futile_growth_probes_below_a_thousandth(tmp_path):
    """A scaler that starts far too high and then grows every 3 clean steps into the scale it
    just backed off from: most growth attempts overflow within 2 steps."""
    torch.manual_seed(0)
    model = mlp((8, 64, 64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=3)
    d = str(tmp_path / "run")
    with gradprobe.watch(model, opt, scaler=scaler, logdir=d):
        for x, y in regression_batches(80):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    f = _finding(gradprobe.analyze(d), "GP301")
    rec = _hp(f, "growth_interval")
    p = f.evidence["futile_growth_fraction"]
    # ceil(p / 0.001) - 1: one futile probe per growth_interval steps costs at most 0.1% of steps
    assert rec.current == 3 and rec.suggested == int(math.ceil(p / 1e-3)) - 1 or \
        rec.suggested == int(math.ceil(round(p, 3) / 1e-3)) - 1


def test_gp302_amp_dtype_is_bfloat16(tmp_path):
    r = _amp_run(str(tmp_path / "run"), xscale=3e4, n=30)
    rec = _hp(_finding(r, "GP302"), "amp_dtype")
    assert (rec.current, rec.suggested) == ("float16", "bfloat16")


def test_gp303_init_scale_keeps_the_largest_gradient_norm_below_65504(tmp_path):
    r = _amp_run(str(tmp_path / "run"), init_scale=None, n=20, yscale=1e-4, last_gain=1e-3)
    f = _finding(r, "GP303")
    rec = _hp(f, "init_scale")
    gmax = f.evidence["max_layer_grad_norm"]
    want = min(2.0**16, 2.0 ** math.floor(math.log2(65504.0 / gmax)))
    assert rec.suggested == want and want * gmax <= 65504.0


def test_gp501_lr_scales_the_lr_by_the_target_over_the_measured_ratio(tmp_path):
    from gradprobe.rules.learning_rate import SUGGEST_RATIO_WHEN_TOO_HIGH

    d = str(tmp_path / "run")
    RT.adam_huge_lr(d)
    f = _finding(gradprobe.analyze(d), "GP501")
    rec = _hp(f, "lr")
    # the ratio: median of the sampled update-to-weight ratios before the harm began, step 0
    # left out (the evidence names the steps used)
    ratios = update_ratio_by_step(RunContext(gradprobe.RunLog.load(d)))
    used = ratios[ratios.index.isin(f.evidence["ratio_steps"])]
    assert f.evidence["update_ratio"] == pytest.approx(float(used.median()))
    assert rec.suggested == nice(rec.current * SUGGEST_RATIO_WHEN_TOO_HIGH / f.evidence["update_ratio"])
    assert "lr x 0.00316" in get_rule("GP501").computes["lr"]  # the catalog states the constant used


def test_gp501_warmup_steps_is_the_step_the_early_instability_ended(tmp_path):
    """Adam at lr 0.3 for the first 6 steps (a scheduler configured to start at a peak 100x its
    plateau): the loss blows up 300x early and comes back, so the fix is a warmup."""
    torch.manual_seed(0)
    model = mlp((8, 64, 64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 6 else 0.01)
    d = str(tmp_path / "run")
    with gradprobe.watch(model, opt, logdir=d):
        for x, y in regression_batches(240):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
    f = _finding(gradprobe.analyze(d), "GP501")
    rec = _hp(f, "warmup_steps")
    # the step at which the early, recovered instability ended: the last spike's end, plus one
    assert rec.suggested == f.evidence["harm"]["spikes"]["last_end_step"] + 1
    assert f.evidence["harm"]["spikes"]["all_recovered"]


def test_gp502_lr_scales_the_lr_by_1e3_over_the_measured_ratio(tmp_path):
    d = str(tmp_path / "run")
    RT.sgd_tiny_lr(d)
    f = _finding(gradprobe.analyze(d), "GP502")
    rec = _hp(f, "lr")
    assert rec.suggested == nice(rec.current * 1e-3 / f.evidence["update_ratio"])


def _separable_adam(logdir: str, steps: int = 600) -> str:
    """Full-batch logistic regression on separable data with Adam (a short second-moment
    memory, betas=(0.9, 0.95), so each step keeps moving every weight by ~lr, and the full
    batch points every step the same way) and no weight decay: the loss is near 0 by mid-run
    and the weights go on growing linearly, for nothing (on random mini-batches of 64 the same
    run grows as sqrt(t), a random walk, which is not a finding)."""
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x @ torch.randn(16) > 0).long()
    model = nn.Linear(16, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.9, 0.95))
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return logdir


def test_gp503_weight_decay_cancels_the_measured_growth_rate(tmp_path):
    d = _separable_adam(str(tmp_path / "run"))
    f = _finding(gradprobe.analyze(d), "GP503")
    rec = _hp(f, "weight_decay")
    r = f.evidence["growth_rate_per_step"]
    lw = gradprobe.RunLog.load(d)
    half = lw.steps["step"].to_numpy()[len(lw.steps) // 2]
    lr = float(np.median(lw.steps["lr"].to_numpy()[lw.steps["step"].to_numpy() >= half]))
    assert rec.suggested == nice(r / lr)
    # decoupled decay shrinks by lr x wd per step: it cancels the growth factor (1 + r)
    assert rec.suggested * lr == pytest.approx(r, rel=0.05)
