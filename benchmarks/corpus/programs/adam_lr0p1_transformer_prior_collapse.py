"""Faulty: Adam with lr=0.1 on a 2-layer Transformer-encoder classifier collapses to the label prior.

5-class task (which token occurs most often in a 16-token sequence). At lr=0.1 Adam's
first updates (each ~0.1 per weight) wreck the attention/FFN weights; the loss sits at
~1.56 (ln 5 = 1.609; the majority-class rate 0.315 is the accuracy) for every epoch.
One-line fix: lr=1e-3 (`python adam_lr0p1_transformer_prior_collapse.py 0.001`), checked:
loss 0.176, accuracy 0.990 after 6 epochs.

Source: https://github.com/OpenNMT/OpenNMT-py/issues/805 (Adam with lr 1: "ppl stays a high
constant value"; fix lr 0.001) and https://github.com/rajveermalviya/language-modeling/issues/3
(Adam with lr 1.0: the loss "didn't really went down"; default 0.001 fixes it).
"""
import math, sys
import torch
import torch.nn as nn
torch.manual_seed(61)
K, SEQ, VOCAB = 5, 16, 12
LR = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
def make(n):
    x = torch.randint(0, VOCAB, (n, SEQ))
    counts = torch.stack([(x == k).sum(1) for k in range(K)], 1).float()
    y = (counts + 0.01 * torch.arange(K)).argmax(1)
    return x, y
Xtr, ytr = make(2000)
class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(VOCAB, 32)
        s.pos = nn.Parameter(torch.randn(SEQ, 32) * 0.02)
        s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        s.head = nn.Linear(32, K)
    def forward(s, x):
        return s.head(s.enc(s.emb(x) + s.pos).mean(1))
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=LR)
lf = nn.CrossEntropyLoss()
print(f"ln K = {math.log(K):.4f}, lr {LR}")
step = 0
for epoch in range(6):
    perm = torch.randperm(2000)
    for i in range(0, 2000, 64):
        idx = perm[i:i+64]
        opt.zero_grad()
        loss = lf(model(Xtr[idx]), ytr[idx])
        loss.backward(); opt.step()
        if step % 25 == 0 and step < 100: print(f"step {step} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(Xtr); l = lf(out, ytr).item(); acc = (out.argmax(1) == ytr).float().mean().item()
    print(f"epoch {epoch} loss {l:.4f} acc {acc:.3f}")
