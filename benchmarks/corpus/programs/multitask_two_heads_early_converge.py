"""Healthy: a shared-trunk network with two heads and a weighted sum of their losses.

Task A (weight 1.0) is an easy binary classification (which of two well-separated modes x0 is in)
and its BCE drops to ~1e-3 within a couple of epochs and sits near 0 for the rest
of the run; task B (weight 0.5) is a harder nonlinear regression whose MSE keeps
falling for the whole run. The total loss is dominated by task B after the first
epochs. A loss term pinned near 0 is a converged task, not a dead head: task A's
accuracy is ~1.0 and stays there while task B improves (Caruana, "Multitask
Learning", Machine Learning 28, 1997; Ruder, https://arxiv.org/abs/1706.05098).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(118)

N, D = 6000, 8


def make(n):
    x = torch.randn(n, D)
    # task A: two well-separated modes along x0, the label is which mode
    ya = (torch.rand(n) < 0.5).float()
    x[:, 0] = (2 * ya - 1) * 2.0 + 0.3 * torch.randn(n)
    yb = torch.sin(2 * x[:, 2]) * x[:, 3] + 0.5 * torch.cos(3 * x[:, 4]) + 0.3 * x[:, 5] * x[:, 6]
    yb = yb + 0.05 * torch.randn(n)
    return x, ya, yb


x_tr, ya_tr, yb_tr = make(N)
x_te, ya_te, yb_te = make(1000)
loader = DataLoader(TensorDataset(x_tr, ya_tr, yb_tr), batch_size=64, shuffle=True)


class MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head_a = nn.Linear(128, 1)
        self.head_b = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        h = self.trunk(x)
        return self.head_a(h).squeeze(1), self.head_b(h).squeeze(1)


model = MultiTask()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
W_A, W_B = 1.0, 0.5
print(f"task B target variance {yb_te.var().item():.3f} (noise variance 0.0025)")
for epoch in range(20):
    ta = tb = tt = 0.0
    n = 0
    for xb, ab, bb in loader:
        la, lb_ = model(xb)
        loss_a = F.binary_cross_entropy_with_logits(la, ab)
        loss_b = F.mse_loss(lb_, bb)
        loss = W_A * loss_a + W_B * loss_b
        opt.zero_grad()
        loss.backward()
        opt.step()
        ta += loss_a.item() * len(xb)
        tb += loss_b.item() * len(xb)
        tt += loss.item() * len(xb)
        n += len(xb)
    with torch.no_grad():
        pa, pb = model(x_te)
        acc_a = ((pa > 0).float() == ya_te).float().mean().item()
        mse_b = F.mse_loss(pb, yb_te).item()
    print(f"epoch {epoch:2d} lr {opt.param_groups[0]['lr']:.4f} total {tt / n:.4f} task A BCE {ta / n:.5f} "
          f"task B MSE {tb / n:.4f} | test: A acc {acc_a:.3f} B MSE {mse_b:.4f}")
