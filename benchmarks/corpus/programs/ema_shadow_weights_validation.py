"""Healthy: an exponential moving average (EMA) of the weights, evaluated on a validation set.

A classifier is trained with SGD momentum at a deliberately high constant learning
rate (0.2) on noisy 3-class data (10% of training labels flipped), so the raw
weights keep bouncing: the per-step training loss is noisy and the raw model's
validation loss wanders from epoch to epoch. Alongside, a shadow copy of the
weights is updated after every optimizer step without any optimizer
(shadow = 0.995 * shadow + 0.005 * weights, under torch.no_grad). The script
prints the raw and the EMA model's validation loss/accuracy each epoch: the EMA
model is smoother and ends better than the raw one. Noisy raw training is the
point of using an EMA; trained as intended.

Regime: Polyak-Ruppert / exponential weight averaging (Polyak & Juditsky 1992,
https://doi.org/10.1137/0330046; as used in e.g. https://arxiv.org/abs/1803.05407 and
timm's ModelEmaV2).
"""
import copy

import torch
from torch import nn

torch.manual_seed(23)

D, K = 20, 3


def make(n, seed, flip=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    logits = torch.stack([x[:, 0] + 0.5 * x[:, 1] * x[:, 2], x[:, 3] - x[:, 4] ** 2 + 1, torch.sin(2 * x[:, 5]) + x[:, 6]], 1)
    y = logits.argmax(1)
    if flip:
        m = torch.rand(n, generator=g) < flip
        y[m] = torch.randint(0, K, (int(m.sum()),), generator=g)
    return x, y


X, y = make(6000, 1, flip=0.10)
Xv, yv = make(2000, 2)

net = nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, K))
ema = copy.deepcopy(net)
for p in ema.parameters():
    p.requires_grad_(False)
DECAY = 0.995

opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
ce = nn.CrossEntropyLoss()


@torch.no_grad()
def ema_update():
    for e, p in zip(ema.parameters(), net.parameters()):
        e.mul_(DECAY).add_(p, alpha=1 - DECAY)


@torch.no_grad()
def evaluate(model):
    out = model(Xv)
    return ce(out, yv).item(), (out.argmax(1) == yv).float().mean().item()


BS, EPOCHS = 64, 14
step = 0
for epoch in range(EPOCHS):
    order = torch.randperm(len(X))
    tot, n = 0.0, 0
    for b in range(len(X) // BS):
        idx = order[b * BS:(b + 1) * BS]
        loss = ce(net(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update()
        step += 1
        tot += loss.item()
        n += 1
        if step % 50 == 0:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.3f} batch_loss {loss.item():.4f}")
    rl, ra = evaluate(net)
    el, ea = evaluate(ema)
    print(f"epoch {epoch:2d} train_loss {tot / n:.4f} | val raw loss {rl:.4f} acc {ra:.3f} | val ema loss {el:.4f} acc {ea:.3f}")
