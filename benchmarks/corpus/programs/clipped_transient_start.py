"""Healthy: gradient clipping (max_norm=1) that fires on the first two steps only.

A one-pass (online) regression over a time-ordered sensor log. The log starts
with 64 warm-up readings, taken while the sensor settled, whose targets are far
noisier than the rest, so the first two batches give gradient norms of several
units and clip_grad_norm_ cuts them; from the third batch on the gradient norm
is well below the threshold and clipping never fires again. Clipping an initial
transient is what the safeguard is for; the run trains normally.
"""
import torch
import torch.nn as nn

torch.manual_seed(16)

n = 9664
X = torch.randn(n, 12)
y = torch.tanh(X[:, :4]).sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1)
y[:64] += 4.0 * torch.randn(64, 1)          # sensor warm-up: wild readings at the start of the log

model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()
clipped = []

for step, start in enumerate(range(0, n, 32)):
    xb, yb = X[start:start + 32], y[start:start + 32]
    optimizer.zero_grad()
    loss = loss_fn(model(xb), yb)
    loss.backward()
    total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    if total_norm > 1.0:
        clipped.append(step)
    if step < 6 or step % 25 == 0:
        print(f"step {step:3d} loss {loss.item():8.4f} grad_norm(before clip) {total_norm.item():7.3f}")
print(f"clipped steps: {clipped} of {step + 1}")
