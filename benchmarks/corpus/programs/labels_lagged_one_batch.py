"""Faulty: each batch is trained against the labels of the previous batch (shuffled DataLoader).

A loop that keeps `prev_y` to pair inputs with targets uses the wrong one: the targets are
one batch behind the inputs, so with shuffle=True every input is paired with an unrelated
label and the model can only learn the prior: training loss ~1.39 (ln 4 = 1.386), accuracy
at chance, every epoch. One-line fix: target = yb (`python labels_lagged_one_batch.py fix`),
checked: full-data loss 0.221, accuracy 0.925.

Source: https://github.com/JacksonBurns/chemeleon/pull/34 ("fix train label misalignment")
and https://github.com/FluxML/fluxml.github.io/pull/119 (labels of one set applied to other
data "naturally gave random accuracy results").
"""
import sys, math, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(63)
K = 4
FIX = len(sys.argv) > 1
X = torch.randn(4000, 16)
y = (X[:, :K] * 2 + 0.3 * torch.randn(4000, K)).argmax(1)
loader = DataLoader(TensorDataset(X, y), batch_size=50, shuffle=True)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, K))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
lf = nn.CrossEntropyLoss()
print(f"ln K = {math.log(K):.4f}")
for epoch in range(8):
    prev_y = None; tot = 0.0; n = 0
    for xb, yb in loader:
        target = yb if FIX else prev_y
        prev_y = yb
        if target is None: continue
        opt.zero_grad(); loss = lf(model(xb), target); loss.backward(); opt.step()
        tot += loss.item(); n += 1
    with torch.no_grad():
        out = model(X)
    print(f"epoch {epoch} train loss {tot / n:.4f} full-data loss {lf(out, y).item():.4f} accuracy {(out.argmax(1) == y).float().mean().item():.3f}")
