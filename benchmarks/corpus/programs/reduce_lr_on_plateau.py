"""Healthy: SGD + ReduceLROnPlateau on validation loss until the fit has converged.

Each time the validation loss stops improving for 2 epochs the learning rate is
cut by 10x (0.05 -> 0.005 -> 0.0005 -> ...). By the end the lr is tiny, the
updates are tiny, and the loss is flat, because the model has converged at the
noise floor; the scheduler did its job.
"""
import torch
import torch.nn as nn

torch.manual_seed(19)

N = 2000
X = torch.rand(N, 4) * 2 - 1
Y = (X[:, 0] * X[:, 1] + torch.sin(2 * X[:, 2]) - X[:, 3] ** 2).unsqueeze(1) + 0.1 * torch.randn(N, 1)
Xtr, Ytr, Xva, Yva = X[:1600], Y[:1600], X[1600:], Y[1600:]

net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=2)
crit = nn.MSELoss()

for epoch in range(30):
    perm = torch.randperm(1600)
    for i in range(0, 1600, 40):
        idx = perm[i:i + 40]
        loss = crit(net(Xtr[idx]), Ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_loss = crit(net(Xva), Yva).item()
    sched.step(val_loss)
    print(f"epoch {epoch:2d} lr {opt.param_groups[0]['lr']:.1e} train_loss {loss.item():.4f} val_loss {val_loss:.4f} (noise var 0.0100)")
