"""Faulty: unscale_, then skip the step on a bad gradient norm with `continue`, without scaler.update(): crash.

A float16-autocast regression with a GradScaler. After backward the loop unscales,
clips, and, to be safe, skips the optimizer step when the norm is not finite. But
it also skips scaler.update(), so the scaler still believes the optimizer was
unscaled in this iteration; the next iteration's scaler.unscale_(optimizer) raises
"RuntimeError: unscale_() has already been called on this optimizer since the last
update()". The first overflow comes as soon as the large initial error times the
default scale 65536 overflows float16 in the backward.

Source: https://github.com/Haian-Jin/LVSM/pull/19 (skipping the optimizer step on a
large grad norm, with update() only called together with step(): "RuntimeError:
unscale_() has already been called on this optimizer since the last update()") and
https://github.com/espnet/espnet/pull/2362 (the same error; "We must invoke
scaler.update at every iteration even if it has inf/nan values").
"""
import torch
from torch import nn

torch.manual_seed(50)

X = torch.randn(2048, 10)
y = 30.0 * X[:, :3].sum(1, keepdim=True) + 100.0  # targets in the hundreds

model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
scaler = torch.amp.GradScaler("cpu")

for step in range(200):
    idx = torch.randint(0, 2048, (64,))
    opt.zero_grad()
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        pred = model(X[idx])
    loss = nn.functional.mse_loss(pred.float(), y[idx])
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    if not torch.isfinite(norm):
        print(f"step {step}: grad norm {norm.item()}, skipping this step")
        continue  # BUG: scaler.update() is skipped too
    scaler.step(opt)
    scaler.update()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.2f} grad norm {norm.item():.2f} scale {scaler.get_scale():.0f}")
