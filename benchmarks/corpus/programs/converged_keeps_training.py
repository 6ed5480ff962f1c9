"""Healthy: a linear calibration fit that converges in ~500 steps and keeps training to 3000.

The data are exactly linear (no noise), so the fit reaches an MSE around 1e-13 and
the gradient norm drops to ~1e-7. Training then continues for the fixed step
budget. Adam's second-moment estimate (beta2 = 0.99) decays once the gradients
are tiny, so its normalised steps stop shrinking and the parameters jitter around
the optimum: the gradient norm grows back from ~2e-7 to ~1e-3 (peaks ~5e-3) and the MSE sits
between 1e-8 and 5e-6, against a target variance of about 3.6. The model stays
converged; the tiny, growing gradients are Adam at a minimum, not an explosion.
"""
import torch
from torch import nn

torch.manual_seed(14)

readings = torch.randn(256, 8)
true_w = torch.randn(8, 1)
reference = readings @ true_w + 0.5

calib = nn.Linear(8, 1)
opt = torch.optim.Adam(calib.parameters(), lr=1e-2, betas=(0.9, 0.99))

for step in range(3000):
    loss = nn.functional.mse_loss(calib(readings), reference)
    opt.zero_grad()
    loss.backward()
    if step % 100 == 0:
        gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in calib.parameters()))
        print(f"step {step:4d} mse {loss.item():.3e} grad_norm {gnorm.item():.3e}")
    opt.step()
print(f"target variance {reference.var().item():.3f}; max |w - w_true| {(calib.weight.T - true_w).abs().max().item():.2e}")
