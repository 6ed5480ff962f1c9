"""Faulty: an undetached LSTM state "fixed" with loss.backward(retain_graph=True).

A stateful LSTM tagger carries (h, c) across batches without detaching them.
Plain backward() fails with "Trying to backward through the graph a second time",
so the author added retain_graph=True, as the error message suggests. Now every
backward goes back through all previous batches' graphs, and those graphs saved
the LSTM weights that optimizer.step() has since changed in place, so the second
step fails with "one of the variables needed for gradient computation has been
modified by an inplace operation". The real fix is to detach the state.

Source: https://github.com/quark0/darts/issues/56 (only backward(retain_graph=True)
runs; the answer: the RNN backpropagates all the way back through time, detach
the hidden state in repackage_hidden) and
https://github.com/isds-neu/PeRCNN/issues/3 (training an RNN with retain_graph=True).
"""
import torch
import torch.nn as nn

torch.manual_seed(28)

VOCAB, TAGS, B, T = 50, 5, 8, 12
stream = torch.randint(0, VOCAB, (B, 400))
tags = stream % TAGS


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, TAGS)

    def forward(self, x, state):
        out, state = self.lstm(self.emb(x), state)
        return self.fc(out), state


model = Tagger()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
crit = nn.CrossEntropyLoss()
state = None
for i, start in enumerate(range(0, 400, T)):
    x, y = stream[:, start:start + T], tags[:, start:start + T]
    logits, state = model(x, state)
    loss = crit(logits.reshape(-1, TAGS), y.reshape(-1))
    opt.zero_grad()
    loss.backward(retain_graph=True)  # BUG: silences the error instead of detaching `state`
    opt.step()
    print(f"batch {i} loss {loss.item():.4f}")
