"""Clipping seen by its effect, whoever clips: the gradient as the last backward of a step left
it (``grad_norm``) against the one the optimizer stepped with (``step_grad_norm``), per step
(``grad_change``) and over the run (:func:`gradprobe.probe.rescaling.classify_log`).

Each loop is real PyTorch training: a hand-written clip (``p.grad.mul_`` and the ``.data``
form DeepSpeed uses), accelerate's clip, Lightning's ``gradient_clip_val``, LBFGS with a
closure that clips, a float16 GradScaler with ``unscale_`` then clip, a fused Adam with a
scaler, gradient accumulation (dividing the loss, or the gradients), and loops that never
clip. The configured ``max_norm`` still comes from the patched function where it is called,
and the two sources are tested to agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.probe.rescaling import CLIP, FACTOR, NONE_OBSERVED, classify_log
from tests.helpers import mlp, regression_batches

MAX_NORM = 0.05  # far below these loops' gradient norms (~0.5-5): the clip fires on most steps


def _total(params) -> float:
    return math.sqrt(sum(float(p.grad.detach().float().norm()) ** 2 for p in params if p.grad is not None))


def clip_by_hand(params, max_norm: float, *, data: bool = False) -> None:
    """A clip no patch sees: ``p.grad.mul_(c)`` (a custom loop), or ``p.grad.data.mul_(c)``
    (DeepSpeed's form, which leaves the gradient's version unchanged)."""
    params = [p for p in params if p.grad is not None]
    with torch.no_grad():
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            (p.grad.data if data else p.grad).mul_(coef)


def _sgd_loop(logdir: str, clip, steps: int = 12, every: int = 10**9, lr: float = 0.005) -> tuple[gradprobe.RunLog, list[tuple[float, float]]]:
    """A plain SGD loop clipping with ``clip(params)`` (None: no clip); returns the log and
    the brute-force (pre, post) total norms of each step."""
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cfg = gradprobe.ProbeConfig(schedule=gradprobe.Schedule(every=every, early_until=0), deep=False)
    ref = []
    with gradprobe.watch(model, opt, logdir=logdir, config=cfg):
        for x, y in regression_batches(steps):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) * 10).backward()
            pre = _total(model.parameters())
            if clip is not None:
                clip(list(model.parameters()))
            ref.append((pre, _total(model.parameters())))
            opt.step()
    return gradprobe.RunLog.load(logdir), ref


def _assert_matches(log: gradprobe.RunLog, ref: list[tuple[float, float]]) -> None:
    st = log.steps
    assert len(st) == len(ref)
    np.testing.assert_allclose(st["grad_norm"], [r[0] for r in ref], rtol=1e-5)
    np.testing.assert_allclose(st["step_grad_norm"], [r[1] for r in ref], rtol=1e-4)


@pytest.mark.parametrize("data", [False, True], ids=["p.grad.mul_", "p.grad.data.mul_"])
def test_a_clip_written_by_hand_is_seen_as_a_clip(tmp_path, data):
    log, ref = _sgd_loop(str(tmp_path / "r"), lambda ps: clip_by_hand(ps, MAX_NORM, data=data))
    _assert_matches(log, ref)
    st = log.steps
    assert (st["clip_calls"] == 0).all()  # no patched function saw it
    fired = np.array([pre > MAX_NORM for pre, _ in ref])
    assert fired.sum() >= 8
    assert st["grad_change"].tolist() == [1 if f else 0 for f in fired]
    r = classify_log(log)
    assert r.kind == CLIP and r.max_norm == pytest.approx(MAX_NORM, rel=1e-3)
    assert r.mask.tolist() == fired.tolist()


def test_clip_grad_norm_and_its_effect_agree(tmp_path):
    """The two sources: ``clip_grad_norm_``'s patch gives the configured ``max_norm`` and a
    coefficient (B derived from A on unsampled steps, no second pass), the effect gives B
    measured (every step sampled here, and a hand-written clip with the same arithmetic).
    Every step's norms, the change per step and the run's verdict agree."""
    clip = lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)  # noqa: E731
    derived, ref = _sgd_loop(str(tmp_path / "derived"), clip)
    measured, ref2 = _sgd_loop(str(tmp_path / "measured"), clip, every=1)
    by_hand, ref3 = _sgd_loop(str(tmp_path / "hand"), lambda ps: clip_by_hand(ps, MAX_NORM))
    assert ref == ref2
    np.testing.assert_allclose([r[1] for r in ref3], [r[1] for r in ref], rtol=1e-5)
    for log in (derived, measured, by_hand):
        _assert_matches(log, ref)
    assert not derived.steps["sampled"].iloc[1:].any() and measured.steps["sampled"].all()
    changes = derived.steps["grad_change"].tolist()
    assert changes == measured.steps["grad_change"].tolist() == by_hand.steps["grad_change"].tolist()
    assert sum(changes) >= 8
    verdicts = [classify_log(log) for log in (derived, measured, by_hand)]
    assert {v.kind for v in verdicts} == {CLIP}
    # the patch's configured max_norm is what the effect shows where the clip fired
    np.testing.assert_allclose(derived.steps["clip_max_norm"], MAX_NORM, rtol=1e-6)
    for v in verdicts:
        assert v.max_norm == pytest.approx(float(derived.steps["clip_max_norm"].iloc[0]), rel=1e-3)


def test_a_loop_that_never_clips_and_a_clip_that_never_fires_are_unknown(tmp_path):
    """Nothing changed the gradient: "none observed", which says nothing about whether the
    run clips (a clip above every norm looks the same)."""
    for name, clip in (("none", None), ("high", lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e12))):
        log, ref = _sgd_loop(str(tmp_path / name), clip)
        _assert_matches(log, ref)
        assert (log.steps["grad_change"] == 0).all()
        r = classify_log(log)
        assert r.kind == NONE_OBSERVED and not r.clipping_known and r.max_norm is None


def test_lbfgs_with_a_closure_that_clips(tmp_path):
    """LBFGS runs backward and the clip inside the closure, after the pre-step hook: the
    comparison point is after the step, and the last closure's gradient is A."""
    torch.manual_seed(0)
    model = mlp((4, 16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x = torch.randn(64, 4)
    y = (x ** 2).sum(1, keepdim=True)
    seen: list[tuple[float, float]] = []
    with gradprobe.watch(model, opt, logdir=str(tmp_path / "r"), profile="light"):
        for _ in range(6):
            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                pre = _total(model.parameters())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                seen.append((pre, _total(model.parameters())))
                return loss

            opt.step(closure)
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    st = log.steps
    assert len(st) == 6 and (st["n_backward"] > 1).any()
    # each step's record is its last closure's
    last = [seen[i - 1] for i in np.cumsum(st["n_backward"])]
    np.testing.assert_allclose(st["grad_norm"], [p for p, _ in last], rtol=1e-5)
    np.testing.assert_allclose(st["step_grad_norm"], [q for _, q in last], rtol=1e-4)
    fired = [p > 0.5 for p, _ in last]
    assert any(fired) and st["grad_change"].tolist() == [int(f) for f in fired]
    r = classify_log(log)
    assert r.kind == CLIP and r.max_norm == pytest.approx(0.5, rel=1e-3)


def test_fp16_gradscaler_unscale_then_clip(tmp_path):
    """float16 autocast with a GradScaler: A is the unscaled gradient, ``unscale_`` is not a
    rescaling of it, the clip after it is; the steps the scaler skips (inf) say nothing."""
    torch.manual_seed(0)
    model = mlp((8, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)  # grows into overflow: skipped steps
    ref = []
    with gradprobe.watch(model, opt, scaler=scaler, logdir=str(tmp_path / "r"), profile="light"):
        for x, y in regression_batches(16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y) * 10
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            pre = _total(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            ref.append((pre, _total(model.parameters())))
            scaler.step(opt)
            scaler.update()
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    st = log.steps
    skipped = st["skipped"].to_numpy()
    assert 0 < skipped.sum() < len(st) - 6
    ok = ~skipped
    np.testing.assert_allclose(st["grad_norm"][ok], np.array([r[0] for r in ref])[ok], rtol=1e-4)
    np.testing.assert_allclose(st["step_grad_norm"][ok], np.array([r[1] for r in ref])[ok], rtol=1e-4)
    assert not st["clip_on_scaled"].any()
    r = classify_log(log)
    assert r.kind == CLIP and r.max_norm == pytest.approx(MAX_NORM, rel=1e-3)
    assert r.rescaled == int(ok.sum())


def test_fused_adam_with_a_scaler_is_not_a_clip(tmp_path):
    """A fused Adam with a GradScaler unscales the gradients inside ``step`` (in place: after
    the step they are divided by the scale). Compared before the step, against the unscaled
    A, nothing changed them."""
    torch.manual_seed(0)
    model = mlp((16, 64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    after = []
    with gradprobe.watch(model, opt, scaler=scaler, logdir=str(tmp_path / "r"), profile="light"):
        for x, y in regression_batches(10, features=16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = _total(model.parameters())
            scale = scaler.get_scale()
            scaler.step(opt)
            after.append((before / scale, _total(model.parameters())))
            scaler.update()
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    st = log.steps
    ok = ~st["skipped"].to_numpy()
    assert ok.sum() >= 8
    # the trap is real: the step left the gradients unscaled in place
    np.testing.assert_allclose([b for b, _ in after], [a for _, a in after], rtol=1e-3)
    np.testing.assert_allclose(st["grad_norm"][ok], np.array([b for b, _ in after])[ok], rtol=1e-3)
    np.testing.assert_allclose(st["step_grad_norm"][ok], st["grad_norm"][ok], rtol=1e-6)
    assert (st["grad_change"][ok] == 0).all()
    assert classify_log(log).kind == NONE_OBSERVED


@pytest.mark.parametrize("divide", ["loss", "gradients"])
def test_gradient_accumulation(tmp_path, divide):
    """Four backward passes per step: A is the gradient the last one left. Dividing the loss
    by the count changes nothing between that backward and the step; dividing the
    accumulated gradients by it is a constant factor, not a clip."""
    torch.manual_seed(0)
    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = regression_batches(24, batch=8)
    ref = []
    with gradprobe.watch(model, opt, logdir=str(tmp_path / "r"), profile="light"):
        for k in range(6):
            opt.zero_grad()
            for x, y in batches[4 * k: 4 * k + 4]:
                loss = nn.functional.mse_loss(model(x), y)
                (loss / 4 if divide == "loss" else loss).backward()
            pre = _total(model.parameters())
            if divide == "gradients":
                for p in model.parameters():
                    p.grad /= 4
            ref.append((pre, _total(model.parameters())))
            opt.step()
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    assert log.steps["n_backward"].tolist() == [4] * 6
    _assert_matches(log, ref)
    r = classify_log(log)
    if divide == "loss":
        assert (log.steps["grad_change"] == 0).all() and r.kind == NONE_OBSERVED
    else:
        assert (log.steps["grad_change"] == 1).all()
        assert r.kind == FACTOR and r.factor == pytest.approx(0.25, rel=1e-4)


def test_clipping_one_optimizers_gradients_of_two(tmp_path):
    """Uniformity is judged per optimizer: a GAN loop clipping only the discriminator's
    gradients is a uniform rescaling of that optimizer's, and the generator's are unchanged."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    with gradprobe.watch([G, D], [opt_g, opt_d], logdir=str(tmp_path / "r"), profile="light"):
        for _ in range(6):
            real, fake = torch.randn(16, 2) + 2, G(torch.randn(16, 4))
            loss_d = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
            opt_d.zero_grad()
            loss_d.backward()
            clip_by_hand(list(D.parameters()), 1e-3)
            opt_d.step()
            opt_g.zero_grad()
            bce(D(fake), torch.ones(16, 1)).backward()
            opt_g.step()
    st = gradprobe.RunLog.load(str(tmp_path / "r")).steps
    assert st["grad_change"].tolist() == [1] * 6
    assert (st["step_grad_norm"] < st["grad_norm"]).all()


@pytest.mark.slow
def test_accelerate_clip(tmp_path):
    """accelerate's ``Accelerator.clip_grad_norm_`` (its own call pattern, whatever function
    it ends up calling)."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = mlp((8, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = accelerate.Accelerator(cpu=True)
    model, popt = acc.prepare(model, opt)
    ref = []
    with gradprobe.watch(model, opt, logdir=str(tmp_path / "r"), profile="light"):
        for x, y in regression_batches(10):
            popt.zero_grad()
            acc.backward(nn.functional.mse_loss(model(x), y) * 10)
            pre = _total(model.parameters())
            acc.clip_grad_norm_(model.parameters(), MAX_NORM)
            ref.append((pre, _total(model.parameters())))
            popt.step()
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    _assert_matches(log, ref)
    r = classify_log(log)
    assert r.kind == CLIP and r.max_norm == pytest.approx(MAX_NORM, rel=1e-3)
    np.testing.assert_allclose(log.steps["clip_max_norm"], MAX_NORM, rtol=1e-6)  # the patch saw it too


@pytest.mark.slow
def test_lightning_gradient_clip_val(tmp_path):
    """Lightning's automatic optimization runs backward and ``gradient_clip_val``'s clip in
    the optimizer's closure, after its pre-step hook."""
    pytest.importorskip("lightning")
    from gradprobe.integrations.lightning import GradprobeCallback
    from tests.integrations.tiny import lightning_tiny_run

    cb = GradprobeCallback(logdir=str(tmp_path / "gp"), profile="light")
    lightning_tiny_run(str(tmp_path), optimizer="SGD", lr=0.05, callbacks=[cb], gradient_clip_val=MAX_NORM,
                       max_epochs=2, validate=False, csv=False)
    log = gradprobe.RunLog.load(cb.logdir)
    st = log.steps[log.steps["optimizer_steps"] > 0]
    assert len(st) == 16
    np.testing.assert_allclose(st["clip_max_norm"], MAX_NORM, rtol=1e-6)
    fired = st["grad_norm"] > MAX_NORM
    assert fired.sum() >= 12
    np.testing.assert_allclose(st["step_grad_norm"][fired], MAX_NORM, rtol=1e-3)
    r = classify_log(log)
    assert r.kind == CLIP and r.max_norm == pytest.approx(MAX_NORM, rel=1e-3)
