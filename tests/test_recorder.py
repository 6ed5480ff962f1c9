"""The recorder: every per-step statistic against a brute-force reference, step delimiting
(AMP, fused, LBFGS, accumulation, several optimizers), state age, TensorBoard output."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

# imported by name BEFORE gradprobe.watch, as many scripts do
from torch.nn.utils import clip_grad_norm_

import gradprobe
from tests.helpers import SeqRegressor, mlp, regression_batches


def _norms(model: nn.Module) -> dict[str, float]:
    return {n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters() if p.grad is not None}


def test_statistics_equal_brute_force(logdir):
    model = mlp((8, 16, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = []
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(12):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            pre = _norms(model)
            total = clip_grad_norm_(model.parameters(), 0.7)
            post = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
            opt.step()
            w = {n: float(p.detach().norm()) for n, p in model.named_parameters()}
            ref.append((float(loss), pre, float(total), post, w, opt.param_groups[0]["lr"]))
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps == len(ref)
    for i, (loss, pre, total, post, w, lr) in enumerate(ref):
        row = log.steps.iloc[i]
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert row["loss_fn"] == pytest.approx(loss, rel=1e-6)
        for name, v in pre.items():
            assert log.layer_grad.loc[i, name] == pytest.approx(v, rel=1e-5)
            assert log.layer_weight.loc[i, name] == pytest.approx(w[name], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in pre.values())), rel=1e-5)
        assert row["clip_total_norm"] == pytest.approx(total, rel=1e-5)
        assert row["clip_max_norm"] == pytest.approx(0.7)
        assert row["step_grad_norm"] == pytest.approx(post, rel=1e-4)
        assert row["weight_norm"] == pytest.approx(math.sqrt(sum(v * v for v in w.values())), rel=1e-5)
        assert row["lr"] == lr
        assert row["optimizer_steps"] == 1 and not row["skipped"] and row["param_nonfinite_layers"] == 0
        assert row["memory"] > 0 and row["step_time"] >= 0
    assert log.meta["optimizers"][0]["class"] == "SGD"
    assert log.meta["optimizers"][0]["param_groups"][0]["momentum"] == 0.9


def _amp_run(logdir: str, fused: bool, steps: int = 30) -> tuple[gradprobe.RunLog, list[bool]]:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=4)
    expected = []
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(steps, features=16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            expected.append(scaler.get_scale() < before)  # the scale backs off exactly on skips
    return gradprobe.RunLog.load(logdir), expected


class _AnyDtypeIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0) * 1e-6)


def test_per_step_data_check_flags_nonfinite_batches_of_every_float_dtype(logdir):
    """The per-step data count is exact on NaN, +Inf and -Inf in float32, float64, bfloat16
    and float16 batches, and quiet on finite ones at large scales: float16 entries at its
    maximum (a float16 norm would overflow; its check accumulates in float32) and entries of
    1e15 in the others (their 2-norm is far from float32's overflow)."""
    model = _AnyDtypeIn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.ones(64, 4)
    batches = [
        (x * 1e15, 0), (x * 65504.0, 0), (x.half() * 65504, 0), (x.bfloat16() * 1e15, 0), (x.double() * 1e15, 0),
        (x.clone().index_fill_(0, torch.tensor([3]), math.nan), 1),
        (x.clone().index_fill_(0, torch.tensor([3]), math.inf), 1),
        (x.clone().index_fill_(0, torch.tensor([3]), -math.inf), 1),
        (x.half().index_fill_(0, torch.tensor([3]), math.nan), 1),
        (x.half().index_fill_(0, torch.tensor([3]), -math.inf), 1),
        (x.bfloat16().index_fill_(0, torch.tensor([3]), math.inf), 1),
        (x.double().index_fill_(0, torch.tensor([3]), math.nan), 1),
    ]
    with gradprobe.watch(model, opt, logdir=logdir):
        for batch, _ in batches:
            opt.zero_grad()
            model(batch).sum().backward()
            opt.step()
    steps = gradprobe.RunLog.load(logdir).steps
    assert steps["data_nonfinite"].tolist() == [bad for _, bad in batches]


@pytest.mark.parametrize("fused", [False, True])
def test_amp_skipped_steps_counted_exactly(tmp_path, fused):
    log, expected = _amp_run(str(tmp_path / "r"), fused)
    assert log.n_steps == len(expected)
    assert log.steps["skipped"].tolist() == expected
    assert 0 < sum(expected) < len(expected)
    assert log.steps["scaler_updated"].all()
    # the loss is recorded unscaled
    assert (log.steps["loss"] < 100).all()
    # the scale after each update halves on a skip
    s = log.steps
    assert np.allclose(s["scale"][s["skipped"]], s["scale_before"][s["skipped"]] / 2)
    assert log.meta["scalers"][0]["init_scale"] == 2.0**40
    assert any(v["dtype"] == "float16" and v["enabled"] for v in log.meta["autocast"].values())


def test_lbfgs_one_step_per_step_call(logdir):
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)
    returned = []
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            returned.append(float(opt.step(closure)))
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps == 3
    assert log.steps["loss"].tolist() == pytest.approx(returned, rel=1e-6)
    assert (log.steps["n_backward"] >= 1).all() and log.steps["n_backward"].iloc[0] > 1
    assert np.isfinite(log.steps["grad_norm"]).all()


def test_gradient_accumulation(logdir):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = []
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(3):
            opt.zero_grad()
            total = 0.0
            for _ in range(4):
                loss = nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)) / 4
                loss.backward()
                total += float(loss)
            ref.append((total, float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())))
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps == 3
    assert log.steps["n_backward"].tolist() == [4, 4, 4]
    assert log.steps["loss"].tolist() == pytest.approx([r[0] for r in ref], rel=1e-5)
    assert log.steps["grad_norm"].tolist() == pytest.approx([r[1] for r in ref], rel=1e-5)


def test_several_optimizers_gan_loop(logdir):
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), 1e-3)
    opt_d = torch.optim.Adam(D.parameters(), 1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    with gradprobe.watch([G, D], [opt_g, opt_d], logdir=logdir):
        for _ in range(5):
            real, fake = torch.randn(16, 2), G(torch.randn(16, 4))
            loss_d = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = bce(D(fake), torch.ones(16, 1))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps == 5
    assert log.steps["optimizer_steps"].tolist() == [2] * 5
    assert log.steps["n_backward"].tolist() == [2] * 5
    assert all(n.startswith(("sequential.", "sequential2.")) for n in log.layer_names)
    assert (log.layer_grad >= 0).all().all()


def test_clip_imported_by_name_and_clip_on_scaled(logdir):
    # clip_grad_norm_ was imported by name at the top of this module, before watch()
    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(4):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            clip_grad_norm_(model.parameters(), 0.5)  # still scaled: misuse
            scaler.step(opt)
            scaler.update()
    log = gradprobe.RunLog.load(logdir)
    assert log.steps["clip_calls"].tolist() == [1] * 4
    assert log.steps["clip_max_norm"].tolist() == [0.5] * 4
    assert log.steps["clip_on_scaled"].all()
    # the recorded pre-clip norm is unscaled although the clip saw scaled gradients
    assert (log.steps["clip_total_norm"] / log.steps["grad_norm"]).round().tolist() == [1024.0] * 4


def _clip_public_two_calls(params, max_norm):
    params = list(params)
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _clip_private_two_calls(params, max_norm):
    params = list(params)
    total = torch.nn.utils.clip_grad._get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grad._clip_grads_with_norm_(params, max_norm, total)
    return total


def _clip_accelerate_style(params, max_norm):
    """accelerate >= 1.16 (every Hugging Face Trainer run): the public names looked up at call
    time, per device mesh, and a total norm of its own (a new tensor) handed to the clip."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [p for p in params if p.grad is not None]
    norms = torch.stack([get_total_norm([p.grad for p in params], 2.0)])
    total = torch.linalg.vector_norm(norms, 2.0)
    clip_grads_with_norm_(params, max_norm, total)
    return total


def _clip_deprecated(params, max_norm):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.clip_grad_norm(params, max_norm)


CLIP_ENTRY_POINTS = {
    "torch.nn.utils.clip_grad_norm_": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m),
    "clip_grad_norm_ imported by name": lambda ps, m: clip_grad_norm_(ps, m),
    "torch.nn.utils.clip_grad.clip_grad_norm_": lambda ps, m: torch.nn.utils.clip_grad.clip_grad_norm_(ps, m),
    "torch.nn.utils.clip_grad_norm (deprecated)": _clip_deprecated,
    "torch.nn.utils.get_total_norm + clip_grads_with_norm_": _clip_public_two_calls,
    "clip_grad._get_total_norm + _clip_grads_with_norm_": _clip_private_two_calls,
    "accelerate's call pattern": _clip_accelerate_style,
}


@pytest.mark.parametrize("entry", list(CLIP_ENTRY_POINTS))
def test_clip_seen_through_every_public_entry_point(logdir, entry):
    """Every public name of PyTorch's norm clipping is observed: ``max_norm`` and the pre-clip
    norm recorded, the post-clip norm as the step's gradient norm; and every name is the
    original function again after close."""
    if not hasattr(torch.nn.utils, "get_total_norm") and "total_norm" in entry:
        pytest.skip("torch < 2.6 has no get_total_norm")
    before = {n: getattr(torch.nn.utils, n, None) for n in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_")}
    before_mod = {n: getattr(torch.nn.utils.clip_grad, n) for n in ("_get_total_norm", "_clip_grads_with_norm_", "clip_grad_norm_")}
    clip = CLIP_ENTRY_POINTS[entry]
    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre, totals = [], []
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(4):
            opt.zero_grad()
            (nn.functional.mse_loss(model(x), y) * 100).backward()
            pre.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters())))
            totals.append(float(clip(model.parameters(), 0.25)))
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    st = log.steps
    assert st["clip_calls"].tolist() == [1] * 4, entry
    assert st["clip_max_norm"].tolist() == [0.25] * 4
    np.testing.assert_allclose(st["grad_norm"], pre, rtol=1e-5)
    np.testing.assert_allclose(st["clip_total_norm"], totals, rtol=1e-5)
    np.testing.assert_allclose(st["step_grad_norm"], 0.25, rtol=1e-4)  # what the optimizer stepped with
    assert {n: getattr(torch.nn.utils, n, None) for n in before} == before
    assert {n: getattr(torch.nn.utils.clip_grad, n) for n in before_mod} == before_mod


def _hand_clip(params, max_norm):
    """A clip written by hand: what DeepSpeed or a custom loop does, unseen by any patch."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.sqrt(sum(g.detach().pow(2).sum() for g in grads))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


@pytest.mark.parametrize("clip", ["none", "clip_grad_norm_", "clip_grad_norm_ inf-norm", "by hand"])
def test_passes_over_the_gradients_per_step(logdir, clip):
    """On an unsampled step the probe takes one pass over the gradients after the backward
    (A, the gradient as the backward left it) and one over the parameters after the step;
    the gradient the optimizer steps with (B) costs a second pass only when something it did
    not observe changed the gradients (their ``_version``): not for ``clip_grad_norm_`` (its
    coefficient is recorded), but for a clip written by hand; otherwise one small layer's
    norm is taken again (changes through ``.data`` keep the version). Sampled steps measure
    B whole. The recorded norms are the brute-force ones either way, and
    ``torch._foreach_norm`` is left as it was."""
    model = mlp((8, 16, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    orig = torch._foreach_norm
    calls: list[int] = []

    def counting(tensors, *a, **k):
        calls.append(len(tensors))
        return orig(tensors, *a, **k)

    ref = []
    torch._foreach_norm = counting
    try:
        cfg = gradprobe.ProbeConfig(schedule=gradprobe.Schedule(every=10**9, early_until=0), deep=False)  # step 0 sampled
        with gradprobe.watch(model, opt, logdir=logdir, config=cfg):
            for x, y in regression_batches(5):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                pre = _norms(model)
                if clip == "clip_grad_norm_":
                    clip_grad_norm_(model.parameters(), 0.1)
                elif clip == "clip_grad_norm_ inf-norm":
                    clip_grad_norm_(model.parameters(), 0.1, norm_type=float("inf"))
                elif clip == "by hand":
                    _hand_clip(list(model.parameters()), 0.1)
                post = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
                ref.append((pre, post))
                opt.step()
    finally:
        assert torch._foreach_norm is counting  # restored to what it was during the call
        torch._foreach_norm = orig
    n_params = len(list(model.parameters()))
    per_step = {"none": 2, "clip_grad_norm_": 3, "clip_grad_norm_ inf-norm": 3, "by hand": 3}[clip]
    # none: A, the weights; clip_grad_norm_: its own pass, A, the weights; by hand: A, B, the weights
    whole = [n for n in calls if n == n_params]
    assert len(whole) == per_step * len(ref) + (clip != "by hand")  # + B on the sampled step 0
    assert len(calls) - len(whole) == (0 if clip == "by hand" else len(ref) - 1)  # one layer, unsampled steps
    log = gradprobe.RunLog.load(logdir)
    for i, (pre, post) in enumerate(ref):
        for name, v in pre.items():
            assert log.layer_grad.loc[i, name] == pytest.approx(v, rel=1e-5)
        assert log.steps["step_grad_norm"].iloc[i] == pytest.approx(post, rel=1e-4)
    assert log.steps["grad_change"].tolist() == [0 if clip == "none" else 1] * len(ref)


def test_clip_of_a_subset_and_half_gradients_are_measured_right(logdir):
    """Clipping one layer of the optimizer's leaves the others as they were (a change that is
    not uniform across the optimizer's gradients), and the norms of float16 gradients are
    taken in float32 (a float16 norm overflows at 65504); what the optimizer steps with is
    measured after a gradient was replaced."""
    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = []
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.append(_norms(model))
            clip_grad_norm_(model[0].parameters(), 0.1)
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    for i, pre in enumerate(ref):
        for name, v in pre.items():
            assert log.layer_grad.loc[i, name] == pytest.approx(v, rel=1e-5)
    assert log.steps["grad_change"].tolist() == [2] * 3  # one layer of four rescaled
    half = torch.full((4,), 60000.0, dtype=torch.float16)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt2 = torch.optim.SGD([p], lr=0.0)
    with gradprobe.watch(nn.ParameterList([p]), opt2, logdir=logdir + "-half"):
        p.grad = half.clone()
        (p.float().sum() * 0).backward()
        p.grad = half.clone()
        clip_grad_norm_([p], 1e9)  # its float16 norm is inf (120000 > 65504)
        opt2.step()
    row = gradprobe.RunLog.load(logdir + "-half").steps.iloc[0]
    assert row["grad_norm"] == pytest.approx(120000.0, rel=1e-3) and row["grad_nonfinite_layers"] == 0
    # the clip saw that float16 norm as inf and zeroed the gradient: the optimizer stepped with 0
    assert row["step_grad_norm"] == 0.0 and row["grad_change"] == 1


def test_state_age_grows_when_state_is_carried_and_is_zero_when_detached(tmp_path):
    def run(detach: bool, path: str) -> gradprobe.RunLog:
        model = SeqRegressor("gru", hidden=8)
        state = None
        with gradprobe.watch(model, logdir=path):  # no optimizer: manual p.data updates
            for _ in range(6):
                out, state = model(torch.randn(4, 10, 4), state)
                loss = nn.functional.mse_loss(out, torch.zeros_like(out))
                for p in model.parameters():
                    p.grad = None
                loss.backward(retain_graph=True)
                for p in model.parameters():
                    p.data -= 1e-3 * p.grad
                if detach:
                    state = state.detach()
        return gradprobe.RunLog.load(path)

    carried = run(False, str(tmp_path / "carried"))
    assert carried.steps["state_age"].tolist() == [0, 1, 2, 3, 4, 5]
    assert carried.steps["state_age_module"].iloc[-1] == "rnn"
    ev = carried.events_of("state_age")
    assert ev and ev[0]["module"] == "rnn" and ev[0]["step"] == 1
    detached = run(True, str(tmp_path / "detached"))
    assert detached.steps["state_age"].tolist() == [0] * 6
    assert not detached.events_of("state_age")


def test_state_age_silent_under_bfloat16_autocast_with_optimizer(logdir):
    model = SeqRegressor("lstm", hidden=8)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    state = None
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, state = model(torch.randn(4, 10, 4), state)
                loss = nn.functional.mse_loss(out.float(), torch.zeros(4, 10, 1))
            opt.zero_grad()
            loss.backward(retain_graph=True)  # runs on: the graph saved bf16 weight copies
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert log.steps["state_age"].tolist() == [0, 1, 2, 3, 4]
    assert log.steps["retain_graph"].all()


def test_state_age_for_a_carried_state_without_parameters(logdir):
    model = mlp((4, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ema = torch.zeros(16, 4)
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(4):
            x = torch.randn(16, 4, requires_grad=True)
            ema = 0.9 * ema + 0.1 * x  # never detached: carries every earlier step's graph
            loss = model(ema).pow(2).mean()
            opt.zero_grad()
            loss.backward(retain_graph=True)
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert log.steps["state_age"].iloc[-1] >= 2


@pytest.mark.parametrize("carry", ["ema", "output", "detached"])
def test_state_age_on_unsampled_steps_matches_the_sampled_steps_full_path(tmp_path, carry):
    """On unsampled steps a module that takes and returns one tensor goes through the
    forward hook's hot path, and a root ``nn.Sequential`` is not examined at all (its
    children see what enters and leaves it). The state age recorded must be what the
    general path gives when every step is sampled: a state carried outside modules (an
    EMA of the inputs), the model's own output fed back into it, and a detached one."""
    from gradprobe.config import ProbeConfig
    from gradprobe.schedule import Schedule

    def run(every: int) -> gradprobe.RunLog:
        torch.manual_seed(0)
        model = mlp((4, 8, 4))
        path = str(tmp_path / f"{carry}-{every}")
        state = torch.zeros(16, 4)
        with gradprobe.watch(model, logdir=path, config=ProbeConfig(schedule=Schedule(every=every, early_until=0), deep=False)):
            for _ in range(7):
                x = torch.randn(16, 4, requires_grad=True)
                if carry == "ema":
                    state = 0.9 * state + 0.1 * x
                    out = model(state)
                else:
                    out = model(x + state)
                    state = out.detach() if carry == "detached" else out
                for p in model.parameters():
                    p.grad = None
                out.pow(2).mean().backward(retain_graph=True)
                for p in model.parameters():  # manual updates: each backward is a step
                    p.data -= 1e-3 * p.grad
        return gradprobe.RunLog.load(path)

    hot, full = run(10**9), run(1)
    assert not hot.steps["sampled"].iloc[1:].any() and full.steps["sampled"].all()
    expected = [0] * 7 if carry == "detached" else list(range(7))
    assert hot.steps["state_age"].tolist()[:7] == full.steps["state_age"].tolist()[:7] == expected
    assert hot.steps["state_age_module"].tolist()[:7] == full.steps["state_age_module"].tolist()[:7]
    children = lambda log: [(e["module"], e["step"], e["age"]) for e in log.events_of("state_age") if e["module"] != "sequential"]  # noqa: E731
    assert children(hot) == children(full)
    if carry != "detached":
        assert children(hot) == [("0", 1, 1)]
        # the root Sequential is examined on sampled steps only
        assert [e["step"] for e in full.events_of("state_age") if e["module"] == "sequential"] == [1]
        assert not [e for e in hot.events_of("state_age") if e["module"] == "sequential"]


def test_crash_form_is_recorded(logdir):
    model = SeqRegressor("lstm", hidden=8)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    state = None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        with gradprobe.watch(model, opt, logdir=logdir):
            for _ in range(3):
                out, state = model(torch.randn(4, 10, 4), state)
                loss = nn.functional.mse_loss(out, torch.zeros_like(out))
                opt.zero_grad()
                loss.backward(retain_graph=True)
                opt.step()
    log = gradprobe.RunLog.load(logdir)
    exc = [e for e in log.events_of("exception") if e["where"] == "backward"]
    assert exc and "inplace" in exc[0]["message"] and exc[0]["state_age"] == 1
    assert exc[0]["state_age_module"] == "rnn" and exc[0]["retain_graph"] is True


def test_graphs_alive_when_loss_is_accumulated(logdir):
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    total = 0
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(8):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total = total + loss  # keeps every step's graph alive
    log = gradprobe.RunLog.load(logdir)
    alive = log.steps["graphs_alive"].tolist()
    assert alive[-1] >= 5 and alive == sorted(alive)
    del total


def test_abandoned_iterations_and_scale_set_by_hand(logdir):
    """The loop of sample 002: clip still-scaled gradients, `continue` on inf without
    scaler.update(), and shrink the scale by hand."""
    model = mlp((16, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with gradprobe.watch(model, opt, scaler=scaler, logdir=logdir):
        for x, y in regression_batches(6, features=16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x * 1e3), y) * 1e4
            opt.zero_grad()
            scaler.scale(loss).backward()
            gn = clip_grad_norm_(model.parameters(), 0.5)
            if not torch.isfinite(gn):
                scaler._scale = torch.clamp(scaler._scale * 0.1, min=1.0)
                continue
            scaler.step(opt)
            scaler.update()
    log = gradprobe.RunLog.load(logdir)
    s = log.steps
    assert log.n_steps == 6
    assert s["abandoned"].iloc[:-1].all() and not s["scaler_updated"].any()
    assert s["scale_tampered"].iloc[1:].all() and s["clip_on_scaled"].all()
    assert s["scale_before"].iloc[1] == pytest.approx(2.0**16 * 0.1, rel=1e-3)
    assert log.events_of("scaler_misuse")


def test_user_scalars_and_eval_loss(logdir):
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i, (x, y) in enumerate(regression_batches(6)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                v = nn.functional.mse_loss(model(x), y)
            probe.log(val_loss=v, epoch=i)
    log = gradprobe.RunLog.load(logdir)
    assert log.scalar("val_loss").index.tolist() == list(range(6))
    assert log.scalar("epoch").tolist() == [float(i) for i in range(6)]
    # the no-grad loss computation is also seen as an eval loss of the step it follows
    assert np.isfinite(log.steps["eval_loss"].iloc[:-1]).all() or np.isfinite(log.steps["eval_loss"]).sum() >= 5


def test_parameters_nonfinite_after_step_are_flagged(logdir):
    emb = nn.Embedding(10, 4)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-2, eps=0.0)
    with gradprobe.watch(emb, opt, logdir=logdir):
        for _ in range(2):
            opt.zero_grad()
            emb(torch.tensor([1, 2, 3])).sum().backward()  # rows 0,4..9 get exactly 0 grad
            opt.step()
    log = gradprobe.RunLog.load(logdir)
    assert (log.steps["param_nonfinite_layers"] == 1).all()
    assert log.steps["grad_nonfinite_layers"].iloc[0] == 0


def test_tensorboard_events_read_back(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(15):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
    for tag in ("gradprobe/grad_norm/preclip", "gradprobe/grad_norm/max_norm", "gradprobe/loss/train", "gradprobe/lr",
                "gradprobe/log10/grad_norm/preclip", "gradprobe/layer_grad_norm/0.weight"):
        assert tag in tags, tag
    events = acc.Scalars("gradprobe/grad_norm/preclip") if "gradprobe/grad_norm/preclip" in acc.Tags()["scalars"] else acc.Tensors("gradprobe/grad_norm/preclip")
    assert len(events) == 15
    # the custom-scalars layout (the gradprobe dashboard) is in the file: the last one written
    # (at close) has the charts of the signals this run has (tests/test_tensorboard_output.py)
    raw = acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout()
    layout.ParseFromString(raw)
    charts = [c.title for cat in layout.category for c in cat.chart]
    assert "Gradient norm vs max_norm (log10)" in charts and "Per-layer gradient norms (log10)" in charts
    assert "GradScaler scale (log10) and skipped steps" not in charts and "State age (steps a carried graph reaches back)" not in charts
    # the records are framed with google-crc32c's C CRC32C: every checksum is what tensorboard's
    # own (pure-Python) implementation computes
    import glob
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from gradprobe.runlog.tensorboard import TensorBoardOutput

    records = 0
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            records += 1
    assert records > 15
    out = TensorBoardOutput(os.path.join(logdir, "fast"))
    assert "write" in vars(out._file_writer.event_writer._async_writer._writer)  # this instance only
    out.writer.close()


def test_watch_accepts_optimizer_none_and_adopts(logdir):
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.01)
    with gradprobe.watch(model, logdir=logdir):
        for x, y in regression_batches(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            other.step()  # not the model's: ignored
    log = gradprobe.RunLog.load(logdir)
    assert log.n_steps == 3 and len(log.meta["optimizers"]) == 1


def test_probe_failure_never_breaks_training(logdir):
    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(gradprobe.GradprobeWarning, match="optimizer"):
        with gradprobe.watch(model, opt, logdir=logdir) as probe:
            probe.guard.inject["optimizer"] = RuntimeError("injected")
            losses = []
            for x, y in regression_batches(5):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                losses.append(float(loss))
    assert len(losses) == 5
    log = gradprobe.RunLog.load(logdir)
    assert "optimizer" in log.meta["probe_failures"]
    assert log.events_of("probe_failure")


def test_probe_is_reusable_after_close_and_model_collectable(logdir):
    import gc
    import weakref

    model = mlp((8, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = gradprobe.watch(model, opt, logdir=logdir)
    for x, y in regression_batches(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    probe.close()
    probe.close()  # idempotent
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    refs = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


def test_process_rss_is_read_at_most_every_rss_every_seconds(logdir):
    """On the CPU the memory column is the process RSS, read at most every ``RSS_EVERY``
    seconds (one system call; the first after a training step costs ~25 us): a step that
    closes sooner repeats the last reading, a later one reads it again and sees what the run
    took meanwhile."""
    from gradprobe.probe.memory import RSS_EVERY

    model = mlp((8, 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    held = []
    with gradprobe.watch(model, opt, logdir=logdir) as probe:
        for i, (x, y) in enumerate(regression_batches(6)):
            if i in (1, 3):
                held.append(torch.ones(16 * 2**20 // 4))  # 16 MiB, written: resident
            if i == 3:
                time.sleep(2 * RSS_EVERY)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert probe.step == 6
    steps = gradprobe.RunLog.load(logdir).steps
    mem, gap = steps["memory"].to_numpy(), steps["step_time"].to_numpy()
    assert gap[3] > RSS_EVERY and mem[3] >= mem[2] + 12 * 2**20  # read again: the 32 MiB held
    if gap[1] < RSS_EVERY:  # (a loaded machine may take longer for one tiny step)
        assert mem[1] == mem[0]  # the 16 MiB taken before step 1 is not read yet
