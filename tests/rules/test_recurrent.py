"""GP101-GP103 (recurrent state, graph retention): firing and healthy cases, on synthetic
RunLogs and on real tiny CPU runs (see ``_runs_recurrent``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.report import CANONICAL_HYPERPARAMETERS, Finding, Report
from gradprobe.rules import get_rule
from tests.rules import _runs_recurrent as R

MY_CODES = ("GP101", "GP102", "GP103", "GP201", "GP202", "GP203", "GP204")
SECOND = ("Trying to backward through the graph a second time (or directly access saved tensors after they "
          "have already been freed). Saved intermediate values of the graph are freed when you call .backward()")
INPLACE = ("one of the variables needed for gradient computation has been modified by an inplace operation: "
           "[torch.FloatTensor [64, 16]], which is output 0 of AsStridedBackward0, is at version 2; expected "
           "version 1 instead.")

RNN_META = {
    "recurrent": [{"module": "rnn", "class": "LSTM", "hidden_size": 16, "num_layers": 1, "input_size": 4,
                   "lookback": 20}],
    "models": [{"name": "SeqRegressor", "class": "SeqRegressor"}],
    "optimizers": [{"index": 0, "class": "Adam", "param_groups": [{"lr": 1e-3, "eps": 1e-8}]}],
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny real runs are latency-bound: one intra-op thread is several times faster than
    two on a shared CPU, where OpenMP threads spin waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def analyze(log: gradprobe.RunLog) -> Report:
    return gradprobe.analyze(log)


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code}, got {[(f.code, f.message) for f in report.findings]}"
    return found[0]


def quiet(report: Report, *codes: str) -> None:
    noisy = [(f.code, f.severity, f.message) for f in report.findings if f.code in codes and f.severity != "info"]
    assert not noisy, noisy


def steps(n: int, **cols: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"step": list(range(n)), "loss": [1.0 / (1 + 0.05 * i) for i in range(n)],
                            "grad_norm": [1.0] * n, "step_grad_norm": [1.0] * n, "lr": [1e-3] * n,
                            "backward_time": [0.01] * n, "memory": [400 * 2**20] * n}
    base.update(cols)
    return base


# ================================================================== GP101 synthetic =========
def test_gp101_silent_growing_age_fires_with_module_and_growth():
    n = 30
    ages = [0] + list(range(1, n))
    log = gradprobe.RunLog.build(
        steps(n, state_age=ages, state_age_module=[None] + ["rnn"] * (n - 1), retain_graph=[True] * n,
              backward_time=[0.01 * (1 + a) for a in ages], memory=[400 * 2**20 + a * 2**20 for a in ages]),
        meta=dict(RNN_META, autocast={"rnn": {"enabled": True, "dtype": "bfloat16", "class": "LSTM"}}),
        events=[{"kind": "state_age", "module": "seqregressor", "class": "SeqRegressor", "step": 1, "age": 1},
                {"kind": "state_age", "module": "rnn", "class": "LSTM", "step": 1, "age": 1}],
    )
    f = only(analyze(log), "GP101")
    assert f.rule == "undetached-hidden-state" and f.severity == "error"
    assert f.layer == "rnn" and f.first_step == 1
    assert f.evidence["max_state_age"] == n - 1 and f.evidence["age_grows_without_bound"]
    assert f.evidence["backward_time_late_over_early"] > 3
    assert f.evidence["memory_growth_bytes"] > 20 * 2**20
    assert "bfloat16 autocast" in f.message and "retain_graph" in f.message
    assert f.confidence == pytest.approx(1.0)
    (rec,) = f.recommendations
    assert rec.kind == "code" and ".detach()" in rec.snippet and "retain_graph" in rec.summary


def test_gp101_detached_every_step_is_healthy_tbptt():
    log = gradprobe.RunLog.build(steps(50, state_age=[0] * 50), meta=RNN_META)
    quiet(analyze(log), "GP101", "GP103")


def test_gp101_bounded_age_is_a_warning():
    ages = [i % 4 for i in range(40)]  # detached every 4 steps
    log = gradprobe.RunLog.build(steps(40, state_age=ages, state_age_module=["rnn" if a else None for a in ages],
                                       retain_graph=[True] * 40), meta=RNN_META)
    f = only(analyze(log), "GP101")
    assert f.severity == "warning"
    assert not f.evidence["age_grows_without_bound"] and f.evidence["max_state_age"] == 3


def test_gp101_single_aged_step_without_crash_is_not_enough():
    ages = [0] * 20
    ages[7] = 1
    quiet(analyze(gradprobe.RunLog.build(steps(20, state_age=ages), meta=RNN_META)), "GP101")


def test_gp101_second_backward_crash_maps_to_the_rule():
    log = gradprobe.RunLog.build(
        steps(2, state_age=[0, 1], state_age_module=[None, "rnn"], grad_norm=[0.9, math.nan]),
        meta=RNN_META,
        events=[{"kind": "state_age", "module": "rnn", "class": "LSTM", "step": 1, "age": 1},
                {"kind": "exception", "where": "backward", "step": 1, "type": "RuntimeError", "message": SECOND,
                 "state_age": 1, "state_age_module": "rnn", "retain_graph": False}],
    )
    f = only(analyze(log), "GP101")
    assert f.severity == "error" and f.layer == "rnn" and f.first_step == 1
    assert f.evidence["crash_form"] == "second-backward" and f.evidence["exception_step"] == 1
    assert f.confidence == pytest.approx(1.0)


def test_gp101_inplace_error_after_retain_graph_maps_to_the_rule():
    log = gradprobe.RunLog.build(
        steps(2, state_age=[0, 1], state_age_module=[None, "rnn"], retain_graph=[True, True]),
        meta=RNN_META,
        events=[{"kind": "exception", "where": "backward", "step": 1, "type": "RuntimeError", "message": INPLACE,
                 "state_age": 1, "state_age_module": "rnn", "retain_graph": True}],
    )
    f = only(analyze(log), "GP101")
    assert f.evidence["crash_form"] == "inplace-after-retain_graph"
    assert "retain_graph=True kept the old graph" in f.message
    assert f.evidence["exception"].startswith("one of the variables needed")


def test_gp101_inplace_error_without_retain_graph_is_an_ordinary_inplace_bug():
    log = gradprobe.RunLog.build(
        steps(3),
        events=[{"kind": "exception", "where": "backward", "step": 2, "type": "RuntimeError", "message": INPLACE,
                 "state_age": 0, "state_age_module": None, "retain_graph": False}],
    )
    quiet(analyze(log), "GP101")


def test_gp101_second_backward_within_one_step_is_not_a_carried_state():
    # loss.backward() twice on one graph in the same step: the failing backward is the second of its step
    log = gradprobe.RunLog.build(
        steps(4, n_backward=[1, 1, 1, 2]),
        events=[{"kind": "exception", "where": "backward", "step": 3, "type": "RuntimeError", "message": SECOND,
                 "state_age": 0, "state_age_module": None, "retain_graph": False}],
    )
    quiet(analyze(log), "GP101")


def test_gp101_crash_without_measured_age_is_inferred_with_lower_confidence():
    # the carried tensor was made outside watched modules: the first backward of step 1 failed
    log = gradprobe.RunLog.build(
        steps(2, n_backward=[1, 1]),
        events=[{"kind": "exception", "where": "backward", "step": 1, "type": "RuntimeError", "message": SECOND,
                 "state_age": 0, "state_age_module": None, "retain_graph": False}],
    )
    f = only(analyze(log), "GP101")
    assert 0.6 <= f.confidence < 0.7
    assert "first of its step" in f.message


def test_gp101_ignores_exceptions_left_by_an_earlier_run_in_the_same_directory():
    # a reused run directory keeps the earlier run's events.jsonl: its crash is not this run's
    event = {"kind": "exception", "where": "backward", "step": 1, "type": "RuntimeError", "message": SECOND,
             "state_age": 1, "state_age_module": "rnn", "retain_graph": False, "wall_time": 1_700_000_000.0}
    meta = dict(RNN_META, created="2023-11-14T22:20:00+00:00")  # 7 minutes after the event
    quiet(analyze(gradprobe.RunLog.build(steps(20), meta=meta, events=[event])), "GP101")
    meta = dict(RNN_META, created="2023-11-14T22:13:20+00:00")  # the same second: this run's crash
    assert only(analyze(gradprobe.RunLog.build(steps(2), meta=meta, events=[event])), "GP101")


def test_gp101_module_prefers_the_recurrent_module_over_the_root():
    n = 10
    log = gradprobe.RunLog.build(
        steps(n, state_age=list(range(n)), state_age_module=[None] + ["seqregressor"] * (n - 1)),
        meta=RNN_META,
        events=[{"kind": "state_age", "module": "seqregressor", "step": 1, "age": 1},
                {"kind": "state_age", "module": "rnn", "step": 1, "age": 1}],
    )
    assert only(analyze(log), "GP101").layer == "rnn"


# ================================================================== GP102 synthetic =========
def bptt_samples(module: str, rows: list[dict[str, float]]) -> list[tuple[int, str, str, str, int, float]]:
    out = []
    for r in rows:
        step = int(r["step"])
        for k, v in r.items():
            if k != "step":
                out.append((step, "bptt", module, k, 0, float(v)))
    return out


def gp102_log(rows: list[dict[str, float]], lookback: int, n: int = 60) -> gradprobe.RunLog:
    meta = dict(RNN_META, recurrent=[{"module": "rnn", "class": "GRU", "hidden_size": 8, "lookback": lookback}])
    return gradprobe.RunLog.build(steps(n), meta=meta, samples=bptt_samples("rnn", rows))


def test_gp102_lookback_far_past_the_horizon_fires_and_recommends_lookback():
    rows = [{"step": s, "horizon": h, "reaches_end": 0, "growth_per_step": 0.6, "far_over_near": 0.0,
             "lookback": 400, "hidden_size": 8} for s, h in [(0, 12), (1, 13), (2, 14), (10, 14), (50, 15)]]
    f = only(analyze(gp102_log(rows, 400)), "GP102")
    assert f.severity == "warning" and f.layer == "rnn" and f.rule == "long-lookback"
    assert f.evidence["median_horizon"] == 14 and f.evidence["lookback"] == 400
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "lookback" and rec.current == 400 and rec.suggested == 28
    assert f.confidence > 0.9


def test_gp102_conventional_bptt_window_is_quiet():
    # word_language_model: bptt 35, horizon ~8-10 -> the excess is a few dozen cheap steps
    rows = [{"step": s, "horizon": 9, "reaches_end": 0, "growth_per_step": 0.5, "far_over_near": 1e-10,
             "lookback": 35} for s in (0, 1, 2, 10, 50)]
    quiet(analyze(gp102_log(rows, 35)), "GP102")


def test_gp102_gradient_reaching_the_end_of_the_window_is_quiet():
    rows = [{"step": s, "horizon": 200, "reaches_end": 1, "growth_per_step": 0.98, "far_over_near": 0.02,
             "lookback": 200} for s in (0, 1, 2, 10)]
    quiet(analyze(gp102_log(rows, 200)), "GP102")


def test_gp102_uses_the_latest_samples_when_the_horizon_grows_with_training():
    row = {"reaches_end": 0, "lookback": 300}
    early = [dict(row, step=s, horizon=10, growth_per_step=0.6) for s in (0, 1, 2)]
    late = [dict(row, step=s, horizon=120, growth_per_step=0.95) for s in (50, 100, 150)]
    quiet(analyze(gp102_log(early + late, 300, n=200)), "GP102")


def test_gp102_growth_backwards_through_time_fires_as_error():
    rows = [{"step": s, "horizon": 60, "reaches_end": 1, "growth_per_step": 1.149, "far_over_near": 1770,
             "lookback": 60} for s in (0, 1, 2, 3)]
    f = only(analyze(gp102_log(rows, 60)), "GP102")
    assert f.severity == "error" and f.title == "Gradients explode backwards through time"
    assert f.evidence["growth_per_step"] == pytest.approx(1.149)
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.suggested == math.floor(math.log(10) / math.log(1.149))


def test_gp102_mild_growth_through_time_is_a_warning_and_decay_is_quiet():
    mild = [{"step": s, "horizon": 100, "reaches_end": 1, "growth_per_step": 1.03, "far_over_near": 15,
             "lookback": 100} for s in (0, 1, 2)]
    assert only(analyze(gp102_log(mild, 100)), "GP102").severity == "warning"
    decay = [dict(r, growth_per_step=0.99, far_over_near=0.4) for r in mild]
    quiet(analyze(gp102_log(decay, 100)), "GP102")


# ================================================================== GP103 synthetic =========
def test_gp103_graphs_kept_alive_fire():
    n = 40
    alive = [max(0, i - 1) for i in range(n)]
    f = only(analyze(gradprobe.RunLog.build(steps(n, graphs_alive=alive))), "GP103")
    assert f.severity == "error" and f.rule == "graph-retained-across-steps" and f.first_step == 2
    assert f.evidence["max_graphs_alive"] == n - 2 and f.evidence["graphs_per_step"] == pytest.approx(1.0)
    assert ".item()" in f.recommendations[0].snippet


def test_gp103_a_short_fixed_history_is_quiet():
    # keeping the last 6 losses in a deque: graphs_alive plateaus at 4
    alive = [min(max(0, i - 1), 4) for i in range(200)]
    quiet(analyze(gradprobe.RunLog.build(steps(200, graphs_alive=alive))), "GP103")
    # a longer plateau in a long run is bounded too
    alive = [min(max(0, i - 1), 20) for i in range(500)]
    quiet(analyze(gradprobe.RunLog.build(steps(500, graphs_alive=alive))), "GP103")


def test_gp103_saturated_sentinels_still_fire():
    alive = [min(max(0, i - 1), 510) for i in range(3000)]
    assert only(analyze(gradprobe.RunLog.build(steps(3000, graphs_alive=alive))), "GP103").severity == "error"


def test_gp103_memory_growing_every_step_without_state_fires_as_warning():
    n = 100
    mem = [400 * 2**20 + i * 2**20 for i in range(n)]
    f = only(analyze(gradprobe.RunLog.build(steps(n, memory=mem))), "GP103")
    assert f.severity == "warning" and f.evidence["memory_growth_bytes"] > 50 * 2**20


def test_gp103_memory_that_plateaus_is_quiet():
    n = 100
    mem = [400 * 2**20 + min(i, 30) * 4 * 2**20 for i in range(n)]  # a cache filling once
    quiet(analyze(gradprobe.RunLog.build(steps(n, memory=mem))), "GP103")


def test_gp103_backward_time_that_grows_with_the_whole_step_is_bigger_inputs_not_a_leak():
    # a curriculum lengthening the sequences: forward and backward grow alike
    n = 60
    bt = np.array([0.01 * (1 + i) for i in range(n)])
    quiet(analyze(gradprobe.RunLog.build(steps(n, backward_time=list(bt), step_time=list(2.2 * bt + 0.002)))), "GP103")
    # backward growing alone inside a step whose other parts stay put: graphs walked again
    f = only(analyze(gradprobe.RunLog.build(steps(n, backward_time=list(bt), step_time=list(bt + 0.02)))), "GP103")
    assert f.severity == "warning"


def test_gp103_backward_time_growth_without_state_fires_but_not_with_a_carried_state():
    n = 60
    bt = [0.01 * (1 + i) for i in range(n)]
    f = only(analyze(gradprobe.RunLog.build(steps(n, backward_time=bt))), "GP103")
    assert f.severity == "warning" and f.evidence["backward_time_late_over_early"] > 3
    ages = list(range(n))
    rep = analyze(gradprobe.RunLog.build(steps(n, backward_time=bt, state_age=ages,
                                               state_age_module=["rnn"] * n), meta=RNN_META))
    quiet(rep, "GP103")
    assert only(rep, "GP101").severity == "error"


def test_noisy_timing_and_memory_are_quiet():
    rng = np.random.default_rng(0)
    n = 300
    log = gradprobe.RunLog.build(steps(n, backward_time=list(0.01 * rng.lognormal(0, 0.5, n)),
                                       memory=list(400 * 2**20 + rng.integers(0, 2**20, n))))
    quiet(analyze(log), *MY_CODES)


# ================================================================== real runs ===============
def test_real_retain_graph_crash_is_undetached_state(logdir):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        R.lstm_retain_graph_crash(logdir)
    f = only(gradprobe.analyze(logdir), "GP101")
    assert f.severity == "error" and f.layer == "rnn" and f.first_step == 1
    assert f.evidence["crash_form"] == "inplace-after-retain_graph"
    assert f.confidence >= 0.95


def test_real_second_backward_crash_is_undetached_state(logdir):
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        R.lstm_second_backward_crash(logdir)
    f = only(gradprobe.analyze(logdir), "GP101")
    assert f.evidence["crash_form"] == "second-backward" and f.layer == "rnn"


@pytest.mark.parametrize("build, module, reason", [
    (R.lstm_bf16_undetached, "rnn", "autocast"),
    (R.lstm_pdata_undetached, "rnn", "p.data"),
    (R.ema_undetached, "ema", "saves no tensors"),
])
def test_real_silent_undetached_state(logdir, build, module, reason):
    build(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP101")
    assert f.severity == "error" and f.layer == module and f.first_step == 1
    assert f.evidence["age_grows_without_bound"] and f.evidence["max_state_age"] >= 10
    assert reason in f.message
    quiet(report, "GP103")


def test_real_total_loss_accumulation_is_graph_retention(logdir):
    R.total_loss_accumulated(logdir)
    report = gradprobe.analyze(logdir)
    f = only(report, "GP103")
    assert f.severity == "error" and f.evidence["max_graphs_alive"] >= 30
    quiet(report, "GP101")


def test_real_gru_far_past_its_horizon(logdir):
    R.gru_past_horizon(logdir)  # GRU, hidden 8, 400-step windows
    f = only(gradprobe.analyze(logdir), "GP102")
    assert f.severity == "warning" and f.layer == "rnn" and f.evidence["lookback"] == 400
    assert f.evidence["median_horizon"] < 50 and f.evidence["lookback_over_horizon"] > 8
    (rec,) = [r for r in f.recommendations if r.kind == "hyperparameter"]
    assert rec.name == "lookback" and rec.current == 400
    assert rec.suggested == math.ceil(2 * f.evidence["median_horizon"])


def test_real_vanilla_rnn_built_to_explode_grows_through_time(logdir):
    R.vanilla_rnn_exploding(logdir)
    f = only(gradprobe.analyze(logdir), "GP102")
    assert f.severity == "error" and f.layer == "rnn"
    assert f.evidence["growth_per_step"] == pytest.approx(1.15, rel=0.05)
    assert f.evidence["far_over_near"] > 100


@pytest.mark.parametrize("name", sorted(R.HEALTHY))
def test_real_healthy_runs_are_quiet(logdir, name):
    R.HEALTHY[name](logdir)
    report = gradprobe.analyze(logdir)
    quiet(report, *MY_CODES)
    errors = [s for s in report.skipped_rules if s.code in MY_CODES and "rule error" in s.reason]
    assert not errors, errors


# ================================================================== catalog =================
@pytest.mark.parametrize("code", ["GP101", "GP102", "GP103"])
def test_rule_documents_itself(code):
    cls = get_rule(code)
    assert cls is not None
    doc = cls.__doc__ or ""
    assert "Confidence" in doc and "everity" in doc  # thresholds, severity and confidence are stated
    for attr in ("what", "why", "causes", "fix", "example"):
        assert getattr(cls.explanation, attr).strip()
    assert set(cls.computes) <= set(CANONICAL_HYPERPARAMETERS)
