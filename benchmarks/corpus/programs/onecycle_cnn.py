"""Healthy: a small CNN on synthetic 16x16 "shape" images, trained with OneCycleLR.

The one-cycle policy warms the learning rate up from max_lr/25 to max_lr over
the first 30% of steps and anneals it to ~0 afterwards; the loss is noisy and
may bump up during the warm-up, then falls steadily in the annealing phase
(https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.OneCycleLR.html,
Smith & Topin, "Super-Convergence", https://arxiv.org/abs/1708.07120).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(1)


def make_images(n):
    """Class 0: horizontal bar, 1: vertical bar, 2: square outline, placed at random, plus noise."""
    imgs = torch.randn(n, 1, 16, 16) * 0.3
    labels = torch.randint(0, 3, (n,))
    for i in range(n):
        r, c = torch.randint(2, 10, (2,)).tolist()
        if labels[i] == 0:
            imgs[i, 0, r, c:c + 6] += 1.0
        elif labels[i] == 1:
            imgs[i, 0, r:r + 6, c] += 1.0
        else:
            imgs[i, 0, r, c:c + 5] += 1.0
            imgs[i, 0, r + 4, c:c + 5] += 1.0
            imgs[i, 0, r:r + 5, c] += 1.0
            imgs[i, 0, r:r + 5, c + 4] += 1.0
    return imgs, labels


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


train_x, train_y = make_images(1200)
loader = DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True)

model = SmallCNN()
epochs = 6
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=epochs, steps_per_epoch=len(loader))

for epoch in range(epochs):
    model.train()
    running, correct, seen = 0.0, 0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item() * len(xb)
        correct += (logits.argmax(1) == yb).sum().item()
        seen += len(xb)
    print(f"epoch {epoch} lr {scheduler.get_last_lr()[0]:.4f} train_loss {running / seen:.4f} train_acc {correct / seen:.3f}")
