"""Healthy: AdamW with decoupled weight decay 0.05 on an over-parameterised regression.

Weight decay keeps the weight norms from growing while the loss falls; the run
converges near the noise floor with a validation loss close to the training
loss (https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html,
Loshchilov & Hutter, "Decoupled Weight Decay Regularization").
"""
import torch
import torch.nn as nn

torch.manual_seed(21)


def make(n):
    x = torch.randn(n, 10)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(n, 1)
    return x, y


x_train, y_train = make(1024)
x_val, y_val = make(512)

model = nn.Sequential(nn.Linear(10, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
criterion = nn.MSELoss()

for epoch in range(15):
    model.train()
    perm = torch.randperm(1024)
    for i in range(0, 1024, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        train_loss = criterion(model(x_train), y_train).item()
        val_loss = criterion(model(x_val), y_val).item()
        wnorm = torch.sqrt(sum((p ** 2).sum() for p in model.parameters())).item()
    print(f"epoch {epoch:2d} train {train_loss:.4f} val {val_loss:.4f} weight_norm {wnorm:.2f}")
