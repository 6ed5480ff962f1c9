"""Faulty: carried RNN hidden state + backward(retain_graph=True) + manual p.data SGD updates.

An old-style character model (the parameters are updated by hand through p.data,
as the early PyTorch char-RNN tutorials did) carries its hidden state from one
chunk to the next without detaching it. backward() complained about going through
the graph a second time, so retain_graph=True was added. Because the weights are
changed through p.data, autograd's version check never fires: the run goes on
silently, but every backward now walks back through ALL previous chunks. The
graph, the backward time and the memory grow with every step (step time grows
roughly linearly; the whole run is quadratic), and the gradients of chunk k mix
in stale activations from chunks 0..k-1.

Source: https://github.com/GBLin5566/toward-controlled-generation-of-text-pytorch/issues/9
("Memory blow up when setting retain_graph = True") and
https://github.com/isds-neu/PeRCNN/issues/3 (RNN trained with retain_graph=True:
memory explosion and the training slowing down).
"""
import resource
import time

import torch
import torch.nn as nn

torch.manual_seed(29)

text = ("hello world this is a tiny corpus for a tiny rnn " * 60)
chars = sorted(set(text))
idx = torch.tensor([chars.index(c) for c in text])
V, H, CHUNK = len(chars), 64, 10


class CharRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(V + H, H)
        self.h2o = nn.Linear(H, V)

    def forward(self, ch, hidden):
        x = torch.nn.functional.one_hot(ch, V).float()
        hidden = torch.tanh(self.i2h(torch.cat([x, hidden], 1)))
        return self.h2o(hidden), hidden


rnn = CharRNN()
criterion = nn.CrossEntropyLoss()
learning_rate = 0.05
hidden = torch.zeros(1, H)

for step in range(120):
    t0 = time.perf_counter()
    pos = (step * CHUNK) % (len(idx) - CHUNK - 1)
    rnn.zero_grad()
    loss = 0.0
    for t in range(CHUNK):
        out, hidden = rnn(idx[pos + t].view(1), hidden)  # BUG: hidden never detached
        loss = loss + criterion(out, idx[pos + t + 1].view(1))
    loss = loss / CHUNK
    loss.backward(retain_graph=True)
    for p in rnn.parameters():
        p.data.add_(p.grad.data, alpha=-learning_rate)
    if step % 10 == 0:
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"step {step:3d} loss {loss.item():.4f} step time {1000 * (time.perf_counter() - t0):6.1f} ms max RSS {rss_mb:.0f} MB")
