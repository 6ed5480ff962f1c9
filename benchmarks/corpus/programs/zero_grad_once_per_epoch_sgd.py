"""Faulty: optimizer.zero_grad() called once per epoch instead of once per step (SGD, MLP regression).

The call sits at the top of the epoch loop, above the batch loop, so within an
epoch every loss.backward() adds onto the gradients of all earlier batches of
that epoch: the k-th update of an epoch moves the weights by lr times the sum
of k gradients. The first few batches of each epoch train normally, then the
steps grow with the step index (the printed gradient norm climbs through each
epoch, up to ~300 in epoch 3) and the batch loss swings up within the epoch.
Instead of converging, the full-data loss rises from ~1 after epoch 0 to ~4 by
epoch 3 and ends near the target variance (2.16), i.e. no better than
predicting a constant.

Fix (one line): move optimizer.zero_grad() into the batch loop, before
loss.backward(). Checked: with zero_grad() per step the full-data loss is 0.182
after epoch 0 and ends at 0.025.

Source: https://github.com/pytorch/pytorch/issues/47175 ("It is easy to introduce
an extremely nasty bug in your code by forgetting to call zero_grad() or calling
it at the beginning of each epoch instead of the beginning of each iteration")
and https://github.com/speedinghzl/Pytorch-Deeplab/issues/30 ("Zero_grad only
once? ... we should write optimizer.zero_grad() in the for loop").
"""
import torch
from torch import nn

torch.manual_seed(308)

D, N = 12, 3200
w_true = torch.randn(D)
feats = torch.randn(N, D)
target = (torch.tanh(feats @ w_true / 2) * 2 + 0.3 * feats[:, 0] * feats[:, 1]
          + 0.1 * torch.randn(N)).unsqueeze(1)

model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
criterion = nn.MSELoss()
print(f"target variance {target.var().item():.3f}")

step = 0
for epoch in range(10):
    optimizer.zero_grad()  # BUG: once per epoch; belongs inside the batch loop
    perm = torch.randperm(N)
    for i in range(0, N, 64):
        idx = perm[i:i + 64]
        loss = criterion(model(feats[idx]), target[idx])
        loss.backward()
        gnorm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:3d} batch {i // 64:2d} loss {loss.item():.4f} grad norm {gnorm:.3f}")
        step += 1
    with torch.no_grad():
        full = criterion(model(feats), target).item()
    print(f"epoch {epoch} full-data loss {full:.4f}")
