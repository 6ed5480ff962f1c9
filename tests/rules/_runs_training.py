"""Tiny real CPU training runs for the GP5xx/GP6xx rule tests (each a few seconds).

Every function trains under ``gradprobe.watch`` into ``logdir`` and returns the logdir; the
tests then call ``gradprobe.analyze(logdir)``. Runs are seeded and small: the CPU is shared.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradprobe
from tests.helpers import mlp, regression_batches

WATCH = {"tensorboard": False}


def one_thread(fn: Callable[..., str]) -> Callable[..., str]:
    """Runs a tiny model on one intra-op thread (faster on a shared CPU), then restores."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> str:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


def mse(out, y):
    return F.mse_loss(out, y)  # looked up at call time: F.mse_loss is what the probe patches


def ce(out, y):
    return F.cross_entropy(out, y)


def _loop(model, opt, batches, logdir, loss_fn=mse, scheduler=None, val=None, val_every=10, **watch):
    with gradprobe.watch(model, opt, logdir=logdir, **{**WATCH, **watch}) as probe:
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if val is not None and i % val_every == val_every - 1:
                with torch.no_grad():
                    v = float(loss_fn(model(val[0]), val[1]))
                probe.log(val_loss=v)
                if scheduler is not None:
                    scheduler.step(v)
            elif scheduler is not None and val is None:
                scheduler.step()
    return logdir


def classification_batches(n: int, batch: int = 32, features: int = 8, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, classes, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, features, generator=g)
        out.append((x, (x @ w).argmax(dim=1)))
    return out


# ---------------------------------------------------------------- healthy -----------------
@one_thread
def healthy_mlp(logdir: str, steps: int = 120) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(steps), logdir)


@one_thread
def healthy_classifier(logdir: str, steps: int = 120) -> str:
    torch.manual_seed(0)
    model = mlp((8, 64, 64, 4))
    return _loop(model, torch.optim.Adam(model.parameters(), lr=3e-3), classification_batches(steps), logdir,
                 loss_fn=ce)


@one_thread
def healthy_cnn(logdir: str, steps: int = 60) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 1, 12, 12, generator=g)
    batches = []
    for _ in range(steps):
        y = torch.randint(0, 3, (16,), generator=g)
        x = protos[y] + 0.5 * torch.randn(16, 1, 12, 12, generator=g)
        batches.append((x, y))
    return _loop(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), batches, logdir,
                 loss_fn=ce)


class _LSTMReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x, state=None):
        out, state = self.lstm(x, state)
        return self.head(out), state


@one_thread
def healthy_lstm(logdir: str, steps: int = 40) -> str:
    """Stateful LSTM over a long series, state detached every chunk (truncated BPTT)."""
    torch.manual_seed(0)
    model = _LSTMReg()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    t = torch.arange(steps * 20 + 1, dtype=torch.float32)
    series = torch.stack([torch.sin(0.1 * t), torch.cos(0.07 * t), 0.1 * torch.randn(t.shape, generator=g)], -1)
    target = (torch.sin(0.1 * (t + 3)) + 0.5 * torch.cos(0.07 * t)).unsqueeze(-1)
    state = None
    with gradprobe.watch(model, opt, logdir=logdir, **WATCH):
        for i in range(steps):
            x = series[i * 20:(i + 1) * 20].unsqueeze(0).repeat(4, 1, 1)
            y = target[i * 20:(i + 1) * 20].unsqueeze(0).repeat(4, 1, 1)
            opt.zero_grad()
            out, state = model(x, state)
            loss = F.mse_loss(out, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state = tuple(s.detach() for s in state)
    return logdir


class _TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):
        return self.head(self.enc(self.emb(tok)))


@one_thread
def healthy_transformer(logdir: str, steps: int = 30) -> str:
    """Copy task on token ids (integer inputs through an Embedding)."""
    torch.manual_seed(0)
    model = _TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(steps):
        tok = torch.randint(0, 20, (8, 10), generator=g)
        batches.append((tok, tok))

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return _loop(model, opt, batches, logdir, loss_fn=loss_fn)


@one_thread
def healthy_lbfgs(logdir: str, steps: int = 6) -> str:
    torch.manual_seed(0)
    model = mlp((8, 16, 1), act=nn.Tanh)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5, history_size=5)
    x, y = regression_batches(1, batch=128)[0]
    with gradprobe.watch(model, opt, logdir=logdir, **WATCH):
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    return logdir


HEALTHY = {"mlp": healthy_mlp, "classifier": healthy_classifier, "cnn": healthy_cnn, "lstm": healthy_lstm,
           "transformer": healthy_transformer, "lbfgs": healthy_lbfgs}


# ---------------------------------------------------------------- faulty ------------------
@one_thread
def adam_huge_lr(logdir: str, steps: int = 120) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 4))
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1.0), classification_batches(steps), logdir,
                 loss_fn=ce)


@one_thread
def sgd_tiny_lr(logdir: str, steps: int = 120) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    return _loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), regression_batches(steps), logdir)


@one_thread
def dead_relus(logdir: str, steps: int = 100) -> str:
    torch.manual_seed(0)
    model = mlp((8, 64, 64, 1))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(steps), logdir)


@one_thread
def killed_relus(logdir: str, steps: int = 100) -> str:
    """Units alive at the start (5% of the second ReLU layer off), killed by one SGD step at 50x
    the lr on large targets: ~78% of that layer is off for the rest of the run, loss finite."""
    torch.manual_seed(0)
    model = mlp((8, 64, 64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = list(regression_batches(steps))
    with gradprobe.watch(model, opt, logdir=logdir, **WATCH):
        for i, (x, y) in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = 0.5 if i == 3 else 0.01
            opt.zero_grad()
            mse(model(x), y * 5).backward()
            opt.step()
    return logdir


@one_thread
def clipped_critic_1d(logdir: str, iters: int = 100) -> str:
    """The original WGAN on 1-D data (critic weights clamped to +-0.01, 5 critic steps a
    generator step): more than half of the critic's second ReLU layer is off from the first
    step, by the geometry of 1-D data under clamped weights, and stays so while it learns."""
    torch.manual_seed(58)
    gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    critic = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt_g = torch.optim.RMSprop(gen.parameters(), lr=5e-4)
    opt_d = torch.optim.RMSprop(critic.parameters(), lr=5e-4)
    with gradprobe.watch([gen, critic], [opt_g, opt_d], logdir=logdir, **WATCH):
        for _ in range(iters):
            for _ in range(5):
                real = 4.0 + 1.5 * torch.randn(128, 1)
                d_loss = critic(gen(torch.randn(128, 8)).detach()).mean() - critic(real).mean()
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                for p in critic.parameters():
                    p.data.clamp_(-0.01, 0.01)
            g_loss = -critic(gen(torch.randn(128, 8))).mean()
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
    return logdir


@one_thread
def tiny_gain_tanh(logdir: str, steps: int = 60) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 32, 32, 32, 1), act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=0.001)
            nn.init.zeros_(m.bias)
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(steps), logdir)


@one_thread
def raw_features(logdir: str, steps: int = 80, scale: float = 1e4) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    batches = [(x * scale + scale, y) for x, y in regression_batches(steps)]
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, logdir)


@one_thread
def tiny_targets(logdir: str, steps: int = 80) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1))
    batches = [(x, y * 1e-7) for x, y in regression_batches(steps)]
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, logdir)


@one_thread
def overfit_tiny_dataset(logdir: str, steps: int = 300) -> str:
    """24 noisy training examples (full batch), a wide MLP and Adam: the validation loss falls,
    then turns up as the network memorises the noise."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 1, generator=g)
    xt = torch.randn(24, 8, generator=g)
    yt = xt @ w + 1.5 * torch.randn(24, 1, generator=g)
    xv = torch.randn(256, 8, generator=g)
    yv = xv @ w + 1.5 * torch.randn(256, 1, generator=g)
    model = mlp((8, 128, 128, 1))
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-3), [(xt, yt)] * steps, logdir,
                 val=(xv, yv), val_every=10)


@one_thread
def converged_plateau_scheduler(logdir: str, steps: int = 300) -> str:
    """A linear problem solved early; ReduceLROnPlateau decays the lr to its floor."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1, min_lr=1e-6)
    batches = regression_batches(steps + 4, batch=64)
    xv = torch.cat([b[0] for b in batches[-4:]])  # held-out batches of the same problem
    yv = torch.cat([b[1] for b in batches[-4:]])
    batches = batches[:-4]
    return _loop(model, opt, batches, logdir, scheduler=sched, val=(xv, yv), val_every=10)


@one_thread
def stuck_at_mean(logdir: str, steps: int = 200) -> str:
    """Zero-initialised tanh MLP: the hidden layers never receive a gradient, only the output
    bias learns, so the model predicts the target mean."""
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1), act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-2), regression_batches(steps), logdir)


@one_thread
def stuck_at_uniform(logdir: str, steps: int = 200) -> str:
    """Zero-initialised classifier on balanced classes: it learns the (uniform) prior only."""
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 4), act=nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(32, 8, generator=g), torch.arange(32) % 4) for _ in range(steps)]
    return _loop(model, torch.optim.Adam(model.parameters(), lr=1e-2), batches, logdir, loss_fn=ce)


@one_thread
def growing_weights(logdir: str, steps: int = 300) -> str:
    """A separable classification set with Adam and no weight decay: the loss is ~0 and the
    weights keep growing (Adam's constant-size steps along a consistent gradient)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    model = mlp((8, 16, 2))
    return _loop(model, torch.optim.Adam(model.parameters(), lr=0.05), [(x, y)] * steps, logdir,
                 loss_fn=ce)


@one_thread
def saturated_tanh(logdir: str, steps: int = 100) -> str:
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 1), act=nn.Tanh)
    batches = [(x * 100.0, y) for x, y in regression_batches(steps)]
    return _loop(model, torch.optim.SGD(model.parameters(), lr=1e-4), batches, logdir)
