"""Healthy: linear-plus-MLP regression on heavy-tailed (Student-t, df=2.5) features.

A few samples have features tens of times larger than typical, so the batches
that contain one of them produce a loss spike; the next batches are ordinary and
the loss comes straight back down. The median loss keeps falling through the
run. Recovered spikes from heavy-tailed data are expected, not divergence.
"""
import torch
import torch.nn as nn

torch.manual_seed(4)

n, d = 6000, 8
features = torch.distributions.StudentT(df=2.5).sample((n, d))
w_true = torch.randn(d)
target = features @ w_true * 0.5 + 0.3 * torch.tanh(features[:, 0] * features[:, 1]) + 0.1 * torch.randn(n)
target = target.unsqueeze(1)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(d, 1)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.linear(x) + self.mlp(x)


model = Regressor()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
loss_fn = nn.MSELoss()

history = []
for epoch in range(5):
    perm = torch.randperm(n)
    for start in range(0, n, 64):
        idx = perm[start:start + 64]
        optimizer.zero_grad()
        loss = loss_fn(model(features[idx]), target[idx])
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        step = len(history)
        if step % 20 == 0:
            recent = sorted(history[-20:])
            print(f"step {step:4d} loss {loss.item():9.4f}  median(last 20) {recent[10]:.4f}  max(last 20) {recent[-1]:9.4f}")
print(f"steps {len(history)}, final median loss {sorted(history[-50:])[25]:.4f}")
