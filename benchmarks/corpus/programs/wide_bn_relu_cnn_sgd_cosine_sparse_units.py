"""Healthy: a BatchNorm + ReLU CNN with a wide ReLU layer (SGD, momentum, cosine lr) where many units go inactive.

Two conv + BatchNorm + ReLU blocks feed a deliberately wide 512-unit ReLU layer for an
easy 4-class task (a blob in one quadrant of a noisy 12x12 image). SGD lr 0.1,
momentum 0.9, weight decay 5e-4, CosineAnnealingLR to 0 over 240 steps. Half of
the wide layer's units are dead at initialisation (its inputs are non-negative
pooled ReLU features) and about a quarter of them (0.23-0.25) stay dead -- zero on
every test image -- for the whole run, while half of all activations in every ReLU
layer are zero (0.48-0.56). The model still fits: training loss 0.81 -> 0.002,
test accuracy 0.94 after epoch 0 and 1.000 from epoch 2 on. A wide network does
not need all its units; inactive ReLU units in an over-parameterised net that fits
well are not a fault (Glorot et al., "Deep Sparse Rectifier Neural Networks",
AISTATS 2011; Mehta et al., "On Implicit Filter Level Sparsity in Convolutional
Neural Networks", https://arxiv.org/abs/1811.12495; torch.optim.lr_scheduler.CosineAnnealingLR).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(35)

SIZE = 12
K = 4


def make(n):
    """Four classes of 12x12 images: a bright blob in one of the four quadrants, plus noise."""
    y = torch.randint(0, K, (n,))
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    cy = (y // 2).float() * 6 + 1.5 + torch.rand(n) * 3
    cx = (y % 2).float() * 6 + 1.5 + torch.rand(n) * 3
    img = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 4.0)
    return (img + 0.2 * torch.randn_like(img)).unsqueeze(1), y


train_x, train_y = make(1536)
test_x, test_y = make(1000)


class WideNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 512)  # deliberately wide for a 4-class task
        self.head = nn.Linear(512, K)

    def forward(self, x, record=None):
        h1 = F.relu(self.b1(self.c1(x)))
        h2 = F.relu(self.b2(self.c2(F.max_pool2d(h1, 2))))
        h3 = F.relu(self.fc(h2.mean((2, 3))))
        if record is not None:
            record += [h1, h2, h3[:, :, None, None]]
        return self.head(h3)


net = WideNet()
EPOCHS, BATCH = 10, 64
steps = EPOCHS * (len(train_x) // BATCH)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def activity():
    """Per ReLU layer: fraction of units zero on every test (image, position), and fraction of zero activations."""
    net.eval()
    acts = []
    with torch.no_grad():
        net(test_x, record=acts)
    net.train()
    return [((a == 0).all(3).all(2).all(0).float().mean().item(), (a == 0).float().mean().item()) for a in acts]


def describe(stats):
    return " | ".join(f"{name}: dead units {d:.2f}, zero activations {z:.2f}"
                      for name, (d, z) in zip(("conv1", "conv2", "fc512"), stats))


print(f"before training: {describe(activity())}")
step = 0
for epoch in range(EPOCHS):
    order = torch.randperm(len(train_x))
    total = 0.0
    for b in range(len(train_x) // BATCH):
        idx = order[b * BATCH:(b + 1) * BATCH]
        loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        total += loss.item()
    net.eval()
    with torch.no_grad():
        test_acc = (net(test_x).argmax(1) == test_y).float().mean().item()
    net.train()
    print(f"epoch {epoch} step {step} lr {opt.param_groups[0]['lr']:.4f} train loss {total / (len(train_x) // BATCH):.4f} "
          f"test acc {test_acc:.3f} || {describe(activity())}")
