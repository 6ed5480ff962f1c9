"""Faulty: SGD with lr=0.3 and momentum 0.9 kills every ReLU of a regression MLP; the net outputs a constant.

The first few momentum-amplified updates push the pre-activations of the second
hidden layer negative for every input. A dead ReLU passes no gradient, so those
units never come back; with all 64 dead, the output is just the last bias, the
model predicts one number for every input, and the loss sits at the variance of
the standardised target (~1.0) for the rest of the run. At lr=0.01 the same
model fits the data to a loss of a few hundredths.

Source: https://discuss.pytorch.org/t/cross-entropy-loss-is-not-decreasing/43814/16
(after a too-large learning rate the parameters "are almost all negative, and
their derivatives are all zero!" - "negative parameters and ReLU activation";
solution: a smaller learning rate) and
https://deeplearning.jonwalls.dev/common-problems/gradient-flow/dying-relu
("A single large gradient update can push the bias far enough negative that the
neuron falls off a cliff into permanent zero territory").
"""
import torch
import torch.nn as nn

torch.manual_seed(45)

X = torch.randn(4000, 8)
y = torch.sin(X[:, :1]) + 0.5 * X[:, 1:2] ** 2 + 0.3 * X[:, 2:3]
y = (y - y.mean()) / y.std()

model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
criterion = nn.MSELoss()

for epoch in range(8):
    perm = torch.randperm(4000)
    for i in range(0, 4000, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        if epoch == 0 and i < 500:
            print(f"epoch 0 batch {i // 50} loss {loss.item():.4f}")
    with torch.no_grad():
        h2 = torch.relu(model[2](torch.relu(model[0](X))))
        dead = (h2.max(0).values <= 0).float().mean().item()
        full = criterion(model(X), y).item()
        spread = model(X).std().item()
    print(f"epoch {epoch} loss {full:.4f} (target var {y.var().item():.3f}) dead units in layer 2 {dead:.2f} output std {spread:.4f}")
