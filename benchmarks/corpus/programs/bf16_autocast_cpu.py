"""Healthy: bfloat16 autocast on CPU, no GradScaler (none is needed for bf16).

The forward runs under torch.autocast("cpu", dtype=torch.bfloat16); bfloat16
has float32's exponent range, so gradients do not underflow and loss scaling is
unnecessary (https://pytorch.org/docs/stable/amp.html#cpu-op-specific-behavior).
The classifier trains normally; the loss is a little noisier than in float32
because of bf16 rounding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(22)

K = 6
centers = torch.randn(K, 24) * 1.2
y = torch.randint(0, K, (4096,))
x = centers[y] + torch.randn(4096, 24)

model = nn.Sequential(nn.Linear(24, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, K))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for epoch in range(6):
    perm = torch.randperm(len(x))
    running = 0.0
    for i in range(0, len(x), 128):
        idx = perm[i:i + 128]
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch} loss {running / 32:.4f} acc {acc:.3f} (logits dtype {logits.dtype})")
