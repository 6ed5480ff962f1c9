"""Faulty: an epoch-based ExponentialLR (gamma=0.9) is stepped after every batch instead of every epoch.

The schedule was written for 20 epochs (lr 0.05 * 0.9**epoch, ending near 0.006),
but scheduler.step() sits inside the batch loop, so with 80 batches per epoch the
learning rate is multiplied by 0.9 eighty times in the first epoch: it is ~1e-5
after epoch 0, ~2e-9 after epoch 1 and ~3e-75 by the last epoch. The network gets
a few dozen useful steps, then every update is vanishingly small: the loss
freezes at 1.42 (chance, ln 6, is 1.79) with accuracy 0.40 for all 20 epochs.

Fix (one line): move scheduler.step() out of the batch loop, to the end of the
epoch. Checked: with that change the same script is at loss 0.377 (accuracy 0.86)
after epoch 0 and ends at loss 0.060, accuracy 0.986 (lr 0.0061).

Source: https://github.com/ivadomed/ivadomed/pull/55 ("Scheduler was incorrectly
stepped in the batch loop instead of in the epoch loop ..., causing the LR to be
updated after each batch instead of after each epoch"), https://github.com/pytorch/tutorials/pull/640
("scheduler.step() per epoch not per batch") and https://github.com/pytorch/pytorch/issues/3814
("Scheduler should step after the end of each epoch, not after every iteration").
"""
import torch
from torch import nn

torch.manual_seed(61)

K = 6
teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, K))
X = torch.randn(4000, 16)
with torch.no_grad():
    Y = teacher(X).argmax(1)

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, K))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)  # meant per epoch
criterion = nn.CrossEntropyLoss()

for epoch in range(20):
    perm = torch.randperm(4000)
    for i in range(0, 4000, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), Y[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()  # BUG: inside the batch loop
    with torch.no_grad():
        out = model(X)
        full = criterion(out, Y).item()
        acc = (out.argmax(1) == Y).float().mean().item()
    print(f"epoch {epoch:2d} lr {optimizer.param_groups[0]['lr']:.3e} loss {full:.4f} accuracy {acc:.3f}")
