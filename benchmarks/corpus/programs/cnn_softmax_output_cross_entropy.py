"""Faulty: a small CNN whose last layer is nn.Softmax, trained with nn.CrossEntropyLoss (softmax applied twice).

10 classes of 12x12 synthetic images (a class template plus pixel noise), a
conv-pool-conv-pool-linear network ending in nn.Softmax(dim=1), SGD with
momentum. nn.CrossEntropyLoss applies log_softmax itself, so it receives
probabilities in [0, 1] as "logits": even a perfect p = (1, 0, ..., 0) scores
-log(e / (e + K - 1)) = 1.4612 for K = 10, and the gradient through the second
softmax is small, so the loss crawls towards that floor and stops there while
the classes are long separable. The printed loss stays far above 0 for the
whole run.

Fix (one line): drop nn.Softmax(dim=1) from the model (apply softmax only when
reading out probabilities). Checked: without the Softmax the same script is at loss
0.141, accuracy 0.953 after epoch 0 and ends at 0.0001, accuracy 1.000.

Source: https://github.com/NaJaeMin92/pytorch-DANN/issues/7 ("The softmax layer
makes models hard to train ... try to remove the last softmax layer"; the
maintainer removed it since LogSoftmax is already inside nn.CrossEntropyLoss) and
https://github.com/nishnik/Deep-Semantic-Similarity-Model-PyTorch/issues/2
(Softmax output fed to CrossEntropyLoss; "That was a mistake").
"""
import math

import torch
from torch import nn

torch.manual_seed(302)

K, N = 10, 2000
templates = torch.randn(K, 1, 12, 12)
labels = torch.randint(0, K, (N,))
images = templates[labels] + 1.0 * torch.randn(N, 1, 12, 12)

model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(16 * 3 * 3, K),
    nn.Softmax(dim=1),  # BUG: nn.CrossEntropyLoss expects raw logits
)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
print(f"lowest loss reachable with probabilities as logits: {-math.log(math.e / (math.e + K - 1)):.4f}")

step = 0
for epoch in range(7):
    perm = torch.randperm(N)
    for i in range(0, N, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(images[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(images)
        full = criterion(out, labels).item()
        acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f}")
