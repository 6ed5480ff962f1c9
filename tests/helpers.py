"""Tiny models and training loops shared by the tests (real PyTorch, CPU, seconds)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


class SeqRegressor(nn.Module):
    """LSTM/GRU/RNN sequence regressor: (B, T, I) -> (B, T, 1), with an optional state."""

    def __init__(self, kind: str = "lstm", input_size: int = 4, hidden: int = 16, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(input_size, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(x, state)
        return self.head(out), state


def mlp(sizes: tuple[int, ...] = (8, 32, 32, 1), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def param_checksum(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def regression_batches(n: int, batch: int = 32, features: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, features, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(batch, 1, generator=g)))
    return out


def fit(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[..., torch.Tensor] = nn.functional.mse_loss, max_norm: float | None = None) -> list[float]:
    """A plain loop; returns the losses."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        losses.append(float(loss))
    return losses
