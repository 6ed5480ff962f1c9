"""Faulty: a learning-rate typo (lr=5e1, meant 5e-2) collapses a 10-class classifier to the uniform prediction.

The classifier is an MLP whose output layer has no bias (like a tied language-model
head). The first few updates, each clipped to norm 1 but multiplied by lr = 50, throw
every hidden ReLU into its dead region for every input. From then on the logits are
exactly 0 for every sample, so the prediction is uniform, the loss is ln(10) =
2.3026 to four decimals on every batch, every gradient is exactly zero and nothing
can recover; accuracy is at chance (0.10). With lr=5e-2 the same script reaches a
loss near 0.

Source: https://discuss.pytorch.org/t/cross-entropy-loss-is-not-decreasing/43814/16
(the loss "always stays the same equal to 2.30", "precisely equal to guessing
randomly"; the parameters driven negative with zero derivatives through ReLU; fix:
a smaller learning rate) and https://epcsirmaz.blogspot.com/2019/07/decreasing-accuracy-in-neural-nets.html
(accuracy "became no better than a random guess" at 1/N and stuck there).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(32)

K = 10
protos = torch.randn(K, 50)
labels = torch.randint(0, K, (6000,))
images = protos[labels] + torch.randn(6000, 50)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(50, 128)
        self.fc2 = nn.Linear(128, 128)
        self.head = nn.Linear(128, K, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


net = Classifier()
optimizer = torch.optim.SGD(net.parameters(), lr=5e1)  # typo: meant 5e-2
print(f"ln(K) = {math.log(K):.4f}")
for epoch in range(4):
    perm = torch.randperm(6000)
    for i in range(0, 6000, 100):
        idx = perm[i:i + 100]
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if (epoch == 0 and i < 1000) or (i // 100) % 20 == 0:
            print(f"epoch {epoch} iter {i // 100:2d} loss {loss.item():.4f}")
    with torch.no_grad():
        hidden = F.relu(net.fc2(F.relu(net.fc1(images))))
        logits = net.head(hidden)
        acc = (logits.argmax(1) == labels).float().mean().item()
        full = F.cross_entropy(logits, labels).item()
        alive = (hidden > 0).any(0).float().mean().item()
    print(f"epoch {epoch} full-data loss {full:.4f} accuracy {acc:.3f} live units in layer 2 {alive:.2f}")
