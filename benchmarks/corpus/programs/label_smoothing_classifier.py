"""Healthy: a classifier trained with CrossEntropyLoss(label_smoothing=0.1).

With label smoothing the target puts 0.1 / K mass on every class, so the loss
cannot reach 0: its floor for a perfect, calibrated model is the entropy of the
smoothed target (about 0.50 nats here, K = 10). The training loss flattens just
above that floor while accuracy is ~100%; the flat loss is the floor, not a
stall (https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html,
Szegedy et al. 2016).
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(12)

K, D, N = 10, 32, 3000
prototypes = torch.randn(K, D) * 1.5
labels = torch.randint(0, K, (N,))
inputs = prototypes[labels] + torch.randn(N, D)

eps = 0.1
q_true = 1 - eps + eps / K
q_other = eps / K
floor = -(q_true * math.log(q_true) + (K - 1) * q_other * math.log(q_other))

model = nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Linear(128, K))
criterion = nn.CrossEntropyLoss(label_smoothing=eps)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for epoch in range(15):
    perm = torch.randperm(N)
    total, correct = 0.0, 0
    for i in range(0, N, 100):
        idx = perm[i:i + 100]
        out = model(inputs[idx])
        loss = criterion(out, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        correct += (out.argmax(1) == labels[idx]).sum().item()
    print(f"epoch {epoch:2d} loss {total / N:.4f} (floor {floor:.4f}) acc {correct / N:.4f}")
