"""Healthy: an MLP autoencoder trained with MSELoss(reduction="sum") on unnormalised sensor-like readings.

24 sensor-like readings in physical units (mean 6.8, range about 1-18) generated
from 4 latent factors plus noise (std 0.2), an MLP autoencoder with a 4-unit
bottleneck, Adam lr 3e-3, batches of 64, 25 epochs (1250 steps), and
nn.MSELoss(reduction="sum") -- summed over the 64 x 24 entries of a batch. The loss
values are therefore in the thousands: the epoch-0 mean is 16260 (the network first
has to learn the offsets), then 2242 -> 1644 (epoch 5) -> 919 (epoch 10) -> 609
(epoch 16) -> 524 (epoch 24), while predicting each feature's mean would score 3099
per batch and the noise floor is 61. The held-out per-element MSE falls 1.60 ->
0.34. Large loss values from a sum reduction are a scale, not a fault; Adam's
update does not depend on the loss scale (torch.nn.MSELoss reduction='sum';
Kingma & Ba, "Adam", https://arxiv.org/abs/1412.6980).
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(38)

N, D, LATENT = 4000, 24, 4
NOISE = 0.2
# Readings in physical units (roughly 0-12): a 4-factor nonlinear process plus sensor noise.
z = torch.randn(N, LATENT)
mix = torch.randn(LATENT, D)
offsets = torch.rand(D) * 6 + 3
x = offsets + 1.5 * torch.tanh(z @ mix) + 0.5 * (z[:, :1] ** 2) + NOISE * torch.randn(N, D)
train_x, test_x = x[:3200], x[3200:]
loader = DataLoader(TensorDataset(train_x), batch_size=64, shuffle=True)

model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, LATENT),
                      nn.Linear(LATENT, 64), nn.ReLU(), nn.Linear(64, D))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion = nn.MSELoss(reduction="sum")  # summed over the 64 x 24 entries of a batch
print(f"inputs: mean {train_x.mean().item():.2f}, range {train_x.min().item():.2f}..{train_x.max().item():.2f}; "
      f"sum-reduced noise floor per batch of 64 = {64 * D * NOISE ** 2:.1f}; predicting the per-feature mean "
      f"gives {64 * ((test_x - train_x.mean(0)) ** 2).sum(1).mean().item():.1f} per batch")
step = 0
for epoch in range(25):
    total = 0.0
    for (xb,) in loader:
        loss = criterion(model(xb), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        total += loss.item()
        if step % 100 == 0:
            print(f"step {step:4d} batch loss (sum) {loss.item():9.1f} = per-element mse {loss.item() / xb.numel():.4f}")
    with torch.no_grad():
        test_mse = ((model(test_x) - test_x) ** 2).mean().item()
    print(f"epoch {epoch:2d} mean batch loss (sum) {total / len(loader):9.1f} held-out per-element mse {test_mse:.4f}")
