"""Faulty: a freezing loop meant for the backbone sets requires_grad=False on every parameter (head included); nothing trains.

Fine-tuning setup: a backbone pre-trained in the script on a related task, then a new
head for the 5-class target task. The freezing loop runs over model.parameters()
instead of model.backbone.parameters(), so the head is frozen too. loss.backward() then
raises "element 0 of tensors does not require grad and does not have a grad_fn", and
the code carries the common "fix" for that error, loss.requires_grad_(True), which
silences it: backward reaches no parameter, every .grad stays None, the optimizer
(still given model.parameters()) steps nothing. The loss stays at its initial value and
accuracy at its initial (chance) level for the whole run; the printed weight change
is 0. One-line fix: loop over model.backbone.parameters() (checked with FIXED=1: the
head trains; numbers in the corpus entry).

Source: https://github.com/cfzd/Ultra-Fast-Lane-Detection/issues/282 (`for param in
model.parameters(): param.requires_grad = False` to freeze the loaded part, then the
RuntimeError; fixed by freezing only net.model) and
https://github.com/ronghuaiyang/arcface-pytorch/issues/56 (added `loss.requires_grad =
True` to silence the error: "the loss is not decline, and the acc is always zero"; same
in https://github.com/MCC-WH/Token/issues/12).
"""
import os

import torch
import torch.nn as nn

torch.manual_seed(31)

D, N = 16, 3000
mix = torch.randn(D, 8)
X = torch.randn(N, D)
Z = torch.tanh(X @ mix)
Y_pre = (Z[:, :4]).argmax(1)            # pre-training task: 4 classes
Y = (Z[:, 2:7] + 0.2 * torch.randn(N, 5)).argmax(1)  # target task: 5 classes, shares features


class Net(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, n_out)

    def forward(self, x):
        return self.head(self.backbone(x))


criterion = nn.CrossEntropyLoss()
model = Net(4)
pre_opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for step in range(300):
    idx = torch.randint(0, N, (64,))
    pre_opt.zero_grad()
    criterion(model(X[idx]), Y_pre[idx]).backward()
    pre_opt.step()
with torch.no_grad():
    print(f"pre-training done: pretext accuracy {(model(X).argmax(1) == Y_pre).float().mean().item():.3f}")

model.head = nn.Linear(64, 5)  # new head for the target task
frozen = model.backbone.parameters() if os.environ.get("FIXED") else model.parameters()
for p in frozen:  # BUG: meant model.backbone.parameters(); freezes the head too
    p.requires_grad = False
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"trainable parameters {n_train} of {sum(p.numel() for p in model.parameters())}")
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
start = [p.detach().clone() for p in model.parameters()]

step = 0
for epoch in range(8):
    perm = torch.randperm(N)
    for i in range(0, N, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(X[idx]), Y[idx])
        if not loss.requires_grad:
            loss.requires_grad_(True)  # the usual "fix" for the RuntimeError; it hides the frozen model
        loss.backward()
        optimizer.step()
        if step % 30 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(X)
        change = sum((p - s).abs().sum() for p, s in zip(model.parameters(), start)).item()
        print(f"epoch {epoch} loss {criterion(out, Y).item():.4f} accuracy {(out.argmax(1) == Y).float().mean().item():.3f} "
              f"weight change {change:.4f} lr {optimizer.param_groups[0]['lr']}")
