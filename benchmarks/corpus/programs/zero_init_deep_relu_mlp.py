"""Faulty: a deep ReLU MLP whose init function sets every weight and bias to zero: the units stay symmetric (all zero) and it learns nothing but the class prior.

An init hook applied with model.apply() fills each nn.Linear's weight and bias with 0.
Every hidden pre-activation is then 0 for every input, ReLU outputs 0 and its
gradient at 0 is 0, so no hidden weight ever receives a gradient; only the output bias
moves, to the class frequencies. The loss goes to the entropy of the label prior
(about ln 6 = 1.79) and sits there; accuracy stays at the majority-class share; the
printed fraction of active hidden units is 0.000 and the hidden-weight gradient norm
is exactly 0 throughout. One-line fix: nn.init.kaiming_normal_(m.weight) instead of
zeros (checked with FIXED=1: loss and accuracy in the corpus entry).

Source: https://github.com/wagonhelm/NaNmnist/issues/2 ("initializing weights as
zeroes ... if every neuron in the network computes the same output, then they will also
all compute the same gradients ... there is no source of asymmetry") and
https://github.com/tensorflow/models/issues/1529 (weight_variable initialising weights
to zero instead of random).
"""
import os

import torch
import torch.nn as nn

torch.manual_seed(21)

K, D, N = 6, 20, 4800
proj = torch.randn(D, K)
X = torch.randn(N, D)
Y = (torch.relu(X @ proj) + 0.3 * torch.randn(N, K)).argmax(1)


def init_weights(m):
    if isinstance(m, nn.Linear):
        if os.environ.get("FIXED"):
            nn.init.kaiming_normal_(m.weight)
        else:
            nn.init.zeros_(m.weight)  # BUG: every unit identical (and here, dead)
        nn.init.zeros_(m.bias)


layers = []
width = D
for _ in range(5):
    layers += [nn.Linear(width, 128), nn.ReLU()]
    width = 128
model = nn.Sequential(*layers, nn.Linear(128, K))
model.apply(init_weights)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()
prior = torch.bincount(Y, minlength=K).float() / N
print(f"label prior entropy {-(prior * prior.log()).sum().item():.4f}  majority share {prior.max().item():.3f}")

step = 0
for epoch in range(10):
    perm = torch.randperm(N)
    for i in range(0, N, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), Y[idx])
        loss.backward()
        hidden_grad = torch.sqrt(sum((model[j].weight.grad ** 2).sum() for j in range(0, 10, 2))).item()
        optimizer.step()
        if step % 40 == 0:
            print(f"step {step:4d} loss {loss.item():.4f} hidden weight grad norm {hidden_grad:.3e}")
        step += 1
    with torch.no_grad():
        h = X
        active = []
        for j in range(0, 10, 2):
            h = model[j + 1](model[j](h))
            active.append((h > 0).float().mean().item())
        out = model(X)
        full = criterion(out, Y).item()
        acc = (out.argmax(1) == Y).float().mean().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f} active hidden units {sum(active) / len(active):.3f} lr 0.05")
