"""Faulty: a 6-hidden-layer ReLU MLP whose weights are initialised from N(0, 1) instead of a fan-in-scaled init.

A custom init_weights() applied with model.apply() draws every Linear weight from
nn.init.normal_(w, 0.0, 1.0). With 128 inputs per unit, each layer multiplies the
activation scale by about sqrt(128 / 2) = 8 (the He/Kaiming std would be
sqrt(2 / 128) = 0.125): the activation std after the 7 Linear layers is 10, 78,
623, 5.0e3, 3.8e4, 3.3e5, 1.8e6 at init. The first cross-entropy loss is 2.4e6
with a gradient norm of 2.2e6; the first SGD step blows the weights up (loss
1.3e23, gradient norm inf at step 1) and from step 2 on every loss and gradient
is NaN, accuracy 0.125 (chance for 8 classes) after every epoch.

Fix (one line): draw the weights with nn.init.kaiming_normal_(m.weight,
nonlinearity="relu") (or drop the custom init and keep PyTorch's default).
Checked: with kaiming_normal_ the same script starts at loss 3.05 (gradient norm
13), is at full-data loss 2.2e-4 after epoch 0 and ends at 5.6e-5, accuracy 1.000.

Source: https://github.com/sophiajw/HistAuGAN/pull/4 (merged: "Because model weights
are initialised with relatively big numbers, training is crashing due to NaN error
(+- inf)": the init std 0.2 changed back to 0.02), https://github.com/facebookresearch/detectron2/issues/755
(a custom backbone without a proper init: "loss becomes infinite/NaN right at
iteration 0") and https://github.com/VinceShieh/spark-ffm/issues/12 ("Weight
Initialisation might be a cause for loss NaN": the pre-activation std grows with
the fan-in).
"""
import torch
from torch import nn

torch.manual_seed(66)

K = 8
centers = torch.randn(K, 32) * 1.5
labels = torch.randint(0, K, (4000,))
feats = centers[labels] + torch.randn(4000, 32)

layers = [nn.Linear(32, 128), nn.ReLU()]
for _ in range(5):
    layers += [nn.Linear(128, 128), nn.ReLU()]
layers += [nn.Linear(128, K)]
model = nn.Sequential(*layers)


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 1.0)  # BUG: std 1 regardless of fan-in
        nn.init.zeros_(m.bias)


model.apply(init_weights)
with torch.no_grad():
    h = feats[:256]
    scales = []
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            scales.append(h.std().item())
print("activation std after each Linear at init: " + ", ".join(f"{s:.3g}" for s in scales))

optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
criterion = nn.CrossEntropyLoss()
step = 0
for epoch in range(6):
    perm = torch.randperm(4000)
    for i in range(0, 4000, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(feats[idx]), labels[idx])
        loss.backward()
        gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
        optimizer.step()
        if step < 8 or step % 40 == 0:
            print(f"epoch {epoch} step {step:3d} loss {loss.item():.4g} grad norm {gnorm:.4g}")
        step += 1
    with torch.no_grad():
        out = model(feats)
        acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} full-data loss {criterion(out, labels).item():.4g} accuracy {acc:.3f}")
