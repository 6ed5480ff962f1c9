"""GP301-GP305 (mixed precision): firing and healthy cases, on synthetic RunLogs and on real
tiny CPU runs (float16 autocast on Linear layers with torch.amp.GradScaler("cpu"))."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.engine import analyze_runlog
from tests.helpers import SeqRegressor, mlp, regression_batches

AMP_CODES = ("GP301", "GP302", "GP303", "GP304", "GP305")


# ---------------------------------------------------------------- synthetic scaler runs -----
def simulate_scaler(
    n: int,
    limit: Callable[[int], float],
    *,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
    forward_overflow: Callable[[int], bool] = lambda i: False,
    backoff: float = 0.5,
    growth: float = 2.0,
) -> dict[str, list[Any]]:
    """A GradScaler's exact dynamics: a step overflows when the scale exceeds the largest
    scale its gradients fit at (``limit(step)``) or its forward overflows by itself."""
    s = init_scale
    tracker = 0
    rows: dict[str, list[Any]] = {k: [] for k in ("step", "scale_before", "scale", "skipped", "scaler_updated",
                                                  "loss", "loss_nonfinite", "grad_norm", "grad_nonfinite_layers",
                                                  "optimizer_steps", "param_nonfinite_layers")}
    for i in range(n):
        fwd = forward_overflow(i)
        skip = fwd or s > limit(i)
        rows["step"].append(i)
        rows["scale_before"].append(s)
        if skip:
            s *= backoff
            tracker = 0
        else:
            tracker += 1
            if tracker == growth_interval:
                s *= growth
                tracker = 0
        rows["scale"].append(s)
        rows["skipped"].append(skip)
        rows["scaler_updated"].append(True)
        rows["loss"].append(math.nan if fwd else 1.0 / (1 + 0.01 * i))
        rows["loss_nonfinite"].append(fwd)
        rows["grad_norm"].append(math.nan if skip else 1.0)
        rows["grad_nonfinite_layers"].append(2 if skip else 0)
        rows["optimizer_steps"].append(0 if skip else 1)
        rows["param_nonfinite_layers"].append(-1 if skip else 0)
    return rows


def amp_meta(init_scale: float = 2.0**16, growth_interval: int = 2000, dtype: str = "float16",
             scaler: bool = True, out_dtype: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "autocast": {
            name: {"enabled": True, "dtype": dtype, "output_dtype": out_dtype or dtype, "class": "Linear",
                   "device": "cuda"}
            for name in ("fc1", "fc2")
        },
        "scalers": [],
        "optimizers": [{"index": 0, "class": "SGD", "param_groups": [{"lr": 0.01}]}],
    }
    if scaler:
        meta["scalers"] = [{"index": 0, "class": "GradScaler", "enabled": True, "init_scale": init_scale,
                            "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": growth_interval}]
    return meta


def analyze(steps: dict[str, Any], meta: dict[str, Any] | None = None, **kw: Any) -> gradprobe.Report:
    return analyze_runlog(gradprobe.RunLog.build(steps, meta=meta or {}, **kw))


def codes(report: gradprobe.Report) -> set[str]:
    return {f.code for f in report.findings}


def loud(report: gradprobe.Report, prefix: str = "GP3") -> list[str]:
    """This family's error/warning findings."""
    return [f.code for f in report.findings if f.code.startswith(prefix) and f.severity in ("error", "warning")]


# ---------------------------------------------------------------- GP301 high-init-scale -----
def test_gp301_fires_on_long_burst_and_suggests_settled_scale():
    rows = simulate_scaler(300, lambda i: 2.0**12, init_scale=2.0**24)
    r = analyze(rows, amp_meta(init_scale=2.0**24))
    f = r.finding("high-init-scale")
    assert f is not None and f.severity == "warning"
    assert f.first_step == 0
    assert f.evidence["skipped_at_start"] == 12
    assert f.evidence["settled_scale"] == 2.0**12
    assert r.suggested_hyperparameters["init_scale"] == 2.0**12
    assert 0.5 < f.confidence <= 1.0
    assert "fp16-overflow" not in {x.rule for x in r.findings}
    assert r.finding("GP304").evidence["calibration"]["see"] == "high-init-scale"


def test_gp301_confidence_grows_with_the_burst():
    short = analyze(simulate_scaler(300, lambda i: 2.0**12, init_scale=2.0**20), amp_meta(init_scale=2.0**20))
    long = analyze(simulate_scaler(300, lambda i: 2.0**6, init_scale=2.0**24), amp_meta(init_scale=2.0**24))
    assert short.finding("GP301").confidence < long.finding("GP301").confidence


def test_gp301_growth_interval_only_when_growth_keeps_overflowing():
    # settles at 2**12, then every growth to 2**13 overflows at once: futile probes every 21 steps
    rows = simulate_scaler(400, lambda i: 2.0**12, init_scale=2.0**24, growth_interval=20)
    r = analyze(rows, amp_meta(init_scale=2.0**24, growth_interval=20))
    f = r.finding("GP301")
    hp = {rec.name: rec for rec in f.recommendations if rec.kind == "hyperparameter"}
    assert hp["growth_interval"].current == 20
    assert hp["growth_interval"].suggested == 999  # every growth futile: ceil(1 / 0.001) - 1
    # with the default interval the growth never misfires in 300 steps: no growth_interval
    r2 = analyze(simulate_scaler(300, lambda i: 2.0**12, init_scale=2.0**24), amp_meta(init_scale=2.0**24))
    assert "growth_interval" not in r2.suggested_hyperparameters


def test_gp301_quiet_on_default_scaler_calibration():
    # PyTorch's default 2**16 backing off three times: calibration, GP304 info only
    rows = simulate_scaler(300, lambda i: 2.0**13)
    r = analyze(rows, amp_meta())
    assert loud(r) == []
    calib = r.finding("GP304").evidence["calibration"]
    assert calib["skipped_steps"] == [0, 1, 2]
    assert calib["settled_scale"] == 2.0**13
    assert "calibrating" in r.finding("GP304").message


def test_gp301_after_a_lucky_first_step():
    # the first batch fits at 2**16, the next ones only at 2**7: still a long burst at the start
    rows = simulate_scaler(200, lambda i: 2.0**16 if i == 0 else 2.0**7)
    r = analyze(rows, amp_meta())
    assert r.finding("GP301").evidence["settled_scale"] == 2.0**7
    assert "GP302" not in codes(r)


def test_gp301_gp302_quiet_when_a_late_calibration_stops():
    # the gradients grow 8x once, mid-run: three skips in a row, then the scale holds
    rows = simulate_scaler(60, lambda i: 2.0**16 if i < 30 else 2.0**13)
    r = analyze(rows, amp_meta())
    assert loud(r) == []


def test_gp301_quiet_when_the_scale_keeps_collapsing():
    rows = simulate_scaler(100, lambda i: 2.0**16, forward_overflow=lambda i: True)
    r = analyze(rows, amp_meta())
    assert "GP301" not in codes(r)
    assert "GP302" in codes(r)


# ---------------------------------------------------------------- GP302 fp16-overflow -------
def test_gp302_fires_when_forward_overflows_every_step():
    rows = simulate_scaler(40, lambda i: 2.0**16, forward_overflow=lambda i: True)
    r = analyze(rows, amp_meta())
    f = r.finding("fp16-overflow")
    assert f is not None and f.severity == "error"
    assert {"collapsed_below_1", "forward_overflow"} <= set(f.evidence["triggers"])
    assert f.first_step == 0
    assert r.suggested_hyperparameters["amp_dtype"] == "bfloat16"
    assert f.confidence == pytest.approx(1.0)


def test_gp302_fires_when_gradients_keep_growing_past_fp16():
    # the largest usable scale halves every 15 steps: the scaler follows it down
    rows = simulate_scaler(200, lambda i: 2.0**16 / 2.0 ** (i // 15))
    r = analyze(rows, amp_meta())
    f = r.finding("GP302")
    assert f is not None
    assert "late_skipping" in f.evidence["triggers"]
    assert f.evidence["net_halvings_after_first_success"] >= 8
    assert "GP301" not in codes(r)


def test_gp302_fires_on_sustained_late_skipping_before_reaching_one():
    # gradient spikes that overflow at any scale on 1 step in 12 from step 100 on
    rows = simulate_scaler(220, lambda i: 0.0 if i >= 100 and i % 12 == 0 else 2.0**12)
    r = analyze(rows, amp_meta())
    f = r.finding("GP302")
    assert f is not None
    assert "late_skipping" in f.evidence["triggers"]
    assert f.first_step >= 100
    assert f.evidence["late_skip_rate"] >= 0.01


def test_gp302_quiet_on_long_healthy_run_with_growth_probes():
    # settles at 2**13; every 2000 clean steps the scaler grows and its probe overflows once
    rows = simulate_scaler(7000, lambda i: 2.0**13)
    r = analyze(rows, amp_meta())
    assert loud(r) == []
    assert r.finding("GP304") is not None


def test_gp302_from_activations_when_the_loop_hides_the_overflow_from_the_scaler():
    # the loop skips non-finite losses before scaler.scale(): no scaled step at all, but the
    # sampled forward shows the first inf coming out of a float16 Linear with finite inputs
    steps = {"step": [0, 1], "loss_fn": [math.nan, math.nan], "loss_fn_nonfinite": [True, True],
             "n_backward": [0, 0], "optimizer_steps": [0, 0]}
    samples = []
    for st in (0, 1):
        samples += [(st, "input", "net", "nonfinite", 0, 0.0), (st, "input", "net", "absmax", 0, 3e4),
                    (st, "activation", "fc1", "nonfinite", 0, 0.0), (st, "activation", "fc1", "absmax", 0, 6e4),
                    (st, "activation", "fc2", "nonfinite", 1, 12.0), (st, "activation", "fc2", "absmax", 1, 0.0)]
    r = analyze(steps, amp_meta(), samples=samples)
    f = r.finding("GP302")
    assert f is not None and f.layer == "fc2" and f.first_step == 0
    assert f.evidence["triggers"] == ["activation_overflow"]
    assert "GP303" not in codes(r)  # the scaler exists; the loop never reached a backward
    assert "fp16-overflow" in r.finding("GP401").caused_by


def test_gp302_quiet_for_bfloat16_autocast():
    rows = simulate_scaler(40, lambda i: 2.0**16, forward_overflow=lambda i: True)
    r = analyze(rows, amp_meta(dtype="bfloat16"))
    assert "GP302" not in codes(r)


def test_gp302_quiet_without_scale():
    r = analyze({"step": list(range(50)), "loss": [1.0] * 50, "grad_norm": [1.0] * 50}, amp_meta(scaler=False))
    assert not {"GP301", "GP302", "GP305"} & codes(r)


# ---------------------------------------------------------------- GP303 amp-without-scaler --
def _no_scaler_layers(zero_first: bool, scale: float = 1.0) -> dict[str, Any]:
    n = 30
    g = {
        "fc1.weight": [0.0 if zero_first else 3e-3 * scale] * n,
        "fc1.bias": [0.0 if zero_first else 1e-3 * scale] * n,
        "fc2.weight": [2e-4 * scale] * n,
        "fc2.bias": [5e-4 * scale] * n,
    }
    return g


def _layer_meta(meta: dict[str, Any]) -> dict[str, Any]:
    meta["layer_segments"] = [{"id": 0, "first_step": 0, "layers": [
        {"name": "fc1.weight", "numel": 512, "module": "fc1"}, {"name": "fc1.bias", "numel": 64, "module": "fc1"},
        {"name": "fc2.weight", "numel": 64, "module": "fc2"}, {"name": "fc2.bias", "numel": 1, "module": "fc2"}]}]
    return meta


def test_gp303_fires_with_zero_gradients_in_early_layers():
    steps = {"step": list(range(30)), "loss": [1e-6] * 30, "grad_norm": [5e-4] * 30}
    r = analyze(steps, _layer_meta(amp_meta(scaler=False)), layer_grad=_no_scaler_layers(True))
    f = r.finding("amp-without-scaler")
    assert f is not None and f.severity == "error"
    assert set(f.evidence["underflowed_layers"]) == {"fc1.weight", "fc1.bias"}
    assert "fc2.weight" in f.evidence["subnormal_layers"]  # 2e-4 / sqrt(64) < 2**-14
    assert f.layer in ("fc2.weight", "fc2.bias")  # backward meets the underflow first downstream
    assert r.suggested_hyperparameters["init_scale"] == 2.0**16
    assert any(rec.kind == "code" and "GradScaler" in rec.snippet for rec in f.recommendations)


def test_gp303_warns_on_configuration_alone_with_headroom_confidence():
    steps = {"step": list(range(30)), "loss": [1.0] * 30, "grad_norm": [1.0] * 30}
    near = analyze(steps, _layer_meta(amp_meta(scaler=False)), layer_grad=_no_scaler_layers(False, scale=20.0))
    far = analyze(steps, _layer_meta(amp_meta(scaler=False)), layer_grad=_no_scaler_layers(False, scale=1e5))
    fn, ff = near.finding("GP303"), far.finding("GP303")
    assert fn.severity == ff.severity == "warning"
    assert fn.confidence > ff.confidence


def test_gp303_quiet_with_scaler_bf16_or_fp32():
    steps = {"step": list(range(30)), "loss": [1e-6] * 30, "grad_norm": [5e-4] * 30}
    with_scaler = dict(steps, scale=[65536.0] * 30, scale_before=[65536.0] * 30, scaler_updated=[True] * 30)
    assert "GP303" not in codes(analyze(with_scaler, _layer_meta(amp_meta()), layer_grad=_no_scaler_layers(True)))
    bf16 = amp_meta(scaler=False, dtype="bfloat16")
    assert "GP303" not in codes(analyze(steps, _layer_meta(bf16), layer_grad=_no_scaler_layers(True)))
    assert "GP303" not in codes(analyze(steps, _layer_meta({}), layer_grad=_no_scaler_layers(True)))


# ---------------------------------------------------------------- GP304 mixed-precision-active
def test_gp304_reports_modules_not_honoured_and_failed():
    meta = amp_meta()
    cpu16 = {"enabled": True, "dtype": "float16", "device": "cpu"}
    meta["autocast"]["rnn"] = dict(cpu16, output_dtype="float32", **{"class": "GRU"})
    meta["autocast"]["lstm"] = dict(cpu16, output_dtype=None, **{"class": "LSTM"})
    events = [{"kind": "exception", "step": 0, "type": "RuntimeError",
               "message": "could not create a primitive descriptor"}]
    r = analyze(simulate_scaler(20, lambda i: 2.0**16), meta, events=events)
    f = r.finding("mixed-precision-active")
    assert f.severity == "info"
    assert any(s.startswith("rnn (GRU)") for s in f.evidence["not_honoured"])
    assert any(s.startswith("lstm (LSTM)") for s in f.evidence["failed"])
    assert "fc1 (Linear)" in f.evidence["modules"]["float16"]
    assert f.evidence["scaler"]["init_scale"] == 2.0**16


def test_gp304_notes_scaler_without_autocast_and_bf16_scaler():
    steps = {"step": list(range(10)), "scale": [65536.0] * 10, "scale_before": [65536.0] * 10,
             "scaler_updated": [True] * 10}
    meta = amp_meta()
    meta["autocast"] = {}
    f = analyze(steps, meta).finding("GP304")
    assert "no module ran under autocast" in f.message
    f2 = analyze(steps, amp_meta(dtype="bfloat16")).finding("GP304")
    assert "not needed" in f2.message


def test_gp304_quiet_without_mixed_precision():
    r = analyze({"step": list(range(10)), "loss": [1.0] * 10}, {})
    assert "GP304" not in codes(r)


# ---------------------------------------------------------------- GP305 scaler-misuse -------
def test_gp305_update_skipped_after_overflow():
    n = 12
    steps = {"step": list(range(n)), "scale_before": [2.0**20] * n, "scale": [2.0**20] * n,
             "abandoned": [True] * (n - 1) + [False], "scaler_updated": [False] * n, "optimizer_steps": [0] * n,
             "grad_nonfinite_layers": [3] * n, "grad_norm": [math.nan] * n, "loss": [1.0] * n}
    r = analyze(steps, amp_meta(init_scale=2.0**20))
    fs = [f for f in r.findings if f.code == "GP305"]
    assert len(fs) == 1 and fs[0].severity == "error"
    f = fs[0]
    assert f.evidence["discarded_overflow_steps"] == n - 1  # the last row is just where the run ended
    assert f.evidence["scale_during_discarded"] == {"min": 2.0**20, "max": 2.0**20}
    assert "never backed off" in f.message
    assert f.confidence == pytest.approx(1.0)
    assert "scaler.update()" in f.recommendations[0].snippet
    # those gradients are the scaler's business, not a numerics fault
    assert "GP402" not in codes(r)


def test_gp305_clip_on_scaled_gradients():
    rows = simulate_scaler(30, lambda i: 2.0**16)
    rows["clip_on_scaled"] = [True] * 30
    rows["clip_calls"] = [1] * 30
    rows["clip_max_norm"] = [1.0] * 30
    f = analyze(rows, amp_meta()).finding("GP305")
    assert f.severity == "error"
    assert f.evidence["effective_max_norm"] == pytest.approx(1.0 / 2.0**16)
    assert "unscale_" in f.recommendations[0].snippet
    # max_norm=inf only measures: the logged norm is scaled, the training is not hurt
    rows["clip_max_norm"] = [math.inf] * 30
    f2 = analyze(rows, amp_meta()).finding("GP305")
    assert f2.severity == "warning"


def test_gp305_scale_set_by_hand():
    rows = simulate_scaler(20, lambda i: 2.0**16)
    rows["scale_tampered"] = [False, True, True] + [False] * 17
    events = [{"kind": "scaler_misuse", "what": "scale_set_by_hand", "step": 1, "detail": "replaced"}]
    f = analyze(rows, amp_meta(), events=events).finding("GP305")
    assert f.severity == "warning" and f.first_step == 1
    assert f.evidence["events"] == ["scale_set_by_hand"]


def test_gp305_quiet_on_correct_loop_and_on_a_run_that_just_ended():
    rows = simulate_scaler(50, lambda i: 2.0**14)
    assert "GP305" not in codes(analyze(rows, amp_meta()))
    # the run ended after a backward, before update(): not a misuse
    rows["scaler_updated"][-1] = False
    rows["optimizer_steps"][-1] = 0
    rows["grad_nonfinite_layers"][-1] = 2
    assert "GP305" not in codes(analyze(rows, amp_meta()))


# ---------------------------------------------------------------- real CPU runs -------------
def _amp_run(logdir: str, *, init_scale: float | None = 2.0**16, n: int = 40, xscale: float = 1.0,
             yscale: float = 1.0, last_gain: float = 1.0, lr: float = 0.01) -> gradprobe.Report:
    """float16 autocast on an MLP (Linear layers), with or without a GradScaler."""
    model = mlp((8, 64, 64, 1))
    if last_gain != 1.0:
        with torch.no_grad():
            model[4].weight.mul_(last_gain)
            model[4].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if init_scale is not None else None
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(n):
            x, y = x * xscale, y * yscale
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    return gradprobe.analyze(logdir)


def test_real_default_scaler_is_info_only(logdir):
    r = _amp_run(logdir, n=60, lr=0.03)  # learns: the loss falls from ~10 to ~0.1
    assert r.errors == [] and r.warnings == [], [f.code for f in r.findings]  # no rule cries wolf
    f = r.finding("GP304")
    assert f.severity == "info"
    assert f.evidence["autocast_dtypes"] == ["float16"]
    assert f.evidence["scaler"]["init_scale"] == 2.0**16
    # the default scaler backs off a couple of times while the gradients grow: calibration,
    # not non-finite gradients (a run that meets them may switch mixed precision off for nothing)
    skipped = int(r.runlog.steps["skipped"].sum())
    assert skipped >= 1
    assert len(f.evidence["calibration"]["skipped_steps"]) == skipped
    assert "calibrating" in f.message


def test_real_extreme_init_scale_is_gp301(logdir):
    r = _amp_run(logdir, init_scale=2.0**40)
    f = r.finding("high-init-scale")
    assert f is not None and f.severity == "warning"
    assert f.evidence["skipped_at_start"] >= 20
    suggested = r.suggested_hyperparameters["init_scale"]
    assert 2.0**10 <= suggested <= 2.0**17 and math.log2(suggested).is_integer()
    assert not {"GP302", "GP402"} & codes(r)


def test_real_forward_overflow_is_gp302(logdir):
    r = _amp_run(logdir, xscale=3e4, n=30)
    f = r.finding("fp16-overflow")
    assert f is not None and f.severity == "error"
    assert r.suggested_hyperparameters["amp_dtype"] == "bfloat16"
    assert f.evidence["input_absmax"] > 65504
    assert "GP301" not in codes(r)
    loss = r.finding("nonfinite-loss")
    assert loss is not None and "fp16-overflow" in loss.caused_by
    assert "GP402" not in codes(r)  # every such step was skipped by the scaler on purpose


def _guarded_fp16_loop(logdir: str, *, xscale: float, first_gain: float = 1.0, n: int = 12) -> gradprobe.Report:
    """A common hand-made guard: non-finite losses are skipped before the scaler sees them."""
    model = mlp((8, 64, 64, 1))
    with torch.no_grad():
        model[0].weight.mul_(first_gain)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(n):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x * xscale).float(), y)
            if not torch.isfinite(loss):
                opt.zero_grad()
                continue
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return gradprobe.analyze(logdir)


def test_real_fp16_backward_overflow_with_no_successful_step(logdir):
    # inputs up to ~1.2e4 fit in float16; the backward of a loss of ~3e4 does not, at any scale
    r = _guarded_fp16_loop(logdir, xscale=3e3)
    f = r.finding("fp16-overflow")
    assert f is not None and f.evidence["triggers"] == ["no_step_succeeded"]
    assert f.evidence["skipped_fraction"] == 1.0
    assert r.suggested_hyperparameters["amp_dtype"] == "bfloat16"
    assert not {"GP301", "GP303", "GP402"} & codes(r)


def test_real_fp16_forward_overflow_seen_in_activations(logdir):
    # small inputs, a first layer 3000x too large: its float16 output overflows; the guard
    # skips those losses before the scaler, so only the sampled activations show where
    r = _guarded_fp16_loop(logdir, xscale=30.0, first_gain=3000.0)
    f = r.finding("fp16-overflow")
    assert f is not None and "activation_overflow" in f.evidence["triggers"]
    assert f.layer == "0"
    assert f.evidence["input_absmax"] < 65504 / 8
    assert "fp16-overflow" in r.finding("GP401").caused_by
    assert not {"GP303", "GP404"} & codes(r)


def test_real_fp16_without_scaler_underflows(logdir):
    # small targets (~1e-4, like returns) and a small output layer: the backward of the two
    # first Linear layers falls below 2**-24 in float16 and flushes to zero
    r = _amp_run(logdir, init_scale=None, n=20, yscale=1e-4, last_gain=1e-3)
    f = r.finding("amp-without-scaler")
    assert f is not None and f.severity == "error"
    assert {"0.weight", "2.weight"} <= set(f.evidence["underflowed_layers"])
    assert r.suggested_hyperparameters.get("init_scale") == 2.0**16


def test_real_same_run_with_scaler_does_not_underflow(logdir):
    r = _amp_run(logdir, n=20, yscale=1e-4, last_gain=1e-3)
    assert "GP303" not in codes(r)
    assert loud(r) == []


def test_real_fp16_autocast_only_for_evaluation_is_not_gp303(logdir):
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        for i, (x, y) in enumerate(regression_batches(12)):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if i % 4 == 3:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                    nn.functional.mse_loss(model(x).float(), y)
    r = gradprobe.analyze(logdir)
    assert "GP303" not in codes(r)
    assert r.finding("GP304").evidence["fp16_eval_only"] == ["0", "2", "4"]


def _report_002_loop(logdir: str, *, unscale_first: bool, init_scale: float = 1e9, n: int = 15) -> None:
    """The AMP loop of sample 002: `continue` on an inf gradient norm before scaler.update()."""
    model = mlp((8, 64, 64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(n):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if not torch.isfinite(grad_norm):
                opt.zero_grad()
                continue
            scaler.step(opt)
            scaler.update()


def test_real_report_002_continue_before_update(logdir):
    _report_002_loop(logdir, unscale_first=False)
    r = gradprobe.analyze(logdir)
    misuse = {f.title: f for f in r.findings if f.code == "GP305"}
    upd = misuse["scaler.update() skipped after an overflow"]
    assert upd.severity == "error" and upd.first_step == 0
    assert upd.evidence["discarded_overflow_steps"] >= 10
    assert upd.evidence["scale_during_discarded"]["min"] == upd.evidence["scale_during_discarded"]["max"] == 1e9
    clip = misuse["Gradients clipped while still scaled"]
    assert clip.evidence["effective_max_norm"] == pytest.approx(0.5 / 1e9)
    assert not {"GP301", "GP302", "GP402"} & codes(r)


def test_real_report_002_with_unscale_crashes_and_is_named(logdir):
    with pytest.raises(RuntimeError, match="since the last update"):
        _report_002_loop(logdir, unscale_first=True)
    f = gradprobe.analyze(logdir).finding("GP305")
    assert f is not None and f.severity == "error"
    assert "since the last update" in f.evidence["exception"]


def test_real_gru_stays_float32_under_cpu_fp16_autocast(logdir):
    model = SeqRegressor("gru")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for _ in range(4):
            x, y = torch.randn(4, 10, 4), torch.randn(4, 10, 1)
            with torch.autocast("cpu", dtype=torch.float16):
                out, _ = model(x)
                loss = nn.functional.mse_loss(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    f = gradprobe.analyze(logdir).finding("GP304")
    assert f.evidence["not_honoured"] == ["rnn (GRU): float16 requested, output float32"]
    assert "head (Linear)" in f.evidence["modules"]["float16"]


def test_real_lstm_fails_under_cpu_fp16_autocast(logdir):
    model = SeqRegressor("lstm")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError):
        with gradprobe.watch(model, opt, scaler=torch.amp.GradScaler("cpu"), logdir=logdir):
            with torch.autocast("cpu", dtype=torch.float16):
                model(torch.randn(4, 10, 4))
    f = gradprobe.analyze(logdir).finding("GP304")
    assert any(s.startswith("rnn (LSTM)") for s in f.evidence["failed"])


def test_every_amp_rule_documents_itself():
    from gradprobe.rules.base import get_rule

    for code in AMP_CODES:
        cls = get_rule(code)
        assert cls is not None and cls.__doc__ and "onfidence" in cls.__doc__
        for attr in ("what", "why", "causes", "fix", "example"):
            assert getattr(cls.explanation, attr).strip()
    assert set(get_rule("GP301").computes) == {"init_scale", "growth_interval"}
    assert set(get_rule("GP302").computes) == {"amp_dtype"}
