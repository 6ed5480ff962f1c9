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
