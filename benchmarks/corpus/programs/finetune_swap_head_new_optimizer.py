"""Healthy: pretrain a 1-D CNN on task A, then swap in a fresh output layer and a NEW optimizer for task B.

Stage A trains a small 1-D CNN (two conv layers, a 256 -> 64 projection, and a
4-way head) on noisy waveforms to classify their shape (sine, square, triangle,
sawtooth) with SGD lr 0.05 momentum 0.9 for 300 steps: loss to 0.07-0.25, held-out
accuracy 0.97. At step 301 the head is replaced by a freshly initialised
Linear(64, 3) for task B (the waveform's frequency band), and a NEW optimizer (Adam
lr 1e-3, fresh moment estimates) is built over the whole model. The loss jumps to
ln 3-ish values (1.17-1.38 vs 0.17 just before) at the swap and falls to about 0.01
within 200 steps, with task-B held-out accuracy 0.35 -> 0.99. The jump is the new
head and the new task, as in any transfer-learning recipe
(https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html;
Yosinski et al., "How transferable are features in deep neural networks?",
https://arxiv.org/abs/1411.1792).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(37)

LENGTH = 64
t = torch.linspace(0, 1, LENGTH)


def signals(n):
    """Waveform shape (sine, square, triangle, sawtooth) and frequency band (low 2-4, mid 5-7, high 8-10 Hz)."""
    shape = torch.randint(0, 4, (n,))
    band = torch.randint(0, 3, (n,))
    freq = 2 + 3 * band.float() + 2 * torch.rand(n)
    phase = torch.rand(n, 1)
    cyc = (freq[:, None] * t[None] + phase) % 1.0
    waves = torch.stack([torch.sin(2 * math.pi * cyc), torch.sign(torch.sin(2 * math.pi * cyc)),
                         4 * (cyc - 0.5).abs() - 1, 2 * cyc - 1], 1)
    x = waves[torch.arange(n), shape] + 0.3 * torch.randn(n, LENGTH)
    return x.unsqueeze(1), shape, band


backbone = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(8),
                         nn.Flatten(), nn.Linear(256, 64), nn.ReLU())
head_a = nn.Linear(64, 4)
model = nn.Sequential(backbone, head_a)
test_x, test_shape, test_band = signals(1000)


def accuracy(target):
    with torch.no_grad():
        return (model(test_x).argmax(1) == target).float().mean().item()


step = 0
print("stage A: classify the waveform shape (4 classes), SGD lr 0.05 momentum 0.9")
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for i in range(300):
    x, shape, _ = signals(64)
    loss = F.cross_entropy(model(x), shape)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if step % 25 == 0:
        print(f"step {step:4d} task A loss {loss.item():.4f} test acc A {accuracy(test_shape):.3f}")

# Task B reuses the pretrained backbone: a fresh 3-way head for the frequency band and a new Adam optimizer.
model[1] = nn.Linear(64, 3)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
print(f"--- step {step + 1}: head swapped (fresh Linear(64, 3)), new optimizer Adam lr 1e-3; stage B: frequency band ---")
for i in range(300):
    x, _, band = signals(64)
    loss = F.cross_entropy(model(x), band)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if i < 3 or step % 25 == 0:
        print(f"step {step:4d} task B loss {loss.item():.4f} test acc B {accuracy(test_band):.3f}")
