"""Healthy: float16 autocast on CPU with torch.amp.GradScaler("cpu"), used as documented.

scale(loss).backward(), unscale_ before clipping, scaler.step(), scaler.update()
every iteration (https://pytorch.org/docs/stable/notes/amp_examples.html), with
growth_interval=50: after every 50 clean steps the scaler doubles the scale, and
when the doubled scale overflows float16 in the backward it skips that one step
and halves it again. So a step is skipped now and then all through the run, by
design: that is how dynamic loss scaling finds the largest safe scale. The loss
falls to the noise floor.
"""
import torch
from torch import nn

torch.manual_seed(23)

X = torch.randn(4096, 16)
Y = (X[:, :8] @ torch.randn(8, 1)) + 0.1 * torch.randn(4096, 1)

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
scaler = torch.amp.GradScaler("cpu", growth_interval=50)
loss_fn = nn.MSELoss()

step = 0
skipped = 0
for epoch in range(5):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 64):
        idx = perm[i:i + 64]
        opt.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            pred = model(X[idx])
        loss = loss_fn(pred.float(), Y[idx])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale_before:
            skipped += 1
            print(f"step {step}: overflow, step skipped, scale {scale_before:.0f} -> {scaler.get_scale():.0f}")
        step += 1
    print(f"epoch {epoch} loss {loss.item():.4f} (noise var 0.01) scale {scaler.get_scale():.0f} skipped so far {skipped}")
