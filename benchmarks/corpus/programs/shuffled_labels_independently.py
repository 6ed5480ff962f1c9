"""Faulty: features and labels are shuffled with two different permutations each epoch.

The epoch loop shuffles the feature array and the label array separately
(np.random.shuffle(X); np.random.shuffle(y)), so after the first shuffle every
feature row is paired with a random label. The model can learn nothing but the
label prior: the loss drops to the entropy of the class distribution (~1.38 for 4
roughly balanced classes) within the first epoch and sits there for the rest of
the run; accuracy is at chance. Shuffling an index array and using it for both
(X[idx], y[idx]) keeps the pairs.

Source: https://github.com/udacity/sdc-issue-reports/issues/1326 ("you can shuffle
the features and labels separately (different shuffle orders) and still pass the
quiz") and https://github.com/caicloud/tensorflow-tutorial/issues/114 (training
images and labels shuffled one after the other: "aren't they all misaligned?").
"""
import math

import numpy as np
import torch
import torch.nn as nn

np.random.seed(52)
torch.manual_seed(52)

K = 4
X = np.random.randn(4000, 20).astype(np.float32)
y = (X[:, :K] + 0.2 * np.random.randn(4000, K)).argmax(1)
prior = np.bincount(y, minlength=K) / len(y)
print(f"entropy of the label prior {-(prior * np.log(prior)).sum():.4f} (ln K = {math.log(K):.4f})")

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, K))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()

for epoch in range(6):
    np.random.shuffle(X)  # BUG: shuffles the rows of X ...
    np.random.shuffle(y)  # ... and y with a different permutation
    total = 0.0
    for i in range(0, 4000, 64):
        xb = torch.from_numpy(X[i:i + 64])
        yb = torch.from_numpy(y[i:i + 64]).long()
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(xb)
    print(f"epoch {epoch} mean loss {total / 4000:.4f}")
