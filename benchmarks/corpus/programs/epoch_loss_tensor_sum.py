"""Faulty: the epoch's running loss is summed as a tensor (`total_loss += loss`), keeping every step's graph.

The training itself is fine, but `total_loss` is a tensor with autograd history:
each `total_loss += loss` links the new step's graph into it, so the activations
graph nodes of every step of the epoch stay alive, chained to one another, until
the epoch ends (backward() has freed their saved activations, but not the nodes).
The process memory climbs step after step through the epoch (about 14 kB per step
here, ~10-15 MB per 1000-step epoch; with bigger models, or a loss that is logged but
not backpropagated, it is the classic "out of memory after N iterations"). The fix
is `total_loss += loss.item()`.

Source: https://github.com/BatsResearch/labelmodels/issues/4 ("You're holding on to
the graph for each batch per epoch, since running_loss is the sum of non-detached
tensors"), https://github.com/pai4451/ML2021/issues/2 (`train_loss += output.loss`
made CPU RAM grow until out of memory), and the PyTorch FAQ quoted in
https://github.com/google/brax/pull/152 ("Don't accumulate history across your
training loop").
"""
import resource

import torch
import torch.nn as nn

torch.manual_seed(30)

X = torch.randn(32000, 64)
y = (X[:, :10].sum(1) > 0).long() + (X[:, 10:20].sum(1) > 0).long()

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


for epoch in range(2):
    total_loss = 0
    for i in range(0, len(X), 32):
        optimizer.zero_grad()
        loss = criterion(model(X[i:i + 32]), y[i:i + 32])
        loss.backward()
        optimizer.step()
        total_loss += loss  # BUG: keeps the graph of every step alive; should be loss.item()
        step = i // 32
        if step % 250 == 0:
            print(f"epoch {epoch} step {step:4d} loss {loss.item():.4f} rss {rss_mb():.0f} MB")
    print(f"epoch {epoch} mean loss {(total_loss / (len(X) // 32)).item():.4f} rss at epoch end {rss_mb():.0f} MB")
