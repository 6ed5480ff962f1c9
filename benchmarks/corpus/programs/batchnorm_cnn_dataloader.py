"""Healthy: a textbook CNN with BatchNorm trained through a Dataset/DataLoader, with eval each epoch.

A custom Dataset yields 1x12x12 images of very noisy oriented gratings (4 orientations);
the CNN uses Conv-BN-ReLU blocks, SGD with momentum and a StepLR schedule. Train
and validation losses both fall; nothing unusual.
"""
import math

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

torch.manual_seed(26)


class Gratings(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
        imgs = []
        for lab in self.labels.tolist():
            theta = lab * math.pi / 4
            phase = float(torch.rand((), generator=g)) * 2 * math.pi
            wave = torch.sin(0.9 * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
            imgs.append(wave + 2.0 * torch.randn(12, 12, generator=g))
        self.images = torch.stack(imgs).unsqueeze(1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


model = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 9, 4))
train_loader = DataLoader(Gratings(1600, 1), batch_size=64, shuffle=True)
val_loader = DataLoader(Gratings(400, 2), batch_size=200)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.3)
criterion = nn.CrossEntropyLoss()

for epoch in range(7):
    model.train()
    for images, labels in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
    scheduler.step()
    model.eval()
    val_loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in val_loader:
            out = model(images)
            val_loss += criterion(out, labels).item() * len(labels)
            correct += (out.argmax(1) == labels).sum().item()
    print(f"epoch {epoch} train_loss {loss.item():.4f} val_loss {val_loss / 400:.4f} val_acc {correct / 400:.3f}")
