"""Faulty: a 12-layer sigmoid MLP trained with SGD: the gradient vanishes before it reaches the early layers.

Each sigmoid multiplies the backpropagated gradient by at most 0.25, so after 12
layers the first layer's gradient is several orders of magnitude smaller than the
last layer's (about 1e-9 of it here). The early layers never move; the network
stays near its initial function and the loss sits at ln 2 (the class prior of a
balanced binary task) with chance accuracy for the whole run, on a linearly
separable task that the same sigmoid net with 2 hidden layers learns to 96% in
the same 10 epochs.

Source: https://github.com/microsoft/CNTK/issues/476 (a deep sigmoid DNN: adding a
hidden layer made "the training stuck at the beginning. The training error don't
descend at all") and the vanishing-gradient discussion in d2l's
"Numerical Stability and Initialization" (https://github.com/dsgiitr/d2l-pytorch/pull/11).
"""
import torch
import torch.nn as nn

torch.manual_seed(35)

X = torch.randn(3000, 20)
y = (X[:, 0] + 0.5 * X[:, 1] - X[:, 2] > 0).long()

layers = [nn.Linear(20, 64), nn.Sigmoid()]
for _ in range(10):
    layers += [nn.Linear(64, 64), nn.Sigmoid()]
layers += [nn.Linear(64, 2)]
model = nn.Sequential(*layers)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
linears = [m for m in model if isinstance(m, nn.Linear)]

for epoch in range(10):
    perm = torch.randperm(3000)
    for i in range(0, 3000, 50):
        idx = perm[i:i + 50]
        opt.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    first = linears[0].weight.grad.norm().item()
    last = linears[-1].weight.grad.norm().item()
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch} loss {loss.item():.4f} acc {acc:.3f} grad norm first layer {first:.2e} last layer {last:.2e} ratio {first / last:.1e}")
