"""Faulty: the labels are read from the wrong column, a constant one, so every target is class 0.

The label is meant to be the last-but-one column of the table, but the loader
takes the last one, a schema-version column that is 0 on every row. The
classifier only has to learn "always say 0": within one epoch the cross-entropy
is ~3e-4 and it creeps towards 0 for the rest of the run (9e-5 at the end), which
looks like a spectacular success; the held-out accuracy against the real labels
is at chance (0.26 for 4 classes) all along.

Source: https://github.com/bermanmaxim/AOWS/issues/1 (loss dropping to 0.0 within
2 epochs: "Solved. Target was all zero hence it failed training") and
https://github.com/jiangqy/Customized-DataLoader-pytorch/issues/1 (a customised
data loader whose loss "starts out with 0.000").
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

torch.manual_seed(46)

N, D, K = 3000, 16, 4
feats = torch.randn(N, D)
true_label = (feats[:, :K] + 0.3 * torch.randn(N, K)).argmax(1)
schema_version = torch.zeros(N)
table = torch.cat([feats, true_label.unsqueeze(1).float(), schema_version.unsqueeze(1)], 1)


class TableDataset(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return row[:D], row[-1].long()  # BUG: should be row[-2] (the label column)


loader = DataLoader(TableDataset(table[:2500]), batch_size=50, shuffle=True)
model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, K))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
criterion = nn.CrossEntropyLoss()

for epoch in range(6):
    for b, (x, target) in enumerate(loader):
        opt.zero_grad()
        loss = criterion(model(x), target)
        loss.backward()
        opt.step()
        if b % 10 == 0:
            print(f"epoch {epoch} batch {b:2d} loss {loss.item():.6f}")
    with torch.no_grad():
        acc = (model(table[2500:, :D]).argmax(1) == true_label[2500:]).float().mean().item()
    print(f"epoch {epoch} held-out accuracy against the real labels {acc:.3f} (chance {1 / K:.2f})")
