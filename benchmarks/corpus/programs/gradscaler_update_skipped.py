"""Faulty: batches with inf gradients are skipped with `continue`, before scaler.update(), so the scale never backs off.

float16 autocast with a GradScaler on CPU. To guard against "NaN gradients" the
loop checks the (still scaled) gradients and, if any is non-finite, zeroes them
and `continue`s, skipping scaler.step() AND scaler.update(). But an inf in the
scaled gradients is exactly the signal the scaler needs to halve its scale: with
update() skipped it stays at 65536 forever, so every batch that holds one of the
rare large-target samples (0.5% of rows) overflows float16 in the backward and is
thrown away whole, epoch after epoch: 90% and 79% of the batches in the first two
epochs, then about a quarter of all batches in every later epoch. The correct loop (scaler.step() and
scaler.update() every iteration) backs the scale off to 8192 after 3 skipped steps
in the first epoch and skips nothing afterwards.

Source: https://github.com/Haian-Jin/LVSM/pull/19 ("scaler.update() was only called
when scaler.step() was also called. If an optimizer step was skipped,
scaler.update() was also skipped, leaving the scaler in an invalid state") and
https://github.com/espnet/espnet/pull/2362 ("We must invoke scaler.update at every
iteration even if it has inf/nan values").
"""
import torch
import torch.nn as nn

torch.manual_seed(48)

n = 6400
X = torch.randn(n, 8)
y = X[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1)
spikes = torch.rand(n) < 0.005
y[spikes] += 60.0 * X[spikes, 4:5].sign()  # rare, large, but learnable (sign of feature 4)

model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
scaler = torch.amp.GradScaler("cpu")
criterion = nn.MSELoss()

for epoch in range(5):
    perm = torch.randperm(n)
    skipped, steps = 0, 0
    for i in range(0, n, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            pred = model(X[idx])
        loss = criterion(pred.float(), y[idx])
        scaler.scale(loss).backward()
        if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
            skipped += 1
            optimizer.zero_grad()
            continue  # BUG: skips scaler.update(), so the scale never backs off
        scaler.step(optimizer)
        scaler.update()
        steps += 1
    with torch.no_grad():
        full = criterion(model(X), y).item()
    print(f"epoch {epoch} last loss {loss.item():.4f} full-data loss {full:.4f} scale {scaler.get_scale():.0f} "
          f"skipped {skipped}/{skipped + steps} batches")
