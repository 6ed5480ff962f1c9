"""Healthy: an MLP classifier trained with SGD under a triangular CyclicLR.

The learning rate sweeps 0.005 -> 0.1 -> 0.005 every 2 * 60 steps, so the loss
rises a little on every upswing of the cycle and falls again on the downswing;
each cycle ends lower than the last. This is the schedule working as designed
(Smith, "Cyclical Learning Rates", https://arxiv.org/abs/1506.01186; PyTorch's
torch.optim.lr_scheduler.CyclicLR).
"""
import torch
import torch.nn as nn

torch.manual_seed(0)

# Three interleaved spirals in 2-D (the classic toy set), with a little noise.
n_per_class, dim, classes = 300, 2, 3
r = torch.linspace(0.05, 1.0, n_per_class)
X, y = [], []
for c in range(classes):
    t = torch.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + torch.randn(n_per_class) * 0.2
    X.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], 1))
    y.append(torch.full((n_per_class,), c))
X, y = torch.cat(X), torch.cat(y)

model = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))
opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.005, max_lr=0.1, step_size_up=60, mode="triangular")
loss_fn = nn.CrossEntropyLoss()

batch = 30
step = 0
for epoch in range(24):
    perm = torch.randperm(len(X))
    epoch_loss = 0.0
    for i in range(0, len(X), batch):
        idx = perm[i:i + batch]
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        epoch_loss += loss.item()
        step += 1
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch:2d} step {step:4d} lr {sched.get_last_lr()[0]:.3f} loss {epoch_loss / (len(X) // batch):.4f} acc {acc:.3f}")
