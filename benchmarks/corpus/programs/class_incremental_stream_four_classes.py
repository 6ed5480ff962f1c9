"""Healthy: class-incremental training -- classes {2, 3} join the data stream mid-run.

One 10-64-64-4 ReLU MLP with a 4-way head and one Adam(lr 1e-3) optimizer sees a
data stream of batches of 32: for the first 300 steps only classes 0 and 1 occur,
from step 301 on all four classes do (classes 2 and 3 join; the old classes stay in
the stream, as in class-incremental learning with rehearsal). In phase 1 the loss
falls from ln 4 toward 0.002-0.14 and the gradient norm to 0.01-0.45, with held-out
accuracy 0.99 on {0, 1} and 0.00 on {2, 3} (never seen). When the new classes
arrive, the loss jumps to about 5 (the head has learned to push logits 2 and 3 down)
and the gradient norm to about 6; both fall back within ~75 steps, and the final
held-out accuracy is 0.97 on all four classes (every class >= 0.95). The jump is
the data distribution changing, not instability (Rebuffi et al., "iCaRL:
Incremental Classifier and Representation Learning", CVPR 2017,
https://arxiv.org/abs/1611.07725; torch.optim.Adam).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(31)

DIM = 10
PHASE1_STEPS = 300
TOTAL_STEPS = 750
BATCH = 32
centres = 2.2 * torch.randn(4, DIM) / DIM ** 0.5 * 2


def sample(n, classes):
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,))]
    x = centres[y] + torch.randn(n, DIM) * 0.9
    x = torch.tanh(x) + 0.1 * x ** 2  # a mild nonlinearity so the MLP has something to do
    return x, y


test_x, test_y = sample(2000, [0, 1, 2, 3])
net = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)


def accuracies():
    """Held-out accuracy on {0, 1}, on {2, 3}, and on all four classes, from one forward pass."""
    with torch.no_grad():
        hit = (net(test_x).argmax(1) == test_y).float()
    old = test_y < 2
    return hit[old].mean().item(), hit[~old].mean().item(), hit.mean().item()


window = []
for step in range(1, TOTAL_STEPS + 1):
    classes = [0, 1] if step <= PHASE1_STEPS else [0, 1, 2, 3]
    if step == PHASE1_STEPS + 1:
        print(f"--- step {step}: classes 2 and 3 join the stream (same model, same 4-way head, same Adam) ---")
    xb, yb = sample(BATCH, classes)
    loss = F.cross_entropy(net(xb), yb)
    opt.zero_grad()
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())).item()
    opt.step()
    window.append(loss.item())
    if step % 25 == 0 or PHASE1_STEPS < step <= PHASE1_STEPS + 3:
        a01, a23, a_all = accuracies()
        print(f"step {step:4d} classes {classes} loss {loss.item():.4f} grad-norm {gnorm:.3f} "
              f"acc on {{0,1}} {a01:.3f} acc on {{2,3}} {a23:.3f} acc all {a_all:.3f}")
with torch.no_grad():
    pred = net(test_x).argmax(1)
print(f"final test accuracy: all 4 classes {(pred == test_y).float().mean().item():.3f}, per class "
      + ", ".join(f"{c}: {(pred[test_y == c] == c).float().mean().item():.3f}" for c in range(4)))
