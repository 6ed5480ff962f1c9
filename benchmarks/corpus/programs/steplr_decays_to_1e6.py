"""Healthy: SGD + momentum with StepLR (x0.1 every 10 epochs) run to lr 1e-6, long after convergence.

A 10-class Gaussian-mixture task with overlapping classes, an MLP, SGD with
momentum 0.9 at lr 0.1 and StepLR(step_size=10 epochs, gamma=0.1), 60 epochs:
the classic ResNet-style schedule. At each lr the training loss settles on a
plateau set by the SGD noise at that step size; each x0.1 decay drops it to a
lower plateau (the largest drop at the first decay). After the second decay the
model has converged; the later decays (1e-4, 1e-5, 1e-6) change the loss only in
the fourth digit and test accuracy stays flat at 0.73 (the classes overlap, so
the loss floors near 0.66 with train accuracy 0.77). A flat loss at lr ~1e-6 for
the last 20 epochs is a schedule that outlived convergence, not a stalled run
(He et al., "Deep Residual Learning", https://arxiv.org/abs/1512.03385;
torch.optim.lr_scheduler.StepLR).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(8)

K, D = 10, 16
means = torch.randn(K, D) * 0.6


def sample(n):
    y = torch.randint(0, K, (n,))
    return means[y] + torch.randn(n, D), y


train_x, train_y = sample(6000)
test_x, test_y = sample(6000)
loader = DataLoader(TensorDataset(train_x, train_y), batch_size=200, shuffle=True)

net = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, K))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)

for epoch in range(60):
    lr = opt.param_groups[0]["lr"]
    total, n = 0.0, 0
    for xb, yb in loader:
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(xb)
        n += len(xb)
    sched.step()
    with torch.no_grad():
        train_acc = (net(train_x).argmax(1) == train_y).float().mean().item()
        test_acc = (net(test_x).argmax(1) == test_y).float().mean().item()
    print(f"epoch {epoch:2d} lr {lr:.0e} train loss {total / n:.4f} train acc {train_acc:.3f} test acc {test_acc:.3f}")
