"""Healthy: gradient accumulation over 4 micro-batches of 16 before each optimizer step.

The loss of each micro-batch is divided by the number of accumulation steps and
backward() is called on each, so gradients add up in .grad; optimizer.step()
and zero_grad() run once every 4 micro-batches. Four backward passes per step
is the technique, not a leak (https://pytorch.org/docs/stable/notes/amp_examples.html#gradient-accumulation).
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(13)

x = torch.randn(3072, 16)
w = torch.randn(16, 3)
y = (torch.tanh(x @ w) + 0.1 * torch.randn(3072, 3))

loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
model = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
loss_fn = nn.MSELoss()
accum_steps = 4

optimizer.zero_grad()
for epoch in range(6):
    epoch_loss, n = 0.0, 0
    for i, (xb, yb) in enumerate(loader):
        loss = loss_fn(model(xb), yb) / accum_steps
        loss.backward()
        epoch_loss += loss.item() * accum_steps
        n += 1
        if (i + 1) % accum_steps == 0:
            optimizer.step()
            optimizer.zero_grad()
    print(f"epoch {epoch} mean micro-batch loss {epoch_loss / n:.4f} (noise floor {0.01:.4f})")
