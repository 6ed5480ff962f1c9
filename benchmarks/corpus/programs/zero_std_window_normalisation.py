"""Faulty: each 24-hour input window is standardised by its own std, and windows from a flat-lined sensor have std 0.

An hourly electricity-load series is turned into (24 hours -> next hour)
forecasting samples, and the Dataset standardises every window by its own mean
and std (per-instance normalisation, so the model sees shapes, not levels; the
target is scaled the same way). The logger flat-lined three times (it repeated
its last reading for 30 hours), so 24 of the 29,976 windows are constant: their
std is 0 and (x - mean) / std is 0 / 0 = NaN. Training runs normally (loss 0.92
at step 0, 0.20 at step 25, 0.15 at step 50) until the first batch that draws
one of them (step 75, one NaN window in the batch): that loss is NaN, the
gradients are NaN, Adam writes NaN into every weight, and every later loss is
NaN (both epochs' mean batch loss is nan).

Fix (one line): std = torch.where(std > 0, std, torch.ones_like(std)) (a constant
window is left centred, not divided). Checked: with it the same script's mean
batch loss is 0.186 in epoch 0 and 0.154 in epoch 1 (window-standardised units).

Source: https://github.com/mllam/neural-lam/issues/136 ("State standardization
causes NaN if field's std is 0": "the standardization returns a NaN field, due to
division by zero ... the predictions are as a consequence all NaN", e.g. rain
rates that are all 0 in a dry period; fixed in PR 189), https://github.com/fastai/fastai/issues/889
("Normalization for tabulardata produces nan for constant columns") and
https://github.com/ai2cm/fv3net/pull/639 (a StandardScaler "not equipped to handle
constant features (divide by zero standard deviation)": the std of constant
features set to 1).
"""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

torch.manual_seed(70)

H, WIN = 30000, 24
t = torch.arange(H, dtype=torch.float32)
load = 100 + 15 * torch.sin(2 * math.pi * t / 24) + 8 * torch.sin(2 * math.pi * t / 168) + 3 * torch.randn(H)
load = torch.round(load * 2) / 2  # the meter reports in steps of 0.5 kW
for start in (6100, 15400, 23800):  # logger faults: the last reading repeated for 30 hours
    load[start:start + 30] = load[start - 1]


class Windows(Dataset):
    def __len__(self):
        return H - WIN

    def __getitem__(self, i):
        x, y = load[i:i + WIN], load[i + WIN]
        mean, std = x.mean(), x.std()
        return (x - mean) / std, ((y - mean) / std).unsqueeze(0)  # BUG: std is 0 for a constant window


flat = sum(1 for i in range(H - WIN) if load[i:i + WIN].std() == 0)
print(f"windows: {H - WIN}, constant ones (std 0): {flat}")

loader = DataLoader(Windows(), batch_size=64, shuffle=True)
model = nn.Sequential(nn.Linear(WIN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.MSELoss()

step, first_nan = 0, None
for epoch in range(2):
    total, batches = 0.0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        bad = not math.isfinite(loss.item())
        if step % 25 == 0 or (bad and first_nan is None):
            nan_rows = torch.isnan(xb).any(1).sum().item()
            print(f"epoch {epoch} step {step:4d} loss {loss.item():.4f} windows with NaN in this batch {nan_rows}")
        if bad and first_nan is None:
            first_nan = step
        total += loss.item()
        batches += 1
        step += 1
    print(f"epoch {epoch} mean batch loss {total / batches:.4f}")
