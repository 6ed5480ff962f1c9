"""Faulty: MSELoss between a (N, 1) prediction and a (N,) target broadcasts to (N, N); the model learns the mean.

The regression head outputs shape (64, 1), the target tensor has shape (64,).
nn.MSELoss broadcasts them to (64, 64) (with only a UserWarning) and averages the
error of every prediction against every target in the batch, which is minimised
by predicting the batch mean for every input. The loss falls to the target
variance (~1.0 for this standardised target) and stays there; the model never
learns the inputs' effect, though the data are nearly noiseless.

Source: https://github.com/pytorch/pytorch/issues/16045 (broadcasting in MSELoss
between (n, 1) and (n,) gives the wrong result; the warning was added in
https://github.com/pytorch/pytorch/pull/18349) and
https://github.com/deepset-ai/FARM/issues/229 ("Using a target size
(torch.Size([32, 1])) that is different to the input size (torch.Size([32]))"
from a regression head).
"""
import warnings

import torch
import torch.nn as nn

warnings.simplefilter("once")
torch.manual_seed(55)

X = torch.randn(3200, 6)
y = X[:, 0] * 1.5 - X[:, 1] + 0.5 * X[:, 2] * X[:, 3] + 0.05 * torch.randn(3200)
y = (y - y.mean()) / y.std()  # shape (3200,)

model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 1))  # output (batch, 1)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.MSELoss()

for epoch in range(8):
    perm = torch.randperm(3200)
    for i in range(0, 3200, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), y[idx])  # BUG: (64, 1) vs (64,)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model(X).squeeze(1)
        true_mse = ((pred - y) ** 2).mean().item()
    print(f"epoch {epoch} loss {loss.item():.4f} actual per-sample MSE {true_mse:.4f} prediction std {pred.std().item():.4f}")
