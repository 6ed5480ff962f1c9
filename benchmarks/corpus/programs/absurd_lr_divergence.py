"""Faulty: SGD with an absurd learning rate (lr=0.2 with momentum 0.9) on a unit-scale regression diverges to NaN.

The loss starts normally, climbs by orders of magnitude within a few dozen steps
as every update overshoots further, reaches inf and then NaN; the weights are
NaN from then on.

Source: https://github.com/amdegroot/ssd.pytorch/issues/275 (loss 3.26 -> 14.7 ->
... -> 29821698048 -> nan; "Solved this problem by using a small learning rate")
and https://github.com/CharlieDinh/pFedMe/issues/11 ("the training loss is nan
when the learning rate is large").
"""
import torch
import torch.nn as nn

torch.manual_seed(31)

X = torch.randn(2048, 20)
y = X @ torch.randn(20, 1) * 0.5 + torch.relu(X[:, :1]) + 0.1 * torch.randn(2048, 1)

model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
criterion = nn.MSELoss()

for epoch in range(5):
    perm = torch.randperm(2048)
    for b in range(32):
        idx = perm[b * 64:(b + 1) * 64]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if b % 8 == 0 or (epoch == 0 and b < 14):
            print(f"epoch {epoch} batch {b:2d} loss {loss.item():.4g}")
