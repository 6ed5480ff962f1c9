"""Healthy: an MLP for a 4%-positive binary problem, no recurrent module, no gradient clipping.

With few positives, a batch that happens to hold several positives has a
gradient several times larger than a batch with none, so the gradient norm
jumps around from step to step. Nothing recurrent, no clipping, and none is
needed: the loss falls and the held-out loss follows it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(17)

n, d = 8000, 20
x = torch.randn(n, d)
score = x[:, 0] * 1.5 + x[:, 1] * x[:, 2] - 0.8 * x[:, 3] ** 2
label = (score > torch.quantile(score, 0.96)).float()
x_tr, y_tr, x_va, y_va = x[:6000], label[:6000], x[6000:], label[6000:]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(d, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, inp):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(inp))))).squeeze(1)


net = Net()
opt = torch.optim.Adam(net.parameters(), lr=2e-3)
for epoch in range(6):
    perm = torch.randperm(len(x_tr))
    norms = []
    for i in range(0, len(x_tr), 64):
        idx = perm[i:i + 64]
        loss = F.binary_cross_entropy_with_logits(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())).item())
        opt.step()
    with torch.no_grad():
        val = F.binary_cross_entropy_with_logits(net(x_va), y_va).item()
        p = torch.sigmoid(net(x_va))
        recall = ((p > 0.5) & (y_va == 1)).sum().item() / max(1, (y_va == 1).sum().item())
    norms.sort()
    print(f"epoch {epoch} last loss {loss.item():.4f} val_loss {val:.4f} recall {recall:.2f} "
          f"grad norm median {norms[len(norms) // 2]:.3f} max {norms[-1]:.3f}")
