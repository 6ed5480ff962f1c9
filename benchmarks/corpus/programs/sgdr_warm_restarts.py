"""Healthy: regression MLP trained with Adam + CosineAnnealingWarmRestarts (SGDR).

Every restart resets the learning rate to its maximum, so the training loss jumps
up for a few steps right after each restart and then falls below its previous
low as the cosine anneals. That saw-tooth is the intended behaviour of warm
restarts (Loshchilov & Hutter, "SGDR", https://arxiv.org/abs/1608.03983;
torch.optim.lr_scheduler.CosineAnnealingWarmRestarts).
"""
import math

import torch
from torch import nn

torch.manual_seed(2)

# y = sin(3x1) * cos(2x2) + 0.5 x3^2 + noise
X = torch.rand(2048, 3) * 2 - 1
y = (torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1]) + 0.5 * X[:, 2] ** 2).unsqueeze(1)
y += 0.05 * torch.randn_like(y)

net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
opt = torch.optim.Adam(net.parameters(), lr=3e-2)
steps_per_epoch = 16
sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3 * steps_per_epoch, T_mult=2, eta_min=1e-4)
mse = nn.MSELoss()

global_step = 0
for epoch in range(21):
    order = torch.randperm(len(X))
    for b in range(steps_per_epoch):
        idx = order[b * 128:(b + 1) * 128]
        pred = net(X[idx])
        loss = mse(pred, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        global_step += 1
        if global_step % 8 == 0:
            print(f"step {global_step:4d} lr {opt.param_groups[0]['lr']:.5f} loss {loss.item():.5f}")
with torch.no_grad():
    final = mse(net(X), y).item()
print(f"final full-batch mse {final:.5f} (noise floor {0.05 ** 2:.5f}, target var {y.var().item():.4f}), rmse {math.sqrt(final):.4f}")
