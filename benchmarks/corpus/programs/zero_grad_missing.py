"""Faulty: optimizer.zero_grad() is never called, so .grad keeps accumulating every step.

The loop computes the loss, calls backward() and optimizer.step(), but never
clears the gradients. Each step's gradient is added to the sum of all previous
ones, so the gradient used at step t is the sum of t gradients: its norm grows
step after step, the updates grow with it, and the loss, after a first drop,
oscillates with growing amplitude and blows up.

Source: https://github.com/yastrebksv/TennisCourtDetector/issues/7 ("Why there is no
optimizer.zero_grad() in base_trainer.py?" - "You are right, thanks! I fixed it"),
https://github.com/wenet-e2e/wekws/pull/73 ("when optimizer.step() is called,
optimizer.zero_grad() is not called") and https://github.com/pytorch/pytorch/issues/47175
("It is easy to introduce an extremely nasty bug in your code by forgetting to call
zero_grad()").
"""
import torch
import torch.nn as nn

torch.manual_seed(56)

X = torch.randn(2000, 10)
y = (X[:, :3].sum(1, keepdim=True) > 0).float()

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
criterion = nn.BCEWithLogitsLoss()

step = 0
for epoch in range(6):
    perm = torch.randperm(2000)
    for i in range(0, 2000, 50):
        idx = perm[i:i + 50]
        loss = criterion(model(X[idx]), y[idx])
        loss.backward()  # BUG: no optimizer.zero_grad() anywhere in the loop
        optimizer.step()
        if step % 20 == 0:
            gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
            print(f"step {step:3d} loss {loss.item():.4f} grad norm {gnorm:.2f}")
        step += 1
