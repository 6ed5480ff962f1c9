"""Faulty: clip_grad_norm_(max_norm=0.01) on a model whose gradient norm is ~3-10: every step is cut hundreds of times.

The clip threshold was copied from a recipe with a very different loss scale.
Every single step is clipped, by a factor of several hundred, so the effective
learning rate is a few hundredths of a percent of the configured one. The loss does
still fall, slowly and steadily, which hides the problem: the same model with
clipping at 1.0 reaches in one epoch a loss this run does not reach in ten.

Source: https://github.com/alibaba/Pai-Megatron-Patch/issues/579 ("If grad norm
was around 2500 with clipping value of '1', gradient was scaled down by ~1/2500
and it leads to similar effect of 1/2500 smaller learning rate setting") and
https://github.com/wandb/senpai/pull/978 ("100% of training batches are clipped
(mean raw gradient norm=20) ... The effective step size is ~20x lower than what
the LR implies").
"""
import torch
import torch.nn as nn

torch.manual_seed(33)

X = torch.randn(4096, 16)
y = (3 * torch.sin(X[:, :1]) + X[:, 1:2] * X[:, 2:3] + 2 * X[:, 3:4]) * 2.0

model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
mse = nn.MSELoss()
MAX_NORM = 0.01

for epoch in range(10):
    perm = torch.randperm(4096)
    norms, clipped = [], 0
    for i in range(0, 4096, 128):
        idx = perm[i:i + 128]
        opt.zero_grad()
        loss = mse(model(X[idx]), y[idx])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        norms.append(norm.item())
        clipped += norm.item() > MAX_NORM
    with torch.no_grad():
        full = mse(model(X), y).item()
    mean_norm = sum(norms) / len(norms)
    print(f"epoch {epoch} loss {full:.3f} (target var {y.var().item():.2f}) grad norm {mean_norm:.2f} "
          f"clipped {clipped}/{len(norms)} steps, cut by {mean_norm / MAX_NORM:.0f}x")
