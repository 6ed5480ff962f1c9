"""Faulty: a house-price MLP regressor trained with SGD on raw prices (thousands), the targets never normalised.

The features are standardised, but the target (a price in thousands of dollars,
about 500-4500) goes into nn.MSELoss as it is. The first loss is in the millions,
so the gradients are thousands of times larger than on unit-scale targets, and
SGD at lr 0.01 (a fine step size for standardised targets) overshoots: the output
layer's weights grow to fit the price scale, which multiplies the curvature the
hidden layers see, and the updates overshoot further: the loss goes 9.0e6, 3.8e7,
2.4e8, 1.4e24, 7.8e35, inf at step 5 and NaN from step 6 on (the weights are NaN
from then on, every full-data mse is nan).

Fix (one line): standardise the target, y = (y - y.mean()) / y.std() (and undo it
when predicting). Checked: with that line the same script's full-data mse is
0.061, 0.038, 0.033, 0.030 after the 4 epochs, in standardised units (the noise
floor is (150 / 1038)^2 = 0.021).

Source: https://github.com/rstudio-conf-2020/dl-keras-tf/issues/9 (house sale
prices up to ~755000 with SGD lr 0.1 and mean squared error: "loss: nan" from the
first epoch; "When the error gets squared, the sum explodes"),
https://github.com/blackportal-ai/delta/issues/248 (California housing, target not
normalised: loss 5.58e10, then 3.75e296, then inf and NaN) and
https://github.com/pytorch/pytorch/issues/149827 (a PyTorch linear regression on
unscaled values with SGD whose loss is always NaN).
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(65)

n = 4000
rooms = torch.randint(1, 7, (n,)).float()
area = 40 + 25 * rooms + 15 * torch.randn(n)
age = torch.rand(n) * 80
dist = torch.rand(n) * 30
raw = torch.stack([rooms, area, age, dist, torch.randn(n), torch.randn(n)], 1)
price = 600 + 18 * area + 120 * rooms - 6 * age - 25 * dist + 150 * torch.randn(n)  # in thousands
X = (raw - raw.mean(0)) / raw.std(0)  # features standardised
y = price.unsqueeze(1)  # BUG: target left in thousands
print(f"target range {y.min().item():.0f} .. {y.max().item():.0f}, mean {y.mean().item():.0f}, std {y.std().item():.0f}")

loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True)
model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
criterion = nn.MSELoss()

step = 0
for epoch in range(4):
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step < 10:
            print(f"epoch {epoch} step {step:3d} loss {loss.item():.4g}")
        step += 1
    with torch.no_grad():
        full = criterion(model(X), y).item()
    print(f"epoch {epoch} full-data mse {full:.4g}")
