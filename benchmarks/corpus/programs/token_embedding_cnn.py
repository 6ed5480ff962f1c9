"""Healthy: a 1-D CNN text classifier over integer token ids via nn.Embedding.

Synthetic "reviews": sequences of 40 token ids from a 500-word vocabulary, where
a handful of sentiment words (ids 1-20 positive, 21-40 negative) decide the
label and id 0 is padding. The inputs are integer ids looked up in an embedding
table, not float features; the model trains normally.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(18)

VOCAB, SEQ, N = 500, 40, 3000


def make_reviews(n):
    ids = torch.randint(41, VOCAB, (n, SEQ))
    labels = torch.randint(0, 2, (n,))
    for i in range(n):
        k = int(torch.randint(2, 5, ()).item())
        pos = torch.randperm(SEQ)[:k]
        lo = 1 if labels[i] == 1 else 21
        ids[i, pos] = torch.randint(lo, lo + 20, (k,))
        ids[i, SEQ - int(torch.randint(0, 10, ()).item()):] = 0  # padding at the end
    return ids, labels


class TextCNN(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, 64, kernel_size=3, padding=1)
        self.fc = nn.Linear(64, 2)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)
        h = F.relu(self.conv(h)).max(dim=2).values
        return self.fc(h)


ids, labels = make_reviews(N)
train = DataLoader(TensorDataset(ids[:2500], labels[:2500]), batch_size=32, shuffle=True)
val_ids, val_labels = ids[2500:], labels[2500:]

model = TextCNN()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
for epoch in range(5):
    model.train()
    tot = 0.0
    for xb, yb in train:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tot += loss.item()
    model.eval()
    with torch.no_grad():
        logits = model(val_ids)
        val_loss = F.cross_entropy(logits, val_labels).item()
        acc = (logits.argmax(1) == val_labels).float().mean().item()
    print(f"epoch {epoch} train_loss {tot / len(train):.4f} val_loss {val_loss:.4f} val_acc {acc:.3f}")
