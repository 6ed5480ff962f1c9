"""Healthy: pretrain an MLP on a source task, then fine-tune it on a related task with a small lr.

Stage 1 trains the whole network on task A (lr 1e-3). Stage 2 swaps the head for
task B (the same inputs, a rotated labelling rule), keeps the backbone, and
fine-tunes everything with AdamW at lr 2e-5 for the backbone and 2e-4 for the
new head, as fine-tuning recipes do. Updates are small relative to the pretrained
weights by design; the fine-tuning loss still falls steadily and accuracy on B
rises well above chance.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(11)

D, K = 20, 5
proj_a = torch.randn(D, K)
rot = torch.linalg.qr(torch.randn(K, K))[0]
proj_b = proj_a @ rot + 0.3 * torch.randn(D, K)


def task(n, proj):
    x = torch.randn(n, D)
    return x, (x @ proj + 0.2 * torch.randn(n, K)).argmax(1)


backbone = nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
head_a = nn.Linear(128, K)

xa, ya = task(4000, proj_a)
opt = torch.optim.Adam(list(backbone.parameters()) + list(head_a.parameters()), lr=1e-3)
for epoch in range(4):
    for i in range(0, len(xa), 64):
        loss = F.cross_entropy(head_a(backbone(xa[i:i + 64])), ya[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pretrain epoch {epoch} loss {loss.item():.4f}")

# ---- fine-tuning on task B ----
head_b = nn.Linear(128, K)
xb, yb = task(1500, proj_b)
xb_val, yb_val = task(500, proj_b)
ft_opt = torch.optim.AdamW([
    {"params": backbone.parameters(), "lr": 2e-5},
    {"params": head_b.parameters(), "lr": 2e-4},
], weight_decay=0.01)
for epoch in range(12):
    running = 0.0
    for i in range(0, len(xb), 32):
        loss = F.cross_entropy(head_b(backbone(xb[i:i + 32])), yb[i:i + 32])
        ft_opt.zero_grad()
        loss.backward()
        ft_opt.step()
        running += loss.item()
    with torch.no_grad():
        val_logits = head_b(backbone(xb_val))
        val_loss = F.cross_entropy(val_logits, yb_val).item()
        val_acc = (val_logits.argmax(1) == yb_val).float().mean().item()
    print(f"finetune epoch {epoch:2d} train_loss {running / (len(xb) // 32 + 1):.4f} val_loss {val_loss:.4f} val_acc {val_acc:.3f} (chance {1 / K:.2f})")
