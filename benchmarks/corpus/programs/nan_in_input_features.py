"""Faulty: missing values (NaN) in the feature table go straight into the model.

A tabular data set where a few sensor readings (0.02% of cells, 9 of the 5000 rows) are missing and were
stored as NaN (what pandas gives for an empty CSV cell). Nobody imputes or masks
them; the first batch that contains one produces a NaN output, a NaN loss and NaN
gradients, and the update writes NaN into the weights, so every later loss is
NaN too.

Source: https://github.com/Nixtla/neuralforecast/issues/186 ("silent bug, training
with NaNs values": "The loss becomes nan during training but it is hard to notice
that the problem is in the data") and https://github.com/fxia22/pointnet.pytorch/issues/58
("there were NAN's in the input to the network").
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(40)

n, d = 5000, 12
features = torch.randn(n, d)
target = features[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1)
missing = torch.rand(n, d) < 0.0002
features[missing] = float("nan")
print(f"rows with a missing value: {missing.any(1).sum().item()} of {n}")

loader = DataLoader(TensorDataset(features, target), batch_size=64, shuffle=True)
model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
crit = nn.MSELoss()

for epoch in range(3):
    for b, (xb, yb) in enumerate(loader):
        opt.zero_grad()
        loss = crit(model(xb), yb)
        loss.backward()
        opt.step()
        if b % 10 == 0 or (epoch == 0 and b < 12):
            print(f"epoch {epoch} batch {b:2d} loss {loss.item():.4f}")
