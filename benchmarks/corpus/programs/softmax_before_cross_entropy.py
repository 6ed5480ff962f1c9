"""Faulty: the model ends in nn.Softmax and its output goes into nn.CrossEntropyLoss (softmax applied twice).

CrossEntropyLoss applies log_softmax itself, so feeding it probabilities squashes
the "logits" into [0, 1]: the best the model can do is p = (1, 0, ..., 0), whose
cross-entropy is -log(e / (e + K - 1)) = 1.46 for K = 10. The loss stalls on a
plateau near that floor (and the gradients through the double softmax are small,
so it approaches it slowly), while accuracy gets high: the loss plateau is the
bug, not the data. Without the Softmax layer the same model reaches a loss near 0.

Source: https://github.com/ariecattan/SciCo/issues/2 ("the logits being softmaxed
into probabilities before being fed into the CrossEntropyLoss ... which treats
those inputs as logits and softmaxes them again. This bounds the minimum possible
loss") and https://github.com/illiterate/BertClassifier/issues/2 (extra softmax
before nn.CrossEntropyLoss: the loss decreases very slowly).
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(53)

K = 10
centers = torch.randn(K, 30) * 1.5
labels = torch.randint(0, K, (5000,))
feats = centers[labels] + torch.randn(5000, 30)

model = nn.Sequential(
    nn.Linear(30, 128), nn.ReLU(),
    nn.Linear(128, K),
    nn.Softmax(dim=1),  # BUG: CrossEntropyLoss expects raw logits
)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
print(f"lowest loss reachable with probabilities as logits: {-math.log(math.e / (math.e + K - 1)):.4f}")

for epoch in range(10):
    perm = torch.randperm(5000)
    for i in range(0, 5000, 100):
        idx = perm[i:i + 100]
        optimizer.zero_grad()
        loss = criterion(model(feats[idx]), labels[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = model(feats)
        full = criterion(probs, labels).item()
        acc = (probs.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f}")
