"""Healthy: heteroscedastic regression with nn.GaussianNLLLoss (mean and variance heads).

The noise is tiny for x < 0 (std 0.02) and larger for x > 0 (std 0.3). The Gaussian
negative log-likelihood 0.5 * (log var + (y - mu)^2 / var) is negative wherever the
predicted variance is below 1, so once the model has learnt the small-noise half
the training loss goes below zero within two epochs and keeps falling towards its
minimum (the mean log noise std + 0.5, about -2.06 here; it reaches about -1.7). Negative NLL is by design
(https://pytorch.org/docs/stable/generated/torch.nn.GaussianNLLLoss.html).
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(8)

x = torch.linspace(-3, 3, 3000).unsqueeze(1)
noise_std = torch.where(x < 0, torch.tensor(0.02), torch.tensor(0.3))
y = torch.sin(2 * x) + noise_std * torch.randn_like(x)


class MeanVar(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.mu = nn.Linear(64, 1)
        self.log_var = nn.Linear(64, 1)

    def forward(self, inp):
        h = self.trunk(inp)
        return self.mu(h), self.log_var(h).exp()


model = MeanVar()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
nll = nn.GaussianNLLLoss()
# the best achievable mean NLL (noise entropy minus the constant 0.5 log 2 pi that GaussianNLLLoss drops)
floor = (torch.log(noise_std) + 0.5).mean().item()

for epoch in range(30):
    perm = torch.randperm(len(x))
    total = 0.0
    for i in range(0, len(x), 100):
        idx = perm[i:i + 100]
        mu, var = model(x[idx])
        loss = nll(mu, y[idx], var)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    print(f"epoch {epoch:2d} mean NLL {total / 30:+.4f} (optimum about {floor:+.3f})")
print("predicted std at x=-2: %.3f, at x=+2: %.3f" % tuple(model(torch.tensor([[-2.0], [2.0]]))[1].sqrt().squeeze().tolist()))
