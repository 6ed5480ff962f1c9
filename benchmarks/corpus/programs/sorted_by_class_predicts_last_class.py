"""Faulty: a 1-D CNN on class-sorted signal windows with DataLoader(shuffle=False): it ends up predicting the last class.

4 kinds of 64-sample signal windows (sine, square wave, sawtooth, and noise
bursts, with random frequency, phase and noise), stored the way they were
recorded: all class 0, then all class 1, ... . The DataLoader is built with
shuffle=False, so each epoch is 30 batches of class 0, 30 of class 1, 30 of
class 2 and 30 of class 3. Adam learns "the answer is the class in front of me"
within each block: the batch loss drops to ~0 inside a block and jumps when the
next class starts (every 30 steps), and every epoch ends after 30 batches of
class 3, so the model that comes out predicts class 3 for (almost) every
window: the printed prediction counts and accuracy (about 0.25) show it.

Fix (one line): DataLoader(..., shuffle=True). Checked: with shuffle=True the full-data loss is 0.436,
accuracy 0.909 after epoch 0 and ends at 0.072, accuracy 0.983, predicting all 4
classes.

Source: https://github.com/keras-team/keras/issues/6955 ("If your data is highly
correlated (every class in order for example) then you need to shuffle or your
training will be bad"; "if classes are in order the model will have a higher
accuracy for the last class it trains on") and
https://github.com/zalandoresearch/fashion-mnist/pull/5 (the files were sorted by
label; "if people forget to shuffle the data by themselves, then learning
algorithms may fail especially when using mini-batch").
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(304)

K, PER, T = 4, 960, 64
t = torch.arange(T).float()
signals, labels = [], []
for k in range(K):  # recorded class by class
    freq = 0.05 + 0.15 * torch.rand(PER, 1)
    phase = 6.283 * torch.rand(PER, 1)
    arg = 6.283 * freq * t + phase
    if k == 0:
        x = torch.sin(arg)
    elif k == 1:
        x = torch.sign(torch.sin(arg))
    elif k == 2:
        x = 2 * torch.remainder(arg / 6.283, 1.0) - 1
    else:
        x = torch.randn(PER, T) * (torch.rand(PER, 1) + 0.3)
    signals.append(x + 0.3 * torch.randn(PER, T))
    labels.append(torch.full((PER,), k))
signals = torch.cat(signals).unsqueeze(1)
labels = torch.cat(labels)
loader = DataLoader(TensorDataset(signals, labels), batch_size=32, shuffle=False)  # BUG: never shuffled

model = nn.Sequential(
    nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
    nn.Flatten(), nn.Linear(32, K),
)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(4):
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            print(f"step {step:3d} batch classes {sorted(set(yb.tolist()))} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(signals)
        pred = out.argmax(1)
        acc = (pred == labels).float().mean().item()
        counts = torch.bincount(pred, minlength=K).tolist()
    print(f"epoch {epoch} full-data loss {criterion(out, labels).item():.4f} accuracy {acc:.3f} "
          f"predicted-class counts {counts}")
