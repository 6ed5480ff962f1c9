"""Faulty: SGD with lr=1e-5 on a problem that needs ~1e-2: the loss barely moves in the whole run.

An MLP classifier trained for 8 epochs with SGD (momentum 0.9) at lr=1e-5. Every
update is a few millionths of the weights' size; the loss goes from 1.6137 to
1.6114 (ln 5 = 1.609 is the chance level for 5 classes) and accuracy stays at
0.21, far from converged: the same script at lr=1e-2 is at 0.35 after 2 epochs.

Source: https://github.com/OpenLMLab/LOMO/issues/50 ("training with a small learning
rate 5e-5 ... the loss does not decrease" - answer: the learning rate is too small,
try 1e-2 / 1e-3) and https://github.com/isp1tze/MAProj/issues/3 ("The learning rate
for actor and critic is too small, it takes a very long time to converge").
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(51)

K = 5
W = torch.randn(32, K)
X = torch.randn(5000, 32)
Y = (X @ W + 0.5 * torch.randn(5000, K)).argmax(1)

net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, K))
opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9)
ce = nn.CrossEntropyLoss()
print(f"chance level ln(K) = {math.log(K):.4f}")

for epoch in range(8):
    perm = torch.randperm(5000)
    for i in range(0, 5000, 50):
        idx = perm[i:i + 50]
        opt.zero_grad()
        loss = ce(net(X[idx]), Y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(X)
        print(f"epoch {epoch} loss {ce(out, Y).item():.5f} acc {(out.argmax(1) == Y).float().mean().item():.3f}")
