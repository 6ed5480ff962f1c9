"""Faulty: raw, unnormalised features (floor area in m^2 ~ 50-300, year built ~ 1900-2020, lot size ~ 100-10000) fed to an MLP.

The house-price regression target is standardised, the inputs are not: they sit
at 1e2-1e4, so the first layer's pre-activations are in the hundreds to
thousands. The untrained outputs are huge (the first loss is 34, against a target
variance of 1.04), 28% of the first-layer ReLUs are dead for every house from the
first epoch on, and the live ones respond almost linearly to the largest raw
feature. With Adam at a normal learning rate the loss creeps down to 0.55 after
12 epochs, 13x the 0.042 the same script reaches when the inputs are
standardised, (x - mean) / std.

Source: https://discuss.pytorch.org/t/neural-network-could-not-learn-on-this-type-of-data-why/96648/5
(inputs 1..4000 fed raw; "You could normalize the input (which is usually done
anyway)") and https://openillumi.com/en/en-pytorch-performance-fix-standardization
(loss stagnation on a data set with a large value scale, fixed by z-score
standardisation).
"""
import torch
import torch.nn as nn

torch.manual_seed(44)

n = 4000
area = torch.rand(n) * 250 + 50
year = torch.randint(1900, 2021, (n,)).float()
lot = torch.rand(n) * 9900 + 100
rooms = torch.randint(1, 8, (n,)).float()
X = torch.stack([area, year, lot, rooms], 1)
price = 0.8 * (area - 175) / 72 + 0.5 * torch.tanh((year - 1960) / 30) + 0.3 * torch.log(lot / 1000) + 0.2 * (rooms - 4)
y = ((price - price.mean()) / price.std()).unsqueeze(1)
y = y + 0.2 * torch.randn_like(y)

model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()
print("feature means", [round(v, 1) for v in X.mean(0).tolist()], "stds", [round(v, 1) for v in X.std(0).tolist()])

for epoch in range(12):
    perm = torch.randperm(n)
    for i in range(0, n, 64):
        idx = perm[i:i + 64]
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        full = loss_fn(model(X), y).item()
        dead = (torch.relu(model[0](X)).max(0).values <= 0).float().mean().item()
    print(f"epoch {epoch:2d} loss {full:.4f} (target var {y.var().item():.3f}) dead first-layer units {dead:.2f}")
