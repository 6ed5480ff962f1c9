"""Faulty: the optimizer is built over a first model instance; the model is then re-instantiated and that one is trained.

The script builds the model and its optimizer, then (to re-seed the weights "for
reproducibility" before training) runs `model = Net()` again. The optimizer still
holds the parameters of the first, discarded instance: PyTorch gives no warning.
backward() fills the .grad of the new model's parameters, but optimizer.step()
and optimizer.zero_grad() only touch the old ones, so the trained model's weights
never change (their distance from initialisation stays 0) and its gradients are
never cleared: they accumulate, so their norm grows linearly (18.5 after epoch
0, 147.9 after epoch 7). The loss stays at 1.6111 (ln 5 = 1.609) with accuracy
0.241 in all 8 epochs.

Fix (one line): build the optimizer after the last `model = Net()` (or drop the
second instantiation). Checked: with the optimizer created after it the same
script is at loss 0.604 after epoch 0 and ends at loss 0.089, accuracy 0.966.

Source: https://github.com/pytorch/pytorch/issues/14467 (a request, after a
refactoring of model classes, that the optimizer "spit out an error or at least a
warning" when "the parameters the optimizer knows about do not match the ones of
the model": today nothing does) and
https://github.com/microsoft/nni/issues/4521 (the model's layers were replaced
after the optimizer was built, "so the parameters registered in the optimizer are
outdated", and the parameters were not updated: "reinitializing a new optimizer"
fixed it).
"""
import math

import torch
from torch import nn

torch.manual_seed(63)

K = 5
W = torch.randn(24, K)
X = torch.randn(5000, 24)
Y = (X @ W + 0.3 * torch.randn(5000, K)).argmax(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, K)

    def forward(self, x):
        return self.head(self.body(x))


model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
criterion = nn.CrossEntropyLoss()

torch.manual_seed(0)
model = Net()  # BUG: re-instantiated after the optimizer was built over the first instance
start = [p.detach().clone() for p in model.parameters()]
print(f"chance level ln(K) = {math.log(K):.4f}")

for epoch in range(8):
    perm = torch.randperm(5000)
    for i in range(0, 5000, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), Y[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(X)
        full = criterion(out, Y).item()
        acc = (out.argmax(1) == Y).float().mean().item()
        moved = math.sqrt(sum(((p - s) ** 2).sum().item() for p, s in zip(model.parameters(), start)))
        gnorm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters()))
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f} weight change from init {moved:.4f} grad norm {gnorm:.2f}")
