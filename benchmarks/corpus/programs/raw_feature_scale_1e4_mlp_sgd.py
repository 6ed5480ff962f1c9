"""Faulty: tabular features on wildly different scales (one ~1e4, the rest ~1) fed raw to an MLP trained with SGD.

A loan-default style binary task with 6 features: annual income in dollars/10
(mean ~5e3, std ~2e3, up to ~1.5e4) next to five unit-scale features (ratios,
z-scored counts). The label depends on all of them, income included. The
features go into a 2-layer ReLU MLP unscaled; SGD lr 0.01 with momentum,
BCEWithLogitsLoss. The income column makes the first layer's pre-activations
and its weight gradients thousands of times larger than the others': the first
updates throw the first-layer weights far off, the loss jumps to huge values
for a few steps, every first-layer ReLU unit dies, and from then on the loss
sits at the constant-prediction level (ln 2 = 0.693 for balanced classes) with
chance accuracy: the unit-scale features are never learned.

Fix (one line): standardise the features, feats = (feats - feats.mean(0)) /
feats.std(0) (what sklearn's StandardScaler does). Checked: with standardised features the loss is 0.406 (accuracy
0.851) after epoch 0 and ends at 0.182, accuracy 0.920, all units live.

Source: https://github.com/alexeygrigorev/libffm-python/issues/5 (SGD-trained model
predicts nan once one field's values are large; "you should standardize the
numerical fields before putting them into any SGD-based algorithm ... e.g.
StandardScaler") and https://github.com/keras-team/keras/issues/18919 (loss NaN
with SGD but not with adaptive optimizers: "SGD can't deal with big input numbers").
"""
import torch
from torch import nn

torch.manual_seed(309)

N = 4000
income = (5000 + 2000 * torch.randn(N)).clamp(500, 15000)  # dollars / 10
others = torch.randn(N, 5)
score = (1.2 * others[:, 0] - 1.0 * others[:, 1] + 0.8 * others[:, 2] * others[:, 3]
         - 0.9 * (income - 5000) / 2000)
labels = (score + 0.5 * torch.randn(N) > 0).float()
feats = torch.cat([income.unsqueeze(1), others], 1)  # BUG: no feature scaling
print("feature means " + " ".join(f"{m:.3g}" for m in feats.mean(0).tolist()))
print("feature stds  " + " ".join(f"{s:.3g}" for s in feats.std(0).tolist()))
print(f"positive share {labels.mean().item():.3f}")

model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
criterion = nn.BCEWithLogitsLoss()

step = 0
for epoch in range(10):
    perm = torch.randperm(N)
    for i in range(0, N, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(feats[idx]).squeeze(1), labels[idx])
        loss.backward()
        optimizer.step()
        if step < 8 or step % 40 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        logits = model(feats).squeeze(1)
        full = criterion(logits, labels).item()
        acc = ((logits > 0).float() == labels).float().mean().item()
        hidden = model[1](model[0](feats))
        live = (hidden > 0).any(0).float().mean().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f} live first-layer units {live:.2f}")
