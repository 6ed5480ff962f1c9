"""Stopping a doomed run early (``stop_on``, ``gradprobe run --stop-on``; gradprobe.live).

Real tiny runs on both sides: a run whose parameters go NaN is stopped within a few hundred
steps with its diagnosis (RunStopped under ``watch``, exit status 3 under ``gradprobe run``),
and healthy runs under ``stop_on`` run to the end, bit-identical to runs without it. The live
checks are also fed synthetic step columns, each with its doomed case and a look-alike the
rule does not call final. The corpus check (no live request goes unconfirmed on the faulty
corpus programs) and the 20000-step healthy run are in the slow tier
(tests/test_early_stop_slow.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradprobe
from gradprobe import live
from gradprobe.live import EXIT_STOPPED, LIVE_CHECKS, NOT_LIVE, LiveChecks, RunStopped

REPO = Path(__file__).resolve().parents[1]
#: the fault comes at this step; the stop must follow within a few hundred steps (the writer
#: hands steps to the checks every 0.5 s or 256 steps, the engine confirms at the next boundary)
FAULT_STEP = 50
STOP_WITHIN = 400


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def gp_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradprobe", "run", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


#: the issue's script: a tiny regression that turns NaN at step NAN_AT of STEPS (argv), with a
#: OneCycleLR over all of them (the script says how many steps it meant to run); it writes a
#: checksum of its final parameters to argv[3] when it gets there
NAN_SCRIPT = '''
import sys, torch
torch.manual_seed(0)
steps, nan_at, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=steps)
x = torch.randn(8, 4); y = x.sum(1, keepdim=True)
for step in range(steps):
    xb = x * float("nan") if step == nan_at else x
    loss = torch.nn.functional.mse_loss(model(xb), y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
with open(out, "w") as f:
    f.write(repr([p.detach().double().sum().item() for p in model.parameters()]))
'''


# ------------------------------------------------------------------ the registry ------
def test_every_final_rule_has_a_live_check_or_a_reason():
    from gradprobe.rules.base import registry

    final = {cls.code for cls in registry() if cls.final_when}
    assert final == set(LIVE_CHECKS) | set(NOT_LIVE), "a rule declares final_when without a live check or a reason"
    assert not set(LIVE_CHECKS) & set(NOT_LIVE)
    assert all(isinstance(reason, str) and reason for reason in NOT_LIVE.values())
    for code, cls in LIVE_CHECKS.items():
        assert cls.code == code and cls.follows and cls.__doc__


def test_thresholds_mirror_the_rules():
    """The checks ask on the rules' own final conditions (the engine is the arbiter)."""
    from gradprobe.analysis import amp
    from gradprobe.rules import nonfinite, recurrent, scaler_misuse

    assert live.SUSTAINED_NONFINITE == nonfinite.SUSTAINED_NONFINITE
    assert live.SUSTAINED_FRACTION == nonfinite.SUSTAINED_NONFINITE_FRACTION
    assert live.AGE_UNBOUNDED_FRACTION == recurrent.UNBOUNDED_AGE
    assert (live.GRAPHS_ALIVE, live.GRAPHS_RISING) == (recurrent.GRAPHS_ALIVE, recurrent.GRAPHS_RISING)
    assert live.FINAL_DISCARDED_TAIL == scaler_misuse.FINAL_DISCARDED_TAIL
    assert (live.LONG_BURST_HALVINGS, live.FP16_MAX_SCALE) == (amp.LONG_BURST_HALVINGS, amp.FP16_MAX_SCALE)


# ------------------------------------------------- the checks on synthetic columns ----
def _cols(n: int, start: int = 0, **columns: list) -> dict:
    """A writer batch of ``n`` healthy steps from ``start``, with ``columns`` overridden."""
    nan = math.nan
    base = {
        "step": list(range(start, start + n)), "loss": [1.0] * n, "loss_nonfinite": [False] * n, "loss_fn": [nan] * n,
        "loss_fn_nonfinite": [False] * n, "param_nonfinite_layers": [0] * n, "state_age": [0] * n,
        "graphs_alive": [0] * n, "scale": [nan] * n, "scale_before": [nan] * n, "skipped": [False] * n,
        "grad_nonfinite_layers": [0] * n, "grad_norm": [1.0] * n, "abandoned": [False] * n,
        "scaler_updated": [False] * n, "optimizer_steps": [1] * n,
    }
    for k, v in columns.items():
        assert len(v) == n, k
        base[k] = list(v)
    return base


def _feed(check: live.LiveCheck, *batches: dict) -> int | None:
    out = None
    for cols in batches:
        out = check.feed(live.Batch(cols))
        if out is not None:
            return out
    return out


def test_gp401_asks_after_20_non_finite_losses_and_a_tenth_of_the_run():
    nan = math.nan
    c = live.SustainedNonfiniteLoss()
    assert _feed(c, _cols(50), _cols(19, 50, loss=[nan] * 19, loss_nonfinite=[True] * 19)) is None
    assert _feed(c, _cols(1, 69, loss=[nan], loss_nonfinite=[True])) == 69
    # a stray NaN batch the run recovered from never reaches the tail
    c = live.SustainedNonfiniteLoss()
    flags = [i % 10 == 0 for i in range(300)]
    assert _feed(c, _cols(300, loss=[nan if f else 1.0 for f in flags], loss_nonfinite=flags)) is None
    # 20 trailing NaN losses after 500 good steps are not yet a tenth of the run
    c = live.SustainedNonfiniteLoss()
    assert _feed(c, _cols(500), _cols(20, 500, loss=[nan] * 20, loss_nonfinite=[True] * 20)) is None
    c.back_off()  # twice the evidence: 40 steps, and still a tenth of the run
    assert _feed(c, _cols(30, 520, loss=[nan] * 30, loss_nonfinite=[True] * 30)) is None  # 50 of 550
    assert _feed(c, _cols(10, 550, loss=[nan] * 10, loss_nonfinite=[True] * 10)) == 559  # 60 of 560


def test_gp403_asks_on_three_non_finite_steps_and_retires_when_they_recover():
    c = live.PersistentNonfiniteParameters()
    assert _feed(c, _cols(10), _cols(2, 10, param_nonfinite_layers=[2, 2])) is None
    assert _feed(c, _cols(1, 12, param_nonfinite_layers=[1])) == 12
    c = live.PersistentNonfiniteParameters()  # a checkpoint reload repairs them at the next step
    assert _feed(c, _cols(3, param_nonfinite_layers=[0, 2, 0]), _cols(5, 3, param_nonfinite_layers=[2] * 5)) is None
    assert c.retired
    c = live.PersistentNonfiniteParameters()  # unmeasured steps (-1) are neither
    assert _feed(c, _cols(6, param_nonfinite_layers=[3, -1, -1, 3, -1, 3])) == 5


def test_gp101_asks_once_the_age_grows_every_step_to_32():
    c = live.UnboundedStateAge()
    assert _feed(c, _cols(31, state_age=list(range(1, 32)))) is None
    assert _feed(c, _cols(1, 31, state_age=[32])) == 31
    # detached every 10 steps: bounded, never asks
    c = live.UnboundedStateAge()
    assert _feed(c, _cols(400, state_age=[1 + i % 10 for i in range(400)])) is None


def test_gp103_asks_on_8_graphs_rising_on_half_the_steps():
    c = live.RisingRetainedGraphs()
    assert _feed(c, _cols(10, graphs_alive=[0, 0, 0, 1, 2, 3, 4, 5, 6, 7])) is None
    assert _feed(c, _cols(1, 10, graphs_alive=[8])) == 10
    c = live.RisingRetainedGraphs()  # a fixed-size history plateaus
    assert _feed(c, _cols(100, graphs_alive=[min(i, 9) for i in range(100)])) is None


def test_gp302_asks_when_no_scaled_step_succeeded_8_halvings_below_fp16():
    scales = [2.0 ** (16 - i) for i in range(10)]
    c = live.NoScaledStepSucceeded()
    assert _feed(c, _cols(7, scale_before=scales[:7], scale=[s / 2 for s in scales[:7]], skipped=[True] * 7)) is None
    assert _feed(c, _cols(3, 7, scale_before=scales[7:], scale=[s / 2 for s in scales[7:]], skipped=[True] * 3)) == 9
    c = live.NoScaledStepSucceeded()  # a calibration: the 9th step succeeds
    assert _feed(c, _cols(9, scale_before=scales[:9], scale=scales[:9], skipped=[True] * 8 + [False])) is None
    assert c.retired


def test_gp305_asks_on_3_discarded_overflows_at_a_scale_that_never_moved():
    n = 4
    cols = dict(scale_before=[65536.0] * n, scale=[65536.0] * n, grad_norm=[math.inf] * n, abandoned=[True] * n,
                optimizer_steps=[0] * n)
    c = live.DiscardedOverflowsAtFixedScale()
    assert _feed(c, _cols(n, **cols)) == 3
    c = live.DiscardedOverflowsAtFixedScale()  # update() called every step: the scaler skips, no misuse
    assert _feed(c, _cols(n, **{**cols, "abandoned": [False] * n, "scaler_updated": [True] * n,
                                "skipped": [True] * n})) is None


def test_live_checks_take_one_request_and_never_raise():
    checks = LiveChecks()
    checks.feed(_cols(5, param_nonfinite_layers=[1] * 5))
    assert checks.pending and checks.candidate == ("GP403", 4)
    assert checks.take() == ("GP403", 4) and not checks.pending
    checks.feed({"step": [1, 2]})  # columns missing: the checks switch off, the writer goes on
    assert not checks.enabled and checks.failed and "KeyError" in checks.failed
    assert checks.stats()["steps"] == 7


def test_hand_over_bound_doubles_from_16_to_256():
    """Under stop_on the probe hands steps to the writer (and the checks) after 16 steps,
    then after as many as were handed over so far, up to 256 (and the configured bound)."""
    from types import SimpleNamespace

    probe = SimpleNamespace(_flush_steps=live.STOP_FLUSH_STEPS, config=SimpleNamespace(flush_steps=512))
    stopper = live.Stopper(probe, "error")
    bounds = []
    for fed in (1, 17, 33, 65, 129, 257, 513, 5000):
        stopper.checks.after_feed(fed)
        bounds.append(probe._flush_steps)
    assert bounds == [16, 17, 33, 65, 129, 256, 256, 256]
    probe.config.flush_steps = 100
    stopper.ramp(5000)
    assert probe._flush_steps == 100


def test_a_fault_in_the_first_steps_of_a_short_run_is_stopped(logdir):
    """250 steps of a tiny model train in a fraction of a second: only the step bound hands
    them over before the run ends; it starts at 16, so a NaN at step 3 stops the run."""
    with pytest.raises(RunStopped) as info:
        _nan_loop({"logdir": logdir, "stop_on": "error", "profile": "light"}, 250, 3)
    assert 3 < info.value.step < 250 and info.value.finding.code in ("GP401", "GP403")


def test_stop_on_is_checked():
    assert live.check_stop_on(None) == "never"
    for bad in ("info", "fatal", 3):
        with pytest.raises(ValueError, match="stop_on must be one of error, warning, never"):
            live.check_stop_on(bad)
    with pytest.raises(ValueError, match="stop_on"):
        gradprobe.watch(torch.nn.Linear(2, 1), stop_on="info")


# -------------------------------------------------------------------- watch() -------
def _nan_loop(probe_kwargs: dict, steps: int, nan_at: int | None, catch_all: bool = False) -> tuple[torch.nn.Module, int]:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    y = x.sum(1, keepdim=True)
    done = 0
    with gradprobe.watch(model, opt, **probe_kwargs):
        for step in range(steps):
            xb = x * float("nan") if step == nan_at else x
            loss = torch.nn.functional.mse_loss(model(xb), y)
            opt.zero_grad()
            loss.backward()
            if catch_all:
                try:
                    opt.step()
                except Exception:  # noqa: BLE001 - the user's guard: RunStopped must get through
                    pytest.fail("RunStopped was caught by except Exception")
            else:
                opt.step()
            done = step + 1
    return model, done


def test_watch_stops_a_run_whose_parameters_went_nan(logdir):
    with pytest.raises(RunStopped) as info:
        _nan_loop({"logdir": logdir, "stop_on": "error", "total_steps": 20000, "profile": "light"}, 20000, FAULT_STEP,
                  catch_all=True)
    exc = info.value
    assert isinstance(exc, SystemExit) and exc.code == EXIT_STOPPED
    assert FAULT_STEP < exc.step < FAULT_STEP + STOP_WITHIN
    assert exc.finding.final and exc.finding.severity == "error" and exc.finding.code in ("GP401", "GP403")
    assert exc.report.finding(exc.finding.code) is exc.finding
    d = exc.decision
    assert (d.total_steps, d.steps_left, d.total_from) == (20000, 20000 - d.steps, "watch(total_steps=)")
    assert d.trigger["code"] in LIVE_CHECKS and FAULT_STEP <= d.trigger["step"] <= exc.step
    assert f"after step {exc.step}" in str(exc) and f"{d.steps_left} of 20000 steps left" in str(exc)
    # the log holds the stop, the run is not recorded as crashed, and a re-read reports it
    meta = json.loads(Path(logdir, "gradprobe.json").read_text())
    assert meta["stopped"]["step"] == exc.step and meta["live_checks"]["stop_on"] == "error"
    assert not meta["live_checks"].get("unconfirmed")
    evs = [json.loads(line) for line in Path(logdir, "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evs if e["kind"] == "stopped"] == [exc.step]
    assert not [e for e in evs if e["kind"] == "exception"]
    again = gradprobe.analyze(logdir)
    assert again.source["stopped"]["code"] == exc.finding.code
    assert f"stopped after step {exc.step} (--stop-on)" in again.render("text")


def test_watch_healthy_run_is_bit_identical_and_never_stops(logdir, tmp_path):
    from tests.helpers import identical, param_checksum

    torch.manual_seed(1)
    plain, done = _nan_loop({"logdir": str(tmp_path / "plain"), "profile": "light"}, 600, None)
    torch.manual_seed(1)
    stopped, done2 = _nan_loop({"logdir": logdir, "profile": "light", "stop_on": "warning"}, 600, None)
    assert done == done2 == 600
    assert identical(param_checksum(plain), param_checksum(stopped))
    meta = json.loads(Path(logdir, "gradprobe.json").read_text())
    assert "stopped" not in meta and meta["live_checks"]["steps"] == 600 and not meta["live_checks"].get("unconfirmed")


def test_a_request_the_engine_does_not_confirm_is_recorded_and_backed_off(logdir):
    """Training goes on; the disagreement is kept in the metadata; the check asks again only
    on twice the evidence."""
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    with gradprobe.watch(model, opt, logdir=logdir, stop_on="error", profile="light") as probe:
        for step in range(40):
            if step == 20:  # a request on a healthy run, as a live check's false alarm would make one
                probe.stopper.checks.candidate = ("GP401", 19)
                probe.stopper.checks.pending = True
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert not probe.stopper.checks.pending and probe.stopper.decision is None
        assert probe.stopper.checks.checks["GP401"].level == 2
    meta = json.loads(Path(logdir, "gradprobe.json").read_text())
    (entry,) = meta["live_checks"]["unconfirmed"]
    assert entry["code"] == "GP401" and entry["step"] == 19 and entry["checked_at"] == 21
    assert entry["engine"] == ["no GP401 finding"] and meta["live_checks"]["levels"] == {"GP401": 2}
    assert meta["steps"] == 40


def test_a_fault_in_the_stop_switches_it_off_and_training_goes_on(logdir, monkeypatch):
    import gradprobe.engine

    def broken(log):
        raise RuntimeError("engine broke")

    monkeypatch.setattr(gradprobe.engine, "analyze_runlog", broken)
    with pytest.warns(gradprobe.GradprobeWarning, match="'stop' probe failed"):
        model, done = _nan_loop({"logdir": logdir, "stop_on": "error", "profile": "light"}, 400, FAULT_STEP)
    assert done == 400


# -------------------------------------------------------------- gradprobe run -------
def test_gradprobe_run_stops_the_issue_script_with_exit_status_3(tmp_path):
    """NaN at step 50 of 20000 under --stop-on error: stopped within a few hundred steps, the
    report names the step and the steps left (the OneCycleLR says 20000), exit status 3."""
    script = tmp_path / "nan_at.py"
    script.write_text(textwrap.dedent(NAN_SCRIPT))
    res = gp_run("--stop-on", "error", "--profile", "light", "--logdir", "log", "--format", "json", "--output", "r.json",
                 str(script), "20000", str(FAULT_STEP), "params.txt", cwd=tmp_path)
    assert res.returncode == EXIT_STOPPED, res.stderr
    assert not (tmp_path / "params.txt").exists()  # the script never reached its end
    assert "Traceback" not in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    stop = report["source"]["stopped"]
    assert FAULT_STEP < stop["step"] < FAULT_STEP + STOP_WITHIN
    assert stop["total_steps"] == 20000 and stop["steps_left"] == 20000 - stop["steps"]
    assert stop["total_from"] == "OneCycleLR total_steps" and stop["code"] in ("GP401", "GP403")
    assert any(f["code"] == stop["code"] and f["final"] for f in report["findings"])
    assert (f"the run was stopped after step {stop['step']} by --stop-on ({stop['code']}" in res.stderr
            and "exit status 3" in res.stderr)
    import jsonschema

    schema = json.loads((REPO / "gradprobe" / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    # the text report says it too
    text = subprocess.run([sys.executable, "-m", "gradprobe", "analyze", "log", "--fail-on", "never"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert f"stopped after step {stop['step']} (--stop-on): {stop['code']}" in text.stdout
    assert f"{stop['steps_left']} of 20000 steps left" in text.stdout


def test_gradprobe_run_healthy_under_stop_on_is_bit_identical_and_exits_0(tmp_path):
    script = tmp_path / "nan_at.py"
    script.write_text(textwrap.dedent(NAN_SCRIPT))
    plain = subprocess.run([sys.executable, str(script), "1500", "-1", "plain.txt"], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    res = gp_run("--stop-on", "error", "--no-report", "--logdir", "log", str(script), "1500", "-1", "watched.txt",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "watched.txt").read_text() == (tmp_path / "plain.txt").read_text()
    meta = json.loads((tmp_path / "log" / "gradprobe.json").read_text())
    assert meta["steps"] == 1500 and "stopped" not in meta and meta["run"]["stop_on"] == "error"


def test_gradprobe_run_names_a_watched_child_that_was_stopped(tmp_path):
    """The stopped child exits 3; the script fails with it; gradprobe run exits 3 and names it."""
    (tmp_path / "child.py").write_text(textwrap.dedent(NAN_SCRIPT))
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent('''
        import subprocess, sys
        proc = subprocess.run([sys.executable, "child.py", "20000", "30", "out.txt"])
        print("child exit", proc.returncode)
        proc.check_returncode()
    '''))
    res = gp_run("--stop-on", "error", "--profile", "light", "--logdir", "log", "--format", "json", "--output", "r.json",
                 str(parent), cwd=tmp_path)
    assert res.returncode == EXIT_STOPPED, res.stderr
    assert "child exit 3" in res.stdout
    stop = json.loads((tmp_path / "r.json").read_text())["source"]["stopped"]
    assert stop["run"].startswith("pid ") and stop["run"].endswith("child.py")
    assert f"the run ({stop['run']}) was stopped after step {stop['step']} by --stop-on" in res.stderr


def test_stop_on_in_the_cli_is_a_choice(tmp_path):
    res = gp_run("--stop-on", "fatal", "x.py", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--stop-on" in res.stderr
