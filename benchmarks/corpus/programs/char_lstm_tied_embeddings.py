"""Healthy: a character-level LSTM language model with tied input/output embeddings.

The decoder's weight matrix IS the embedding matrix (decoder.weight =
encoder.weight), so a single parameter receives gradient from both the input
lookup and the output softmax; a projection maps the LSTM state back to the
embedding size. Text is generated from a small word grammar; training uses Adam,
truncated BPTT over 40-character windows with the hidden state carried and
detached, and gradient clipping at 1.0. The loss falls from ln(V) (about 3.0) to
well under 1 nat/char, validation loss follows it, and a greedy sample at the end
produces real words of the grammar. Trained as intended.

Regime: weight tying (Press & Wolf, https://arxiv.org/abs/1608.05859; Inan et al.,
https://arxiv.org/abs/1611.01462; PyTorch examples/word_language_model --tied).
"""
import math
import random

import torch
from torch import nn

torch.manual_seed(5)
random.seed(5)

subjects = ["the cat", "a dog", "my friend", "the old man", "her sister"]
verbs = ["sees", "likes", "finds", "keeps", "paints"]
objects = ["a red ball", "the green door", "some bread", "an apple", "the river"]
sentences = [f"{random.choice(subjects)} {random.choice(verbs)} {random.choice(objects)}." for _ in range(1400)]
text = " ".join(sentences)
chars = sorted(set(text))
V = len(chars)
ids = torch.tensor([chars.index(c) for c in text])
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]

B, T, E, H = 16, 40, 48, 128


def batchify(seq):
    n = (len(seq) - 1) // B
    return seq[:n * B].view(B, n), seq[1:n * B + 1].view(B, n)


src, tgt = batchify(train_ids)
vsrc, vtgt = batchify(val_ids)


class TiedCharLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.proj = nn.Linear(H, E)
        self.decoder = nn.Linear(E, V)
        self.decoder.weight = self.encoder.weight  # tied

    def forward(self, x, state=None):
        out, state = self.lstm(self.encoder(x), state)
        return self.decoder(self.proj(out)), state


model = TiedCharLM()
assert model.decoder.weight is model.encoder.weight
n_params = sum(p.numel() for p in model.parameters())
print(f"vocab {V} chars, train {len(train_ids)} val {len(val_ids)}, {n_params} parameters (tied: embedding counted once)")
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
ce = nn.CrossEntropyLoss()


@torch.no_grad()
def val_loss():
    model.eval()
    state, tot, n = None, 0.0, 0
    for i in range(0, vsrc.size(1) - 1, T):
        x, t = vsrc[:, i:i + T], vtgt[:, i:i + T]
        logits, state = model(x, state)
        tot += ce(logits.reshape(-1, V), t.reshape(-1)).item() * t.numel()
        n += t.numel()
    model.train()
    return tot / n


print(f"uniform loss ln(V) = {math.log(V):.3f}")
step = 0
for epoch in range(6):
    state, tot, n = None, 0.0, 0
    for i in range(0, src.size(1) - 1, T):
        x, t = src[:, i:i + T], tgt[:, i:i + T]
        if state is not None:
            state = tuple(s.detach() for s in state)
        logits, state = model(x, state)
        loss = ce(logits.reshape(-1, V), t.reshape(-1))
        opt.zero_grad()
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tot += loss.item()
        n += 1
        if step % 40 == 0:
            print(f"step {step:4d} lr {opt.param_groups[0]['lr']:.4f} loss {loss.item():.4f} grad_norm {gnorm.item():.3f}")
    vl = val_loss()
    print(f"epoch {epoch} train_loss {tot / n:.4f} val_loss {vl:.4f} val_bpc {vl / math.log(2):.3f}")

with torch.no_grad():
    model.eval()
    x = torch.tensor([[chars.index(c) for c in "the "]])
    logits, state = model(x)
    out = "the "
    for _ in range(80):
        nxt = logits[0, -1].argmax().item()
        out += chars[nxt]
        logits, state = model(torch.tensor([[nxt]]), state)
print("greedy sample:", repr(out))
