"""Faulty: SGD with weight_decay=0.5 (meant 5e-4): the L2 pull pins every weight near zero and the network outputs a constant.

torch.optim.SGD's weight_decay adds wd * w to every parameter's gradient (biases
included). At 0.5 that pull is stronger than anything the data term can push
back with: the three weight matrices' norms are 0.02, 0.02, 0.006 after the
first epoch (100 steps) and 2e-18, 2e-18, 7e-19 after the eighth; the logits are
the same for every input (their spread over the inputs is 0 from epoch 1 on),
only the biases move, and the loss sits at 1.78-1.79 (ln 6 = 1.792: a
prediction that carries at most the class prior) with accuracy 0.19-0.20 for all
8 epochs. A network whose weights are all ~0 also has ~0 gradients through its
hidden layers, so it never climbs out.

Fix (one line): weight_decay=5e-4. Checked: with it the same script is at loss
0.274 after epoch 0 and ends at loss 0.157, accuracy 0.936 (weight norms 10, 7.2,
4.6).

Source: https://github.com/BVLC/caffe/issues/1396 (any input produced the same
output; "if the weight_decay is large (like 0.5), all the weight will eventually
becomes zero in my case", fixed by 0.0005), https://github.com/tinghuiz/SfMLearner/issues/34
("the weight decay you use seems very large ... When using it, my two networks
just go to zero very quickly") and https://github.com/fastai/fastai/issues/1806
(huge weight decay: "Try 1000, it will go nan in one epoch").
"""
import math

import torch
from torch import nn

torch.manual_seed(69)

K = 6
W = torch.randn(20, K)
X = torch.randn(5000, 20)
Y = (X @ W + 0.3 * torch.randn(5000, K)).argmax(1)

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, K))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.5)  # BUG: meant 5e-4
criterion = nn.CrossEntropyLoss()
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
        wnorm = math.sqrt(sum((p ** 2).sum().item() for p in model.parameters()))
        spread = out.std(0).mean().item()
        active = (model[:4](X) > 0).float().mean().item()
        lin_norms = ", ".join(f"{m.weight.norm().item():.2g}" for m in model if isinstance(m, nn.Linear))
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f} weight norm {wnorm:.4g} (per layer {lin_norms}) "
          f"logit spread over inputs {spread:.2e} active hidden units {active:.3f}")
