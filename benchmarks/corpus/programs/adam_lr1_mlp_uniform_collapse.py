"""Faulty: an MLP classifier trained with Adam at lr=1.0 (a value meant for SGD/Adadelta): it collapses to the uniform prediction.

6 balanced, overlapping classes of 20-dimensional tabular data, a 3-layer ReLU MLP,
torch.optim.Adam(lr=1.0). Adam's first steps move every weight by about lr =
1.0 regardless of the gradient's size, so within a few steps the hidden
activations blow up, the ReLU layers go dead and the output stops depending
on the input; what is left is the output bias, which Adam keeps knocking
around the class prior. The loss jumps from ln 6 = 1.79 to tens, then comes
back to and stays at ~1.79, the uniform-prediction level, with accuracy near
chance (1/6), for the rest of the run.

Fix (one line): Adam(model.parameters(), lr=1e-3). Checked: with lr=1e-3 the loss is 0.482 (accuracy 0.833) after
epoch 0 and ends at 0.381, accuracy 0.858.

Source: https://github.com/rajveermalviya/language-modeling/issues/3 ("the loss
during training didn't really went down even after many epochs ... because you
use learning rate of 1.0 in the config file. After I use Adam optimizer with its
default learning rate (which is 0.001), the training get much better") and
https://github.com/keras-team/keras/issues/4066 (a classifier that "only predicts
a single class and accuracy fixes at 0.1", loss stuck at 2.304 = ln 10, fixed by
Adam at its default lr 0.001).
"""
import math

import torch
from torch import nn

torch.manual_seed(307)

K, D, N = 6, 20, 4800
centers = 0.5 * torch.randn(K, D)
labels = torch.randint(0, K, (N,))
feats = centers[labels] + 1.0 * torch.randn(N, D)

model = nn.Sequential(
    nn.Linear(D, 128), nn.ReLU(),
    nn.Linear(128, 128), nn.ReLU(),
    nn.Linear(128, K),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1.0)  # BUG: lr for SGD, not Adam
criterion = nn.CrossEntropyLoss()
print(f"uniform-prediction loss ln {K} = {math.log(K):.4f}")

step = 0
for epoch in range(8):
    perm = torch.randperm(N)
    for i in range(0, N, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(feats[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        if step < 10 or step % 25 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(feats)
        acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} loss {criterion(out, labels).item():.4f} accuracy {acc:.3f}")
