"""Healthy: curriculum learning on a two-arm spiral, harder (outer) points added in stages.

Points on the inner part of the spiral arms are nearly linearly separable; the
outer turns are the hard part. The training pool starts with the inner third of
each arm (radius < 0.35), adds points out to radius 0.7 at epoch 15, and the
whole spiral at epoch 30. Each time the pool grows, the training loss jumps (the
first batch of the new stage scores 8.3 after epoch-14 batches near 0.08, and
1.9 after epoch-29 batches near 0.21: the new points sit on the wrong side of
the boundary fitted so far) and then falls again as the model bends its boundary
around them; after the first jump it sits near 0.6 for about seven epochs before
it finds the next turn. Accuracy on the full spiral reaches 0.64 in stage 1,
dips while stage 2 reshapes the boundary, and climbs to about 0.99 in stage 3.
The jumps are the curriculum, not instability (Bengio et al., "Curriculum
Learning", ICML 2009, https://dl.acm.org/doi/10.1145/1553374.1553380).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(7)


def spiral(n_per_arm):
    r = torch.rand(n_per_arm * 2) ** 0.8
    theta = 3.0 * math.pi * r
    arm = torch.arange(2).repeat_interleave(n_per_arm)
    theta = theta + math.pi * arm
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1) + 0.02 * torch.randn(2 * n_per_arm, 2)
    return x, arm, r


X, Y, R = spiral(1500)
stages = {0: 0.35, 15: 0.7, 30: 1.01}

net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
loader = None
for epoch in range(45):
    if epoch in stages:
        pool = R < stages[epoch]
        loader = DataLoader(TensorDataset(X[pool], Y[pool]), batch_size=64, shuffle=True)
        print(f"--- epoch {epoch}: curriculum stage, pool = radius < {stages[epoch]:.2f} ({int(pool.sum())} points)")
    batch_losses = []
    for xb, yb in loader:
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        batch_losses.append(loss.item())
    with torch.no_grad():
        acc_all = (net(X).argmax(1) == Y).float().mean().item()
    print(f"epoch {epoch:2d} pool loss first batch {batch_losses[0]:.4f} epoch mean {sum(batch_losses) / len(batch_losses):.4f} "
          f"full-spiral acc {acc_all:.3f}")
