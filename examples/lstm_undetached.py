"""A stateful LSTM whose hidden state is detached only on errors.

A sequence regressor is trained on consecutive windows of one long signal and carries
its LSTM state (h, c) from window to window, as stateful training does. The state is
detached only when the loss is not finite (code that "only detaches on errors"); on the
normal path it is not, so every window's graph still hangs off the previous one. The author had met "Trying to backward through the graph a second time" and added
``retain_graph=True``, which turns that crash into another one:

    gradprobe run examples/lstm_undetached.py                # float32 (default): crashes
    gradprobe run examples/lstm_undetached.py --amp bf16     # bfloat16 autocast: runs silently

* float32 (default) crashes at step 1 with "one of the variables needed for gradient
  computation has been modified by an inplace operation": step 1's backward walks into
  step 0's graph, which saved the LSTM weights that ``optimizer.step()`` has since updated
  in place.
* under bfloat16 autocast it runs to completion silently: the graph saved autocast's
  bfloat16 copies of the weights, not the weights, so nothing trips, but each backward runs
  through every earlier window (backward time and memory grow every step) and adds stale
  gradients from long-gone windows.

Either way the fix is the same: detach the carried state after every optimizer step
(``h = tuple(s.detach() for s in h)``) and drop ``retain_graph=True``; ``--fixed`` does that.
gradprobe names the module (GP101 undetached-hidden-state). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.nn.utils import clip_grad_norm_  # imported by name, as many training scripts do


class CellVoltageModel(nn.Module):
    def __init__(self, inputs: int = 3, hidden: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.lstm(x, state)
        return self.head(out), state


def make_signal(steps: int, window: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Current, temperature and state of charge -> terminal voltage, cut into windows."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(steps * window, dtype=torch.float32)
    current = torch.sin(t / 37.0).expand(batch, -1) + 0.1 * torch.randn(batch, t.numel(), generator=g)
    temp = torch.cos(t / 113.0).expand(batch, -1)
    soc = 1.0 - torch.cumsum(current.abs(), dim=1) / (4.0 * t.numel())
    x = torch.stack([current, temp, soc], dim=-1)
    v = 3.7 + 0.4 * soc - 0.05 * current + 0.01 * temp
    y = v.unsqueeze(-1)
    return x.view(batch, steps, window, 3).transpose(0, 1), y.view(batch, steps, window, 1).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype (CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--fixed", action="store_true", help="detach the state every step (the fix)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = CellVoltageModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = make_signal(args.steps, args.window, batch=8)
    state = None
    for step in range(args.steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            pred, state = model(x[step], state)
        loss = nn.functional.mse_loss(pred.float(), y[step])
        if not torch.isfinite(loss):
            state = tuple(s.detach() for s in state)  # only detached on errors!
            continue
        optimizer.zero_grad()
        loss.backward(retain_graph=not args.fixed)
        clip_grad_norm_(model.parameters(), max_norm=0.5)
        optimizer.step()
        if args.fixed:
            state = tuple(s.detach() for s in state)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}")


if __name__ == "__main__":
    main()
