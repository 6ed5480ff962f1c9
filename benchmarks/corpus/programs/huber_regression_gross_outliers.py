"""Healthy: SmoothL1 (Huber) regression where 5% of the training targets are gross outliers.

5% of the targets are replaced by values of +-20..50 (the clean target's scale is ~1).
The batch loss therefore never gets small and jumps from batch to batch depending on
how many outliers each batch draws (a batch with a few outliers scores several times a
clean one), and its epoch mean stays ~1.8 for the whole run. Huber caps each outlier's
per-element gradient at 1 (the L1 branch), so the fit of the clean relationship is unaffected: the
error on clean held-out targets falls to near the noise level. The noisy, high loss
is the outliers, not a failed fit (Huber, "Robust Estimation of a Location Parameter",
1964; torch.nn.SmoothL1Loss / torch.nn.HuberLoss).
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(63)

N, D = 3000, 6
X = torch.randn(N, D)
clean = torch.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] - 0.3 * X[:, 3] + 0.05 * torch.randn(N)
y = clean.clone()
outlier = torch.rand(N) < 0.05
signs = torch.where(torch.rand(N) < 0.5, -1.0, 1.0)
y[outlier] = signs[outlier] * (20 + 30 * torch.rand(N)[outlier])
print(f"outliers {int(outlier.sum())}/{N}; clean target std {clean.std().item():.3f}, "
      f"corrupted target std {y.std().item():.2f}")

X_test = torch.randn(1000, D)
y_test = torch.sin(X_test[:, 0]) + 0.5 * X_test[:, 1] * X_test[:, 2] - 0.3 * X_test[:, 3]

loader = DataLoader(TensorDataset(X, y, outlier.float()), batch_size=64, shuffle=True)
model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
crit = nn.SmoothL1Loss(beta=1.0)

step = 0
for epoch in range(14):
    tot, n = 0.0, 0
    for xb, yb, ob in loader:
        loss = crit(model(xb).squeeze(1), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tot += loss.item() * len(xb)
        n += len(xb)
        if step % 50 == 0:
            print(f"step {step:4d} batch loss {loss.item():.3f} (outliers in batch {int(ob.sum())})")
    with torch.no_grad():
        pred = model(X_test).squeeze(1)
        test_mse = ((pred - y_test) ** 2).mean().item()
        train_clean_mse = ((model(X[~outlier]).squeeze(1) - clean[~outlier]) ** 2).mean().item()
    print(f"epoch {epoch:2d} lr {opt.param_groups[0]['lr']:.4f} train SmoothL1 {tot / n:.3f} "
          f"clean-train MSE {train_clean_mse:.4f} clean-test MSE {test_mse:.4f} "
          f"(test target var {y_test.var().item():.3f})")
