"""Faulty: the target column is left among the input features (label leakage); the regression "fits" almost at once.

A tabular regression: 12 feature columns and a target column built from them plus
irreducible noise (noise variance 0.30, target variance 1.16), all in one table.
The input slice takes every column (table[:, :]) instead of table[:, :-1], so the
target itself is input column 12. The training MSE collapses within the first epoch
far below the noise floor (which no honest model can beat) and heads to 0, and the
held-out MSE on rows of the same leaky table does the same. One-line fix:
X = table[:, :-1]; checked with FIXED=1: the MSE then settles just above the 0.30 noise
floor (numbers in the corpus entry).

Source: https://github.com/dotnet/machinelearning/issues/737 (near-perfect binary
classification metrics: "I was incorrectly including the target class as a feature")
and https://github.com/CogComp/saul/issues/112 (the label was not excluded from the
features, "which will result in an unexpected higher accuracy").
"""
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(11)

N, D = 4000, 12
NOISE_VAR = 0.30
feats = torch.randn(N, D)
w = torch.randn(D) * 0.3
target = feats @ w + 0.5 * torch.tanh(feats[:, 0] * feats[:, 1]) + NOISE_VAR ** 0.5 * torch.randn(N)
table = torch.cat([feats, target[:, None]], dim=1)  # last column = target

X = table[:, :-1] if os.environ.get("FIXED") else table[:, :]  # BUG: the target column stays in the inputs
y = table[:, -1:]
train = TensorDataset(X[:3200], y[:3200])
X_val, y_val = X[3200:], y[3200:]
print(f"inputs {X.shape[1]} columns; target variance {y.var().item():.3f}; noise floor (irreducible MSE) {NOISE_VAR:.3f}")

model = nn.Sequential(nn.Linear(X.shape[1], 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.MSELoss()
loader = DataLoader(train, batch_size=64, shuffle=True)

step = 0
for epoch in range(10):
    total = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(xb)
        if step % 25 == 0 and step <= 200:
            print(f"step {step:4d} batch mse {loss.item():.5f}")
        step += 1
    with torch.no_grad():
        val = criterion(model(X_val), y_val).item()
    print(f"epoch {epoch:2d} train mse {total / len(train):.5f} val mse {val:.5f} lr {optimizer.param_groups[0]['lr']}")
