"""Healthy: stochastic weight averaging (AveragedModel + SWALR) after a constant high-lr phase.

A BatchNorm MLP is trained with SGD momentum on a noisy 3-class problem (15% of
training labels flipped). After 10 ordinary epochs (cosine-decayed lr 0.1 -> 0.05)
the SWA phase starts: SWALR anneals to and then holds a constant, fairly high lr
(0.05) and every epoch the weights are folded into a torch.optim.swa_utils.
AveragedModel. During that phase the training loss is flat and noisy -- it does
not go down any more, by design, because the high constant lr keeps the weights
moving around a wide basin. At the end update_bn recomputes the BatchNorm
statistics for the averaged weights, and the SWA model's test accuracy/loss is
as good as or better than the last SGD iterate's. The flat noisy tail is the
intended exploration phase; trained as intended.

Regime: stochastic weight averaging (Izmailov et al., https://arxiv.org/abs/1803.05407;
torch.optim.swa_utils.AveragedModel, SWALR, update_bn).
"""
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(71)
D, K = 16, 3


def make(n, seed, flip=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    s = torch.stack([x[:, 0] * x[:, 1], x[:, 2] + x[:, 3] ** 2 - 1, torch.cos(1.5 * x[:, 4]) + 0.5 * x[:, 5]], 1)
    y = s.argmax(1)
    if flip:
        m = torch.rand(n, generator=g) < flip
        y[m] = (y[m] + torch.randint(1, K, (int(m.sum()),), generator=g)) % K
    return x, y


X, y = make(12000, 1, flip=0.15)
Xte, yte = make(3000, 2)
loader = DataLoader(TensorDataset(X, y), batch_size=100, shuffle=True)

net = nn.Sequential(nn.Linear(D, 64), nn.BatchNorm1d(64), nn.ReLU(),
                    nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, K))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
EPOCHS, SWA_START = 22, 10
cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=SWA_START, eta_min=0.05)
swa_model = AveragedModel(net)
swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=2, anneal_strategy="cos")
ce = nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model):
    model.eval()
    out = model(Xte)
    return ce(out, yte).item(), (out.argmax(1) == yte).float().mean().item()


step = 0
for epoch in range(EPOCHS):
    net.train()
    tot, n, losses = 0.0, 0, []
    for xb, yb in loader:
        loss = ce(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tot += loss.item()
        n += 1
        losses.append(loss.item())
        if step % 60 == 0:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.4f} batch_loss {loss.item():.4f}")
    phase = "swa" if epoch >= SWA_START else "sgd"
    if epoch >= SWA_START:
        swa_model.update_parameters(net)
        swa_sched.step()
    else:
        cos.step()
    tl, ta = evaluate(net)
    lt = torch.tensor(losses)
    print(f"epoch {epoch:2d} [{phase}] lr {opt.param_groups[0]['lr']:.4f} train_loss {tot / n:.4f} "
          f"(batch min {lt.min():.3f} max {lt.max():.3f}) | last-iterate test loss {tl:.4f} acc {ta:.3f}")

update_bn(loader, swa_model)
sl, sa = evaluate(swa_model)
tl, ta = evaluate(net)
print(f"final: last SGD iterate test loss {tl:.4f} acc {ta:.3f} | SWA average of {int(swa_model.n_averaged)} "
      f"snapshots test loss {sl:.4f} acc {sa:.3f}")
