"""Faulty: gradient clipping applied to the still-scaled gradients of a GradScaler run (no scaler.unscale_ first).

float16 autocast + GradScaler on CPU, SGD with momentum, clip_grad_norm_(max_norm=1.0)
called right after scaler.scale(loss).backward(). The gradients at that point are
multiplied by the loss scale (65536), so their norm is ~47000 and every step is
clipped to norm 1; scaler.step() then divides by 65536 again. Each update is
~1/47000 of the intended one: the loss barely moves (0.968 -> 0.967 over five
epochs, target variance 1.0), where the same loop with scaler.unscale_(optimizer)
before clipping reaches 0.097 after one epoch and 0.019 after five.

Source: https://github.com/Lightning-AI/pytorch-lightning/issues/9599 ("the loss
converged very slow ... clip_gradients is executed right after backward, but
scaler.unscale_ is conducted in pre_optimization_step ... may lead to a very flat
learning curve") and https://github.com/rwth-i6/returnn/issues/1590 ("the effective
value gradient_clip_global_norm with AMP is reduced by a factor of 65k").
"""
import torch
import torch.nn as nn

torch.manual_seed(49)

X = torch.randn(4096, 16)
y = torch.tanh(X[:, :6] @ torch.randn(6, 1)) + 0.1 * torch.randn(4096, 1)
y = (y - y.mean()) / y.std()

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.amp.GradScaler("cpu")
criterion = nn.MSELoss()

for epoch in range(5):
    perm = torch.randperm(4096)
    norms = []
    for i in range(0, 4096, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            out = model(X[idx])
        loss = criterion(out.float(), y[idx])
        scaler.scale(loss).backward()
        # BUG: clipping the scaled gradients; scaler.unscale_(optimizer) must come first
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0).item())
        scaler.step(optimizer)
        scaler.update()
    with torch.no_grad():
        full = criterion(model(X), y).item()
    print(f"epoch {epoch} loss {full:.4f} (target var 1.0) grad norm seen by the clip {sum(norms) / len(norms):.0f} "
          f"scale {scaler.get_scale():.0f}")
