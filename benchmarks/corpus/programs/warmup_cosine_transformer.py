"""Healthy: a tiny Transformer encoder on a sequence task with linear warm-up + cosine decay.

The task: for a sequence of 12 digits, predict at every position whether the digit
there appeared earlier in the sequence. A 2-layer TransformerEncoder (d_model 32)
trained with AdamW; the lr ramps up linearly for 40 steps then follows a cosine
to zero (LambdaLR), the usual Transformer recipe. The loss drops during warm-up,
wobbles near the peak lr, and converges in the decay.
"""
import math

import torch
import torch.nn as nn

torch.manual_seed(20)

SEQ, VOCAB = 12, 10


def batch(n):
    x = torch.randint(0, VOCAB, (n, SEQ))
    seen = torch.zeros(n, SEQ)
    for t in range(1, SEQ):
        seen[:, t] = (x[:, :t] == x[:, t:t + 1]).any(1).float()
    return x, seen


class Model(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d, 1)
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), float("-inf")), diagonal=1))

    def forward(self, x):
        h = self.enc(self.tok(x) + self.pos, mask=self.mask)
        return self.head(h).squeeze(-1)


model = Model()
total_steps, warmup = 260, 40
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def lr_lambda(step):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
bce = nn.BCEWithLogitsLoss()
for step in range(total_steps):
    x, y = batch(64)
    loss = bce(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 20 == 0 or step == total_steps - 1:
        with torch.no_grad():
            xv, yv = batch(512)
            acc = ((model(xv) > 0).float() == yv).float().mean().item()
        print(f"step {step:3d} lr {sched.get_last_lr()[0]:.5f} loss {loss.item():.4f} val_acc {acc:.3f}")
