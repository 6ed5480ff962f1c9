"""Healthy: a deep residual MLP trained with activation checkpointing (torch.utils.checkpoint, use_reentrant=False).

Each of the 12 residual blocks runs under torch.utils.checkpoint.checkpoint with
use_reentrant=False, so its activations are dropped after the forward pass and
recomputed during backward. That doubles the forward work and makes the autograd
graph look unusual (the recomputation happens inside backward), but the gradients
are exactly the ones of the plain model: the script checks this once at the start
(max abs difference of every parameter's gradient, checkpointed vs plain) and then
trains a 5-class spiral classifier with AdamW and a cosine schedule. The loss falls
from ln 5 = 1.61 to near 0 and accuracy reaches ~1.0. Trained as intended.

Regime: activation (gradient) checkpointing, Chen et al. "Training Deep Nets with
Sublinear Memory Cost" (https://arxiv.org/abs/1604.06174);
torch.utils.checkpoint.checkpoint (https://pytorch.org/docs/stable/checkpoint.html).
"""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

torch.manual_seed(11)

K, N_PER = 5, 400


def spirals(n_per, seed):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k in range(K):
        r = torch.linspace(0.05, 1.0, n_per)
        t = k * 2 * math.pi / K + r * 4.0 + 0.15 * torch.randn(n_per, generator=g)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], 1))
        ys.append(torch.full((n_per,), k))
    return torch.cat(xs), torch.cat(ys)


X, y = spirals(N_PER, 1)
Xte, yte = spirals(200, 2)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class DeepMLP(nn.Module):
    def __init__(self, d=64, depth=12, use_ckpt=True):
        super().__init__()
        self.inp = nn.Linear(2, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, K))
        self.use_ckpt = use_ckpt

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            if self.use_ckpt and self.training:
                h = checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        return self.out(h)


net = DeepMLP()
ce = nn.CrossEntropyLoss()

# One-time check: checkpointed gradients equal the plain model's.
xb, yb = X[:256], y[:256]
ce(net(xb), yb).backward()
g_ckpt = [p.grad.clone() for p in net.parameters()]
net.zero_grad()
net.use_ckpt = False
ce(net(xb), yb).backward()
diff = max((p.grad - g).abs().max().item() for p, g in zip(net.parameters(), g_ckpt))
net.zero_grad()
net.use_ckpt = True
print(f"gradient check: max |grad_ckpt - grad_plain| = {diff:.2e} over {sum(1 for _ in net.parameters())} tensors")

EPOCHS, BS = 25, 100
steps_per_epoch = len(X) // BS
opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch, eta_min=1e-5)

step = 0
for epoch in range(EPOCHS):
    net.train()
    order = torch.randperm(len(X))
    tot, n = 0.0, 0
    for b in range(steps_per_epoch):
        idx = order[b * BS:(b + 1) * BS]
        loss = ce(net(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        tot += loss.item() * len(idx)
        n += len(idx)
    net.eval()
    with torch.no_grad():
        tr_acc = (net(X).argmax(1) == y).float().mean().item()
        te_logits = net(Xte)
        te_loss = ce(te_logits, yte).item()
        te_acc = (te_logits.argmax(1) == yte).float().mean().item()
    print(f"epoch {epoch:2d} step {step:4d} lr {opt.param_groups[0]['lr']:.5f} train_loss {tot / n:.4f} "
          f"train_acc {tr_acc:.3f} test_loss {te_loss:.4f} test_acc {te_acc:.3f}")
