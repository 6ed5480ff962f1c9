"""Faulty: a bag-of-words topic classifier trained with MSELoss on the integer topic index.

8 topics with no order between them (topic 2 is no closer to topic 3 than to
topic 7), documents of 16 words: words from the document's topic vocabulary,
words from one fixed "related" topic far away in index (0<->4, 1<->5, 2<->6,
3<->7, sharing themes), and common words. An EmbeddingBag + MLP emits one number
and nn.MSELoss regresses it on float(label), i.e. the task is treated as
ordinal regression by mistake. For a document that mixes topics 1 and 5 the
squared error is lowest at 3, a topic it has nothing to do with, so the loss
settles on a plateau well above 0 and the rounded prediction is right less
often than chance (1/8), while the same network with 8 logits and
cross-entropy separates the topics.

Fix (one line): an 8-way output layer with nn.CrossEntropyLoss on the long
labels (argmax to predict). Checked: with 8 logits and cross-entropy the same script ends at
loss 0.540, accuracy 0.720.

Source: https://github.com/FluxML/Flux.jl/issues/1546 ("the loss does not
decrease" with a classifier trained with mse; the maintainer: "You're using a
softmax output with a MSE loss which is an unusual combination") and
https://sebastiandev.com/sme-as-loss-function ("Why you should never use MSE as a
loss function for NN classification problems": the squared difference between
labels "is not meaningful").
"""
import torch
from torch import nn

torch.manual_seed(303)

K, PER, COMMON, N, W = 8, 12, 40, 4000, 16
V = K * PER + COMMON
labels = torch.randint(0, K, (N,))
related = (labels + K // 2) % K
docs = torch.empty(N, W, dtype=torch.long)
for i in range(N):
    kind = torch.multinomial(torch.tensor([0.40, 0.30, 0.30]), W, replacement=True)
    own = labels[i] * PER + torch.randint(0, PER, (W,))
    rel = related[i] * PER + torch.randint(0, PER, (W,))
    com = K * PER + torch.randint(0, COMMON, (W,))
    docs[i] = torch.where(kind == 0, own, torch.where(kind == 1, rel, com))


class BagModel(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.emb = nn.EmbeddingBag(V, 32, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, out))

    def forward(self, x):
        return self.mlp(self.emb(x))


model = BagModel(1)
criterion = nn.MSELoss()  # BUG: the topics are categories, not an ordered quantity
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)


def predict(out):
    return out.squeeze(1).round().clamp(0, K - 1).long()


step = 0
for epoch in range(12):
    perm = torch.randperm(N)
    for i in range(0, N, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(docs[idx]).squeeze(1), labels[idx].float())
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(docs)
        full = criterion(out.squeeze(1), labels.float()).item()
        acc = (predict(out) == labels).float().mean().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f}")
