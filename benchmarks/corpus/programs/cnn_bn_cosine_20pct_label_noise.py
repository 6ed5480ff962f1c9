"""Healthy: a small BatchNorm CNN (SGD momentum, cosine decay) trained on labels with 20% flipped.

A fifth of the training labels are replaced by a different, uniformly chosen
class (symmetric label noise over 4 classes). The best any model can do on the
noisy labels is the noise entropy: H = -0.8 ln 0.8 - 3 (0.0667 ln 0.0667) = 0.72
nats, with noisy-label accuracy 0.80. So the training loss falls from ln 4 = 1.39
only to about that floor and stays high (epoch means 0.6-0.8 for most of the run,
single batches 0.4-1.0), and training accuracy against the given labels stalls at
0.80 -- which looks like a plateau. Meanwhile the
accuracy on a clean held-out test set is high (~0.99): the network learned the true
classes and (in these few epochs) did not memorise the flipped ones. Trained as
intended; the high loss is the label noise.

Regime: learning with noisy labels (Zhang et al., "Understanding deep learning
requires rethinking generalization", https://arxiv.org/abs/1611.03530; Arpit et al.,
"A closer look at memorization", https://arxiv.org/abs/1706.05394);
torch.optim.lr_scheduler.CosineAnnealingLR.
"""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(31)
K, S, FLIP = 4, 16, 0.20


def images(n, seed):
    """4 classes: horizontal bar, vertical bar, diagonal, ring; random position, noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    labels = torch.randint(0, K, (n,), generator=g)
    out = torch.empty(n, 1, S, S)
    for i in range(n):
        cy, cx = torch.randint(4, S - 4, (2,), generator=g).float()
        c = labels[i].item()
        if c == 0:
            img = ((yy - cy).abs() < 1.5) & ((xx - cx).abs() < 5)
        elif c == 1:
            img = ((xx - cx).abs() < 1.5) & ((yy - cy).abs() < 5)
        elif c == 2:
            img = (((yy - cy) - (xx - cx)).abs() < 1.5) & ((yy - cy).abs() < 5)
        else:
            r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
            img = (r > 2) & (r < 3.5)
        out[i, 0] = img.float() + 0.4 * torch.randn(S, S, generator=g)
    return out, labels


X, y_clean = images(4000, 1)
Xte, yte = images(1000, 2)
g = torch.Generator().manual_seed(3)
flip = torch.rand(len(y_clean), generator=g) < FLIP
y_noisy = y_clean.clone()
y_noisy[flip] = (y_clean[flip] + torch.randint(1, K, (int(flip.sum()),), generator=g)) % K
floor = -(1 - FLIP) * math.log(1 - FLIP) - (K - 1) * (FLIP / (K - 1)) * math.log(FLIP / (K - 1))
print(f"flipped {int(flip.sum())}/{len(y_clean)} training labels; noise-entropy floor {floor:.3f} nats, "
      f"ln K = {math.log(K):.3f}, best noisy-label accuracy {1 - FLIP:.2f}")

net = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, K),
)
EPOCHS = 8
loader = DataLoader(TensorDataset(X, y_noisy, y_clean), batch_size=64, shuffle=True)
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * len(loader))
ce = nn.CrossEntropyLoss()

step = 0
for epoch in range(EPOCHS):
    net.train()
    tot = n = agree_noisy = agree_clean = 0
    for xb, yb, ycb in loader:
        out = net(xb)
        loss = ce(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        tot += loss.item() * len(yb)
        n += len(yb)
        pred = out.argmax(1)
        agree_noisy += (pred == yb).sum().item()
        agree_clean += (pred == ycb).sum().item()
        if step % 40 == 0:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.4f} batch_loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        te_out = net(Xte)
        te_loss = ce(te_out, yte).item()
        te_acc = (te_out.argmax(1) == yte).float().mean().item()
    print(f"epoch {epoch} train_loss(noisy labels) {tot / n:.4f} train_acc_vs_noisy {agree_noisy / n:.3f} "
          f"train_acc_vs_clean {agree_clean / n:.3f} | clean test loss {te_loss:.4f} acc {te_acc:.3f}")
