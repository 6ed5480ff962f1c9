"""Cause links, ordering and the hyperparameter merge across rule families (engine-level
behaviour the rules rely on), and the shared views they read (the validation series)."""

from __future__ import annotations

import numpy as np

import gradprobe
from gradprobe.analysis import RunContext
from gradprobe.engine import _link_causes, _merge_hyperparameters, _order
from gradprobe.report import Finding, Recommendation


def finding(rule: str, code: str, step: int | None, severity: str = "warning", caused_by: list[str] | None = None,
            hp: tuple[str, float] | None = None) -> Finding:
    recs = [Recommendation.hyperparameter(hp[0], None, hp[1], "computed")] if hp else []
    return Finding(rule=rule, code=code, severity=severity, confidence=0.8, title="", message="", first_step=step,
                   caused_by=list(caused_by or []), recommendations=recs)


def test_a_static_link_that_would_close_a_cycle_is_not_made():
    # GP202 named the loss spike as its cause from evidence (the gradient followed that batch's
    # loss); GP204 (missing clipping) is GP202's symptom; GP504 lists both as possible causes
    g202 = finding("exploding-gradients", "GP202", 60, "error", caused_by=["loss-spike"])
    g204 = finding("missing-gradient-clipping", "GP204", 60)
    g504 = finding("loss-spike", "GP504", 60)
    fs = [g202, g204, g504]
    _link_causes(fs)
    assert g204.caused_by == ["exploding-gradients"]
    assert g504.caused_by == []  # GP202 and GP204 are its consequences, not its causes
    assert _order(fs)[0] is g504


def test_links_respect_time_order():
    g605 = finding("dead-units", "GP605", 10)
    g505 = finding("loss-plateau", "GP505", 1)
    _link_causes([g605, g505])
    assert g505.caused_by == []  # the units died after the loss was stuck


def test_a_symptom_of_a_tuned_cause_is_not_merged_but_one_of_a_code_fix_is():
    over = finding("overclipping", "GP201", 0, "error", hp=("max_norm", 0.16))
    low = finding("lr-too-low", "GP502", 0, caused_by=["overclipping"], hp=("lr", 0.54))
    merged = _merge_hyperparameters([over, low])
    assert merged == {"max_norm": 0.16}
    assert "not merged" in low.recommendations[0].reason
    raw = finding("input-scale", "GP601", 0)
    fp16 = finding("fp16-overflow", "GP302", 1, "error", caused_by=["input-scale"])
    fp16.recommendations = [Recommendation.hyperparameter("amp_dtype", "float16", "bfloat16", "range")]
    assert _merge_hyperparameters([raw, fp16]) == {"amp_dtype": "bfloat16"}


def test_validation_series_with_the_most_evaluations_wins():
    # the recorder adds a one-record "eval_loss" scalar for an evaluation after the last step
    n = 100
    scalars = [(s, "val_loss", 1.0 / (1 + s)) for s in range(9, n, 10)] + [(n - 1, "eval_loss", 0.5)]
    log = gradprobe.RunLog.build({"step": list(range(n)), "loss": list(np.linspace(2, 1, n))}, scalars=scalars)
    ev = RunContext(log).eval_loss
    assert len(ev) == 10 and ev.index[0] == 9


# ------------------------------------------------------------- root cause before symptom -----
def _transitive_causes(report: gradprobe.Report, code: str) -> set[str]:
    by_rule = {f.rule: f for f in report.findings}
    f = report.finding(code)
    seen: set[str] = set()
    stack = list(f.caused_by) if f else []
    while stack:
        c = stack.pop()
        if c not in seen:
            seen.add(c)
            stack.extend(by_rule[c].caused_by if c in by_rule else [])
    return seen


def test_gradients_exploding_through_time_until_non_finite_report_the_recurrence_first(tmp_path):
    """A vanilla RNN whose recurrent weights have spectral radius 1.3 from the start: the
    gradient grows backwards through time, SGD steps on it blow the weights up, and the run
    turns non-finite. The through-time cause comes first; every symptom leads back to it."""
    import torch
    import torch.nn.functional as F

    from tests.rules import _runs_recurrent as RR

    torch.manual_seed(0)
    model = RR.VanillaRNN(4, 16)
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(16, 16))[0] * 1.3)
    opt = torch.optim.SGD(model.parameters(), 2.0)
    d = str(tmp_path / "run")
    with gradprobe.watch(model, opt, logdir=d):
        for x, y in RR._seq_data(30, batch=8, T=60):
            opt.zero_grad()
            F.mse_loss(model(x * 0.1), y).backward()
            opt.step()
    report = gradprobe.analyze(d)
    serious = [f for f in report.findings if f.severity != "info"]
    assert serious[0].code == "GP102" and serious[0].caused_by == [], [(f.code, f.caused_by) for f in serious]
    assert serious[0].severity == "error"  # the run went non-finite after it
    for code in ("GP202", "GP401", "GP402", "GP403", "GP501"):
        assert report.finding(code) is not None, code
        assert "long-lookback" in _transitive_causes(report, code), (code, report.finding(code).caused_by)


def test_a_carried_state_that_keeps_old_graphs_alive_reports_the_carried_state_first(tmp_path):
    """The running loss fed back into the next forward, never detached (retain_graph and
    ``p.data`` updates keep it from crashing): each step's loss graph stays alive through the
    carried state. The carried state is the cause; the retained graphs are its symptom."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from tests.helpers import regression_batches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, 1))
    d = str(tmp_path / "run")
    running = torch.zeros(())
    with gradprobe.watch(model, logdir=d):
        for x, y in regression_batches(30):
            model.zero_grad()
            loss = F.mse_loss(model(torch.cat([x, running.expand(x.shape[0], 1)], dim=1)), y)
            loss.backward(retain_graph=True)
            with torch.no_grad():
                for p in model.parameters():
                    p.data -= 0.01 * p.grad
            running = 0.9 * running + 0.1 * loss
    report = gradprobe.analyze(d)
    assert [f.code for f in report.findings][:2] == ["GP101", "GP103"]
    assert report.finding("GP103").caused_by == ["undetached-hidden-state"]
    assert report.finding("GP101").final and report.finding("GP103").final
