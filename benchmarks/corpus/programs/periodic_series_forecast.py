"""Healthy: one-step-ahead forecasting of a seasonal series, batches taken in time order.

The noise of the series is seasonal (quiet in one half of the cycle, loud in the
other) and the DataLoader keeps time order (shuffle=False, as many forecasting
tutorials do), so the per-batch training loss traces a smooth periodic wave whose
period is one season; underneath it the model's error falls and then sits at the
noise floor. The wave is the data, not instability.
"""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(3)

T = 4000
season = 500
t = torch.arange(T, dtype=torch.float32)
noise_std = 0.05 + 0.25 * (1 + torch.sin(2 * math.pi * t / season)) / 2
series = torch.sin(2 * math.pi * t / 50) + 0.5 * torch.sin(2 * math.pi * t / 17) + noise_std * torch.randn(T)

window = 24
X = torch.stack([series[i:i + window] for i in range(T - window)])
Y = series[window:].unsqueeze(1)
loader = DataLoader(TensorDataset(X, Y), batch_size=50, shuffle=False)


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(window, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x)


model = Forecaster()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
criterion = nn.MSELoss()

step = 0
for epoch in range(4):
    losses = []
    for xb, yb in loader:
        opt.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 10 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
    print(f"epoch {epoch} mean loss {sum(losses) / len(losses):.4f} (mean noise variance {(noise_std ** 2).mean().item():.4f})")
