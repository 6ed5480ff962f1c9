"""No observer effect: watched and unwatched runs give bit-identical parameters; compiled
models and torch.func code keep working."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradprobe
from gradprobe.config import ProbeConfig
from gradprobe.schedule import Schedule
from tests.helpers import SeqRegressor, identical, mlp, param_checksum


def _lstm_run(watch: bool, logdir: str | None, amp: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model = SeqRegressor("lstm", hidden=12, layers=2, dropout=0.3)
    model.drop = nn.Dropout(0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = ProbeConfig(schedule=Schedule(every=2))  # deep probes (with dropout side computations) often

    def loop() -> None:
        state = None
        for _ in range(8):
            x = torch.randn(6, 15, 4)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out, state = model(model.drop(x), state)
                loss = nn.functional.mse_loss(out.float(), torch.sin(x[..., :1]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state = tuple(s.detach() for s in state)

    if watch:
        with gradprobe.watch(model, opt, logdir=logdir, config=cfg):
            loop()
    else:
        loop()
    return param_checksum(model) + [torch.randn(3)]  # the RNG stream must not have moved


@pytest.mark.parametrize("amp", [False, True])
def test_bit_identical_lstm_with_dropout_and_deep_probes(tmp_path, amp):
    a = _lstm_run(False, None, amp)
    b = _lstm_run(True, str(tmp_path / "r"), amp)
    assert identical(a, b)
    log = gradprobe.RunLog.load(str(tmp_path / "r"))
    assert not log.samples_of("bptt", "profile").empty  # the side computation did run


def test_bit_identical_mlp_sgd_and_amp_scaler(tmp_path):
    def run(watch: bool) -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

        def loop() -> None:
            for _ in range(10):
                x, y = torch.randn(32, 16), torch.randn(32, 1)
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                scaler.step(opt)
                scaler.update()

        if watch:
            with gradprobe.watch(model, opt, scaler=scaler, logdir=str(tmp_path / "m"), sample_every=3):
                loop()
        else:
            loop()
        return param_checksum(model) + [torch.randn(3)]

    assert identical(run(False), run(True))


def test_compiled_model_watched_without_graph_breaks(tmp_path):
    import torch._dynamo

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        model = mlp((8, 16, 16, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(5)]

    def train(model: nn.Module, opt: torch.optim.Optimizer, fwd: nn.Module) -> None:
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(fwd(x), y).backward()
            opt.step()

    m1, o1 = build()
    c1 = torch.compile(m1, backend="eager")
    train(m1, o1, c1)
    torch._dynamo.reset()
    m2, o2 = build()
    c2 = torch.compile(m2, backend="eager")
    torch._dynamo.utils.counters.clear()
    with gradprobe.watch(c2, o2, logdir=str(tmp_path / "c")):
        train(m2, o2, c2)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert breaks == 0
    assert identical(param_checksum(m1), param_checksum(m2))
    log = gradprobe.RunLog.load(str(tmp_path / "c"))
    assert log.n_steps == 5 and log.steps["grad_norm"].notna().all()
    torch._dynamo.reset()


def test_torch_func_keeps_working_under_watch(logdir):
    from torch.func import functional_call, grad, vmap

    model = mlp((4, 8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    x, y = torch.randn(8, 4), torch.randn(8, 1)
    expected = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    with gradprobe.watch(model, opt, logdir=logdir):
        got = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
        opt.zero_grad()
        loss_fn(dict(model.named_parameters()), x, y).backward()
        opt.step()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _clip_by_hand(params, max_norm: float, data: bool) -> None:
    grads = [p.grad for p in params]
    with torch.no_grad():
        coef = torch.clamp(max_norm / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-6), max=1.0)
        for g in grads:
            (g.data if data else g).mul_(coef)


@pytest.mark.parametrize("deep,clip", [(False, "clip_grad_norm_"), (True, "clip_grad_norm_"), (True, "by hand"),
                                       (True, "by hand .data")])
def test_no_host_sync_from_gradprobe_on_unsampled_steps(tmp_path, monkeypatch, deep, clip):
    """The default path keeps step records on the device: on steps without sampled probes,
    gradprobe's code on the training thread never calls ``item``/``cpu``/``tolist``/
    ``numpy`` or converts a tensor to a Python number or bool (each a host-device sync on a
    GPU), whichever way the loop clips (the gradient the optimizer steps with is measured, or
    derived from the observed clip, on the device)."""
    import os
    import sys
    import threading

    root = os.path.dirname(gradprobe.__file__)
    calls: list[str] = []
    main = threading.get_ident()

    def spy(name: str):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if threading.get_ident() == main:
                f = sys._getframe(1)
                if f.f_code.co_filename.startswith(root):
                    calls.append(f"{name} at {f.f_code.co_filename}:{f.f_lineno}")
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = ProbeConfig(schedule=Schedule(every=1000, early_until=0), deep=deep)  # step 0 sampled only
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    with gradprobe.watch(model, opt, logdir=str(tmp_path), config=cfg):
        for step in range(12):
            if step == 2:  # steps 2.. are unsampled: spy from here on
                for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
                    spy(name)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if clip == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                _clip_by_hand(list(model.parameters()), 0.1, data=clip.endswith(".data"))
            opt.step()
        monkeypatch.undo()
    assert calls == []


def test_buffered_steps_hold_few_objects_for_the_garbage_collector(logdir):
    """A closed step waits up to a second for its flush: it must hold a handful of
    GC-tracked objects (one stacked tensor, not one tensor per value), or the records of
    the last second keep triggering collections of the whole process (a full one costs
    ~0.2 s with torch imported)."""
    import gc

    model = mlp((16, 32, 32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    cfg = gradprobe.ProbeConfig(flush_seconds=3600.0, flush_steps=10**6, deep=False)

    def step() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    with gradprobe.watch(model, opt, logdir=logdir, config=cfg) as probe:
        for _ in range(5):
            step()
        gc.collect()
        n0 = len(gc.get_objects())
        for _ in range(200):
            step()
        gc.collect()
        held = (len(gc.get_objects()) - n0) / 200
        assert len(probe._records) >= 200  # nothing was flushed meanwhile
    assert held <= 6, f"{held:.1f} GC-tracked objects per buffered step"
