"""Healthy: knowledge distillation of a small student from a teacher's temperature-softened outputs.

The teacher is a fixed, wider network that stands in for a trained model: its
argmax defines the 8 labels of the task, so it is right by construction, and its
logits are scaled so its ordinary softmax is confident (mean max-prob 0.84). The
student (one hidden layer of 32) is trained with Adam on the soft-target term
alone: KL(softmax(teacher / T) || softmax(student / T)) at temperature T = 8,
batch-mean. Hinton et al. multiply this term by T^2 to balance it against a
hard-label term; with no hard-label term and Adam (invariant to a constant loss
scale) the factor changes nothing but the printed number, and it is left out, as
many distillation codes do. At T = 8 both distributions are close to uniform, so
the loss is small from the start (0.22 before training, epoch-0 mean 0.18) and
falls to a few thousandths (about 0.004); the student's accuracy against the
teacher's labels on held-out inputs rises from 0.08 to about 0.91. Tiny, near-zero
loss values are what this objective produces, not a vanished signal
(Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
https://arxiv.org/abs/1503.02531; torch.nn.functional.kl_div with
log_target=False, reduction="batchmean").
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(9)

D, K, T = 12, 8, 8.0
teacher = nn.Sequential(nn.Linear(D, 256), nn.Tanh(), nn.Linear(256, K))
for p in teacher.parameters():
    p.requires_grad_(False)
with torch.no_grad():
    raw = teacher(torch.randn(4096, D))
    teacher[2].weight.mul_(6.0 / raw.std())
    teacher[2].bias.zero_()

x_train, x_test = torch.randn(4000, D), torch.randn(2000, D)
with torch.no_grad():
    t_train, t_test = teacher(x_train), teacher(x_test)
y_test = t_test.argmax(1)
loader = DataLoader(TensorDataset(x_train, t_train), batch_size=64, shuffle=True)

student = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, K))
opt = torch.optim.Adam(student.parameters(), lr=3e-3)


def kd_loss(s_logits, t_logits):
    return F.kl_div(F.log_softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1), reduction="batchmean")


with torch.no_grad():
    teacher_conf = F.softmax(t_test, 1).max(1).values.mean().item()
    print(f"teacher mean max-prob at T=1 {teacher_conf:.3f}; label counts {torch.bincount(y_test, minlength=K).tolist()}")
    s0 = student(x_test)
    print(f"before training: test kd {kd_loss(s0, t_test).item():.6f} test acc vs teacher {(s0.argmax(1) == y_test).float().mean().item():.3f}")
step = 0
for epoch in range(25):
    total = 0.0
    for xb, tb in loader:
        loss = kd_loss(student(xb), tb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        total += loss.item()
    with torch.no_grad():
        s_test = student(x_test)
        acc = (s_test.argmax(1) == y_test).float().mean().item()
        test_kd = kd_loss(s_test, t_test).item()
    print(f"epoch {epoch:2d} step {step:4d} kd loss {total / len(loader):.6f} (x T^2 = {total / len(loader) * T ** 2:.4f}) "
          f"test kd {test_kd:.6f} test acc vs teacher {acc:.3f}")
