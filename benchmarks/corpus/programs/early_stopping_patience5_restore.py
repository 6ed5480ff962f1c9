"""Healthy: early stopping with patience 5 that restores the best checkpoint.

An over-sized MLP is trained with Adam on a small, noisy regression set (160
training points). Validation loss is evaluated after every epoch; the script keeps
a copy of the best state_dict, counts evaluations without improvement, and stops
once 5 in a row fail to beat the best, then loads the best checkpoint back and
re-evaluates it. In the output the training loss keeps falling while the
validation loss stops improving and sits above its best for the last five
evaluations -- what overfitting looks like -- but that stretch is exactly what
early stopping waits through before stopping; the model that is kept is the best-validation one (its
re-evaluated validation loss equals the recorded best). Trained as intended.

Regime: early stopping (Prechelt, "Early Stopping - But When?",
https://doi.org/10.1007/3-540-49430-8_3; e.g. Lightning's EarlyStopping(patience=5),
torch.nn.Module.state_dict / load_state_dict).
"""
import copy

import torch
from torch import nn

torch.manual_seed(41)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g) * 2 - 1
    y = torch.sin(2.5 * x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3]
    return x, (y + 0.3 * torch.randn(n, generator=g)).unsqueeze(1)


X, y = data(160, 1)
Xv, yv = data(400, 2)
print(f"train {len(X)} val {len(Xv)}; noise variance {0.3 ** 2:.3f}, target variance {y.var().item():.3f}")

net = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
opt = torch.optim.Adam(net.parameters(), lr=2e-3)
mse = nn.MSELoss()
PATIENCE, MAX_EPOCHS, BS = 5, 400, 8

best, best_epoch, best_state, bad = float("inf"), -1, None, 0
step = 0
for epoch in range(MAX_EPOCHS):
    net.train()
    order = torch.randperm(len(X))
    tot = 0.0
    for b in range(len(X) // BS):
        idx = order[b * BS:(b + 1) * BS]
        loss = mse(net(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tot += loss.item()
    net.eval()
    with torch.no_grad():
        vl = mse(net(Xv), yv).item()
    if vl < best:
        best, best_epoch, best_state, bad = vl, epoch, copy.deepcopy(net.state_dict()), 0
        tag = "improved, checkpoint saved"
    else:
        bad += 1
        tag = f"no improvement {bad}/{PATIENCE}"
    print(f"epoch {epoch:3d} step {step:4d} lr {opt.param_groups[0]['lr']:.4f} train_loss {tot / (len(X) // BS):.4f} val_loss {vl:.4f} ({tag})")
    if bad >= PATIENCE:
        print(f"early stopping at epoch {epoch}: no improvement for {PATIENCE} evaluations")
        break

net.load_state_dict(best_state)
net.eval()
with torch.no_grad():
    print(f"restored best checkpoint from epoch {best_epoch}: val_loss {mse(net(Xv), yv).item():.4f} "
          f"(recorded best {best:.4f}), train_loss {mse(net(X), y).item():.4f}")
