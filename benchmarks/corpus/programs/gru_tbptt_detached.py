"""Healthy: a character-level GRU language model with truncated BPTT done right.

The text stream is split into 32 parallel streams and walked in windows of 20
characters; the hidden state is carried from one window to the next but
detached (hidden = hidden.detach()) before each forward, so each backward stops
at the window boundary. Gradients are clipped at 0.5 (word_language_model style);
the loss falls from ln(vocab) = 2.77 to the entropy of the generating process
(0.66 nats/char) and stays there: converged.
"""
import math
import random

import torch
import torch.nn as nn

torch.manual_seed(25)
random.seed(25)

# A toy "language": words from a small lexicon joined by spaces.
words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "red", "ball", "and", "then", "slept"]
text = " ".join(random.choice(words) for _ in range(9000))
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text])
V = len(chars)

B, BPTT = 32, 20
n = (len(data) - 1) // B
streams = data[:n * B].view(B, n)
targets_all = data[1:n * B + 1].view(B, n)


class CharGRU(nn.Module):
    def __init__(self, hidden=96):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.gru = nn.GRU(32, hidden, batch_first=True)
        self.out = nn.Linear(hidden, V)

    def forward(self, x, h):
        y, h = self.gru(self.emb(x), h)
        return self.out(y), h


model = CharGRU()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
crit = nn.CrossEntropyLoss()
# entropy of the generator per character: ln(#words) spread over the mean word length + 1 space
entropy = math.log(len(words)) / (sum(map(len, words)) / len(words) + 1)
print(f"vocab {V}, ln(vocab) {math.log(V):.3f}, entropy of the text {entropy:.3f} nats/char")
for epoch in range(3):
    hidden = torch.zeros(1, B, 96)
    total, count = 0.0, 0
    for i in range(0, n - BPTT, BPTT):
        hidden = hidden.detach()
        x, y = streams[:, i:i + BPTT], targets_all[:, i:i + BPTT]
        logits, hidden = model(x, hidden)
        loss = crit(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        total += loss.item()
        count += 1
        if count % 20 == 0:
            print(f"epoch {epoch} batch {count:3d} loss {loss.item():.4f}")
    print(f"epoch {epoch} mean loss {total / count:.4f}")
