"""Healthy: batch size 2 with plain SGD on a small tabular regression.

With two samples per step the per-step loss and gradient are extremely noisy
(the per-step loss swings over two orders of magnitude), but the full-dataset
loss evaluated after every epoch falls steadily. Tiny batches are noisy by
nature; the run is fine.
"""
import torch
import torch.nn as nn

torch.manual_seed(15)

N = 400
X = torch.randn(N, 6)
y = (X[:, :3].sum(1, keepdim=True) - 0.5 * X[:, 3:4] * X[:, 4:5] + 0.2 * torch.randn(N, 1))

model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
crit = nn.MSELoss()

for epoch in range(6):
    perm = torch.randperm(N)
    step_losses = []
    for i in range(0, N, 2):
        idx = perm[i:i + 2]
        loss = crit(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_losses.append(loss.item())
    with torch.no_grad():
        full = crit(model(X), y).item()
    print(f"epoch {epoch} step loss min {min(step_losses):.5f} max {max(step_losses):.3f} | full-data loss {full:.4f}")
