"""Faulty: a character LSTM language model trained with SGD at lr=20 (the word-language-model recipe) but without its gradient clipping.

The recipe this follows (PyTorch's examples/word_language_model: plain SGD at
lr=20, truncated BPTT with the hidden state detached every window) only works
because it clips the gradient norm to 0.25 before every step. Here the clip line
was dropped. The inputs are integer character ids; the hidden state is carried
(detached) from window to window. Within the first ten windows an unclipped
gradient spike, multiplied by lr=20, throws the weights far out: the loss jumps
from ln(16) = 2.77 to over 100 and the model never recovers; three epochs later it
is still around 20 (the same script with the clip line restored reaches ~0.4).

Source: https://github.com/nyu-dl/dl4mt-tutorial/issues/64 (RNN training hits
"NaN detected"; "applying gradient clipping (setting clip-c to 1.0) solved the
problem of NaNs"), https://github.com/speechbrain/speechbrain/issues/1020 (char-level
RNNLM: "Loss is nan") and https://github.com/mravanelli/pytorch-kaldi/issues/112
(LSTM loss turns nan; "try to activate gradient clipping").
"""
import math
import random

import torch
import torch.nn as nn

torch.manual_seed(57)
random.seed(57)

vocab_words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do"]
text = " ".join(random.choice(vocab_words) for _ in range(6000))
chars = sorted(set(text))
ids = torch.tensor([chars.index(c) for c in text])
V, B, BPTT, H = len(chars), 20, 35, 128
n = (len(ids) - 1) // B
src = ids[:n * B].view(B, n)
tgt = ids[1:n * B + 1].view(B, n)


class CharLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(V, 64)
        self.rnn = nn.LSTM(64, H, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(H, V)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


model = CharLM()
criterion = nn.CrossEntropyLoss()
lr = 20.0
optimizer = torch.optim.SGD(model.parameters(), lr=lr)
print(f"vocab {V}, ln(vocab) {math.log(V):.3f}")

for epoch in range(3):
    hidden = (torch.zeros(2, B, H), torch.zeros(2, B, H))
    for batch, i in enumerate(range(0, n - BPTT, BPTT)):
        hidden = tuple(h.detach() for h in hidden)
        output, hidden = model(src[:, i:i + BPTT], hidden)
        loss = criterion(output.reshape(-1, V), tgt[:, i:i + BPTT].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        # torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)   <- dropped
        gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
        optimizer.step()
        if batch % 10 == 0 or (epoch == 0 and batch < 10):
            print(f"epoch {epoch} batch {batch:3d} loss {loss.item():.4f} grad norm {gnorm:.3g}")
