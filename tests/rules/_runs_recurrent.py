"""Tiny real training runs (CPU, a second or two each) for the GP1xx/GP2xx rule tests.

Each builder trains under ``gradprobe.watch`` into ``logdir`` and returns ``logdir``; the
tests analyze it with ``gradprobe.analyze``. Faulty runs reproduce the failures the rules
diagnose (undetached state in its crash and silent forms, graph retention, over-clipping,
exploding/vanishing gradients); healthy runs cover the architectures the rules must leave
alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradprobe
from tests.helpers import SeqRegressor, mlp, regression_batches


def _detach(state: Any) -> Any:
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def _seq_data(n: int, batch: int = 8, T: int = 20, features: int = 4,
              seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable sequence task: the target is a lagged, smoothed copy of feature 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, T, features, generator=g)
        y = 0.5 * torch.roll(x[..., :1], 2, dims=1) + 0.5 * x[..., 1:2]
        out.append((x, y))
    return out


# ---------------------------------------------------------------------------------- GP101 --
def lstm_retain_graph_crash(logdir: str) -> str:
    """float32 LSTM + Adam, state carried without detach, ``backward(retain_graph=True)``:
    Adam's in-place update bumps the weights' version counters, so the second step's
    backward through step 1's graph raises "modified by an inplace operation"."""
    model = SeqRegressor("lstm", 4, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with gradprobe.watch(model, opt, logdir=logdir):
        state = None
        for x, y in _seq_data(5):
            opt.zero_grad()
            out, state = model(x, state)
            loss = F.mse_loss(out, y)
            loss.backward(retain_graph=True)
            opt.step()
    return logdir


def lstm_second_backward_crash(logdir: str) -> str:
    """The classic form: no retain_graph, state carried -> "backward through the graph a
    second time" at step 2."""
    model = SeqRegressor("lstm", 4, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with gradprobe.watch(model, opt, logdir=logdir):
        state = None
        for x, y in _seq_data(5):
            opt.zero_grad()
            out, state = model(x, state)
            F.mse_loss(out, y).backward()
            opt.step()
    return logdir


def lstm_bf16_undetached(logdir: str, steps: int = 14) -> str:
    """Silent form under bfloat16 autocast: the graph saves the casted weight copies, not the
    parameters, so Adam's in-place update does not invalidate it and every backward walks
    all the earlier steps' graphs (retain_graph=True keeps them)."""
    model = SeqRegressor("lstm", 4, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with gradprobe.watch(model, opt, logdir=logdir):
        state = None
        for x, y in _seq_data(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, state = model(x, state)
                loss = F.mse_loss(out.float(), y)
            loss.backward(retain_graph=True)
            opt.step()
    return logdir


def lstm_pdata_undetached(logdir: str, steps: int = 14) -> str:
    """Silent form with manual ``p.data`` updates (no optimizer, no version bump)."""
    model = SeqRegressor("lstm", 4, 16)
    with gradprobe.watch(model, logdir=logdir):
        state = None
        for x, y in _seq_data(steps):
            model.zero_grad()
            out, state = model(x, state)
            F.mse_loss(out, y).backward(retain_graph=True)
            with torch.no_grad():
                for p in model.parameters():
                    p.data -= 0.01 * p.grad
    return logdir


class _EMA(nn.Module):
    """An exponential moving average of (shifted) inputs: ``state = 0.9 state + 0.1 (x + b)``,
    written with ``torch.add(..., alpha=)`` so that its graph saves no tensors (``0.9 * state``
    would save the wrapped scalar): backward can walk it again and again without an error."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.add(state, x + self.shift - state, alpha=0.1)


class EMANet(nn.Module):
    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.ema = _EMA(features)
        self.head = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.ema(x, state)
        return self.head(state), state


def ema_undetached(logdir: str, steps: int = 30) -> str:
    """A carried EMA state whose old graph saves no tensors: runs on silently, Adam, no
    retain_graph, with every step's backward walking all earlier steps."""
    model = EMANet(8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with gradprobe.watch(model, opt, logdir=logdir):
        state = torch.zeros(32, 8)
        for x, y in regression_batches(steps, batch=32, features=8):
            opt.zero_grad()
            out, state = model(x, state)
            F.mse_loss(out, y).backward()
            opt.step()
    return logdir


# ---------------------------------------------------------------------------------- GP103 --
def total_loss_accumulated(logdir: str, steps: int = 40) -> str:
    """``total_loss += loss``: every step's graph stays alive through the running total."""
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), 0.01)
    with gradprobe.watch(model, opt, logdir=logdir):
        total_loss = 0.0
        for x, y in regression_batches(steps):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            total_loss += loss  # the bug: keeps the graph; loss.item() is the fix
    return logdir


# ------------------------------------------------------------------------------ GP102 -----
def gru_past_horizon(logdir: str, T: int = 400, steps: int = 3) -> str:
    """GRU, hidden 8, over 400 steps: the gradient reaching far inputs dies within a few
    dozen steps, so most of the window is backpropagated for nothing."""
    model = SeqRegressor("gru", 4, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in _seq_data(steps, batch=4, T=T):
            opt.zero_grad()
            out, _ = model(x)
            F.mse_loss(out, y).backward()
            opt.step()
    return logdir


class VanillaRNN(nn.Module):
    """tanh RNN without biases (a bias would drive the state into saturation) + linear head."""

    def __init__(self, input_size: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden, batch_first=True, bias=False)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def vanilla_rnn_exploding(logdir: str, T: int = 60, steps: int = 8, rho: float = 1.15) -> str:
    """A vanilla tanh RNN built to explode: recurrent weights with every eigenvalue of modulus
    ``rho`` > 1 (a scaled orthogonal matrix) and tiny inputs, so tanh stays near linear and
    the gradient grows by about ``rho`` per step back in time."""
    H = 16
    model = VanillaRNN(4, H)
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(H, H))[0] * rho)
    opt = torch.optim.SGD(model.parameters(), 1e-4)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in _seq_data(steps, batch=8, T=T):
            opt.zero_grad()
            F.mse_loss(model(x * 1e-4), y).backward()
            opt.step()
    return logdir


# ------------------------------------------------------------------------------ GP201 -----
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, emb: int = 16, hidden: int = 32, kind: str = "lstm") -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(emb, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, h: Any = None) -> tuple[torch.Tensor, Any]:
        out, h = self.rnn(self.encoder(x), h)
        return self.decoder(out), h


def markov_text(n_batches: int, batch: int = 20, bptt: int = 35, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    """Token stream from a Markov chain with 3 successors per token (learnable: the loss
    can fall from ln(vocab) towards ln(3)), shaped (batch, n_batches * bptt + 1)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    length = n_batches * bptt + 1
    choice = torch.randint(0, 3, (batch, length), generator=g)
    out = torch.zeros(batch, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(1, length):
        out[:, t] = succ[out[:, t - 1], choice[:, t]]
    return out


def word_lm(logdir: str, lr: float = 20.0, max_norm: float = 0.05, steps: int = 60, kind: str = "lstm") -> str:
    """pytorch/examples word_language_model in miniature: SGD at a large lr, TBPTT with the
    hidden state detached every batch, clip_grad_norm_ on (nearly) every step. Healthy with
    the defaults: clipping bounds the step of an lr chosen for clipped gradients."""
    vocab, bptt = 50, 35
    data = markov_text(steps, batch=10, bptt=bptt, vocab=vocab)
    model = TinyLM(vocab, kind=kind)
    opt = torch.optim.SGD(model.parameters(), lr)
    with gradprobe.watch(model, opt, logdir=logdir):
        h = None
        for i in range(steps):
            x = data[:, i * bptt : (i + 1) * bptt]
            y = data[:, i * bptt + 1 : (i + 1) * bptt + 1]
            if h is not None:
                h = _detach(h)
            opt.zero_grad()
            out, h = model(x, h)
            loss = F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
    return logdir


def sgd_overclipped(logdir: str, steps: int = 60) -> str:
    """The same language model with a normal SGD lr and max_norm far below the gradient
    norm: every step is cut ~20x and the loss barely moves."""
    return word_lm(logdir, lr=0.5, max_norm=0.01, steps=steps)


# ------------------------------------------------------------------------ GP202/GP203 -----
def mlp_diverging(logdir: str, steps: int = 40) -> str:
    """SGD far above the stable lr on a regression: the gradient norm grows geometrically
    until it overflows."""
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.SGD(model.parameters(), 0.5)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return logdir


def deep_sigmoid_mlp(logdir: str, steps: int = 30, depth: int = 12) -> str:
    """A deep sigmoid MLP (sigmoid' <= 1/4 per layer): the first layers get gradients orders
    of magnitude below the last ones."""
    sizes = (8,) + (32,) * depth + (1,)
    model = mlp(sizes, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), 0.05)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return logdir


def rnn_spiking_unclipped(logdir: str, steps: int = 30) -> str:
    """A vanilla RNN language model with SGD at an lr that needs clipping, and none: the
    gradient norm spikes ~80x a few steps in (the recurrent weights cross into the exploding
    regime), the loss jumps and never recovers."""
    vocab, bptt = 50, 35
    data = markov_text(steps, bptt=bptt, vocab=vocab)
    torch.manual_seed(2)
    model = TinyLM(vocab)
    model.rnn = nn.RNN(16, 32, batch_first=True)
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(32, 32))[0] * 1.5)
    opt = torch.optim.SGD(model.parameters(), 10.0)
    with gradprobe.watch(model, opt, logdir=logdir):
        h = None
        for i in range(steps):
            x = data[:, i * bptt : (i + 1) * bptt]
            y = data[:, i * bptt + 1 : (i + 1) * bptt + 1]
            if h is not None:
                h = h.detach()
            opt.zero_grad()
            out, h = model(x, h)
            F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1)).backward()
            opt.step()
    return logdir


# ------------------------------------------------------------------------------ healthy ---
def lstm_detached(logdir: str, steps: int = 60) -> str:
    """Stateful LSTM regression with the state detached after every optimizer step (TBPTT)."""
    model = SeqRegressor("lstm", 4, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with gradprobe.watch(model, opt, logdir=logdir):
        state = None
        for x, y in _seq_data(steps):
            opt.zero_grad()
            out, state = model(x, state)
            F.mse_loss(out, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state = _detach(state)
    return logdir


def mlp_adam(logdir: str, steps: int = 80) -> str:
    model = mlp((8, 32, 32, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in regression_batches(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return logdir


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def cnn_sgd(logdir: str, steps: int = 40) -> str:
    """A small CNN classifying which quadrant of a 16x16 image is bright (SGD momentum)."""
    g = torch.Generator().manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(steps):
            y = torch.randint(0, 4, (32,), generator=g)
            x = torch.randn(32, 1, 16, 16, generator=g)
            for i in range(32):
                r, c = divmod(int(y[i]), 2)
                x[i, 0, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 0.3
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return logdir


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(x)))


def transformer_adamw(logdir: str, steps: int = 40) -> str:
    """A 2-layer Transformer encoder learning to copy tokens (AdamW, clipping at 1.0)."""
    g = torch.Generator().manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    with gradprobe.watch(model, opt, logdir=logdir):
        for _ in range(steps):
            x = torch.randint(0, 20, (16, 12), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 20), x.reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return logdir


def mlp_lbfgs(logdir: str, steps: int = 15) -> str:
    model = mlp((8, 16, 1), act=nn.Tanh)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    batches = regression_batches(steps, batch=64)
    with gradprobe.watch(model, opt, logdir=logdir):
        for x, y in batches:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return logdir


HEALTHY = {
    "lstm_detached": lstm_detached,
    "gru_lm_tbptt": lambda d: word_lm(d, kind="gru"),
    "lstm_word_lm": word_lm,
    "mlp_adam": mlp_adam,
    "cnn_sgd": cnn_sgd,
    "transformer_adamw": transformer_adamw,
    "mlp_lbfgs": mlp_lbfgs,
}
