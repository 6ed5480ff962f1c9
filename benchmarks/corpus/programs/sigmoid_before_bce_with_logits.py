"""Faulty: the model ends in nn.Sigmoid and its output goes into nn.BCEWithLogitsLoss (sigmoid applied twice).

BCEWithLogitsLoss applies the sigmoid itself, so the probabilities p in [0, 1]
are squashed again to sigmoid(p) in [0.5, 0.73]. The best the model can do is
p = 1 for positives (loss -log sigmoid(1) = 0.313) and p = 0 for negatives (loss
-log(1 - sigmoid(0)) = ln 2 = 0.693): the loss cannot go below about 0.50 on a
balanced task, and the extra sigmoid's slope (at most 0.25, near 0 where p
saturates) shrinks every gradient, so the loss creeps towards that floor: the loss goes 0.663, 0.631, 0.604, then
crawls from 0.592 to 0.567 over the last 9 epochs (accuracy 0.86), where the same
network without the Sigmoid layer is at 0.115 and still falling.

Fix (one line): delete the nn.Sigmoid() layer (apply torch.sigmoid only when
predicting). Checked: without it (accuracy thresholded at logit 0) the same
script ends at loss 0.115, accuracy 0.964.

Source: https://github.com/yudi-mars/daisyRec/pull/15 (merged: "Do not need sigmoid
because there is sigmoid in BCEWithLogitsLoss. Otherwise loss does not converge."),
https://github.com/itakurah/focal-loss-pytorch/pull/5 ("applies the sigmoid twice
... the lowest score the model will see is 0.5") and
https://github.com/lopuhin/kaggle-imet-2019/issues/3 ("This loss expects logits, so
sigmoid must not be added here").
"""
import math

import torch
from torch import nn

torch.manual_seed(64)

X = torch.randn(6000, 12)
score = X[:, 0] * X[:, 1] + torch.sin(2 * X[:, 2]) + 0.5 * X[:, 3]
y = (score > score.median()).float().unsqueeze(1)

model = nn.Sequential(
    nn.Linear(12, 64), nn.ReLU(),
    nn.Linear(64, 64), nn.ReLU(),
    nn.Linear(64, 1),
    nn.Sigmoid(),  # BUG: BCEWithLogitsLoss expects raw logits
)
criterion = nn.BCEWithLogitsLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
floor = 0.5 * (-math.log(1 / (1 + math.exp(-1))) + math.log(2))
print(f"lowest loss reachable with probabilities as logits: {floor:.4f}")

for epoch in range(12):
    perm = torch.randperm(6000)
    for i in range(0, 6000, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(X)
        full = criterion(out, y).item()
        acc = ((out > 0.5).float() == y).float().mean().item()
    print(f"epoch {epoch:2d} loss {full:.4f} accuracy {acc:.3f}")
