"""A regression that diverges to NaN, stopped by the script's own NaN guard.

A linear regression is fitted with SGD on raw features whose scale is far from 1 (sensor
units, std 30) at a learning rate that would be tiny for standardised inputs. The curvature
of the loss grows with the square of the feature scale, so every update overshoots: the
loss grows geometrically (about x1.8 per step), overflows to inf after ~130 steps, and the
script's guard

    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} at step {step}")

stops the run with a traceback that says *that* it diverged, not *why*:

    gradprobe run examples/nan_guard.py

gradprobe's report follows the chain back (GP40x: the first non-finite loss, gradients and
parameters, and what preceded them: the gradient norm growing step over step, the input
scale, the update-to-weight ratio). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--feature-scale", type=float, default=30.0, help="scale of the raw features")
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(8, 1, generator=g)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    for step in range(args.steps):
        x = args.feature_scale * torch.randn(64, 8, generator=g)
        y = x @ w_true
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.4g}")
    print("finished")


if __name__ == "__main__":
    main()
