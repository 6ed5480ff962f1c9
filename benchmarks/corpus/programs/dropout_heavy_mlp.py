"""Healthy: a wide MLP with heavy dropout (p=0.6 on both hidden layers).

The training loss, computed in train mode with 60% of units dropped, is noisy
and sits well above the eval-mode loss; the evaluation loss (model.eval(),
torch.no_grad()) falls steadily and never rises. Heavy dropout regularises as
intended.
"""
import torch
import torch.nn as nn

torch.manual_seed(24)

def data(n):
    x = torch.randn(n, 30)
    logits = x[:, :5] @ torch.tensor([1.5, -2.0, 1.0, 0.5, -1.0]) + 0.8 * x[:, 5] * x[:, 6]
    return x, (logits > 0).long()


xtr, ytr = data(1500)
xte, yte = data(1000)


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(30, 512), nn.ReLU(), nn.Dropout(0.6),
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.6),
            nn.Linear(512, 2),
        )

    def forward(self, x):
        return self.net(x)


model = DropNet()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()
for epoch in range(12):
    model.train()
    perm = torch.randperm(len(xtr))
    losses = []
    for i in range(0, len(xtr), 50):
        idx = perm[i:i + 50]
        opt.zero_grad()
        loss = criterion(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        eval_loss = criterion(model(xte), yte).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(f"epoch {epoch:2d} train(dropout) {sum(losses) / len(losses):.4f} [{min(losses):.3f}..{max(losses):.3f}] eval {eval_loss:.4f} acc {acc:.3f}")
