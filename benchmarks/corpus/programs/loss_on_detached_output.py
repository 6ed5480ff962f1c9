"""Faulty: the loss is computed on a detached copy of the model output, then forced to require grad.

The training step takes `logits = model(xb).detach()` (the output was detached so
it could also be kept for a running-metrics list), and backward() then failed with
"element 0 of tensors does not require grad and does not have a grad_fn"; the
error was silenced with `loss.requires_grad_(True)`, the workaround in the
threads cited below. backward() now runs, but the graph stops at the detached logits: no
parameter gets a gradient (every .grad stays None), Adam skips them all, and the
weights never move. The epoch loss is 1.5135 (the untrained network's level,
above ln 4 = 1.386) with accuracy 0.225 in all 8 epochs, on a task the model
learns in one epoch.

Fix (one line): drop the .detach() (the requires_grad_ line then does nothing and
can go). Checked: with that change the same script is at loss 0.728, accuracy
0.995 after epoch 0 and ends at loss 0.0099, accuracy 0.999.

Source: https://github.com/huggingface/torchMoji/issues/21 (loss "almost same" each
epoch after adding `loss = Variable(loss, requires_grad=True)` to silence the
error; the real cause was `outputs = outputs.data` in the model: removing it made
the loss improve) and https://github.com/ronghuaiyang/arcface-pytorch/issues/56
(`loss.requires_grad = True` added to silence the error: "the loss is not decline").
"""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(62)

K = 4
centers = torch.randn(K, 20) * 1.2
labels = torch.randint(0, K, (4000,))
feats = centers[labels] + torch.randn(4000, 20)
loader = DataLoader(TensorDataset(feats, labels), batch_size=64, shuffle=True)

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, K))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()
print(f"chance level ln(K) = {math.log(K):.4f}")

seen = []
for epoch in range(8):
    total, n = 0.0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        logits = model(xb).detach()  # BUG: cuts the graph
        seen.append(logits)
        loss = criterion(logits, yb)
        loss.requires_grad_(True)  # silences "element 0 of tensors does not require grad"
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
        n += len(yb)
    seen.clear()
    with torch.no_grad():
        acc = (model(feats).argmax(1) == labels).float().mean().item()
    grad_set = sum(p.grad is not None for p in model.parameters())
    print(f"epoch {epoch} loss {total / n:.4f} accuracy {acc:.3f} parameters with a gradient {grad_set}/{len(list(model.parameters()))}")
