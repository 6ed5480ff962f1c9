"""Faulty: the RNN hidden state is carried across batches without being detached.

A sin -> cos sequence regressor walks a long signal in windows and feeds each
window's final hidden state into the next window, but never cuts it from the
previous graph (no h_state = h_state.detach()). The second backward then has to
go through the first window's graph, whose buffers were freed: "RuntimeError:
Trying to backward through the graph a second time".

Source: https://github.com/MorvanZhou/PyTorch-Tutorial/issues/57 (commenting out
`h_state = h_state.data` in the RNN regression tutorial raises exactly this
error; the suggested `retain_graph=True` only hides it). The facts carry over,
the code is ours.
"""
import math

import torch
from torch import nn

torch.manual_seed(27)

TIME_STEP = 10


class RNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(input_size=1, hidden_size=32, num_layers=1, batch_first=True)
        self.out = nn.Linear(32, 1)

    def forward(self, x, h_state):
        r_out, h_state = self.rnn(x, h_state)
        return self.out(r_out), h_state


rnn = RNN()
optimizer = torch.optim.Adam(rnn.parameters(), lr=0.02)
loss_func = nn.MSELoss()

h_state = None
for step in range(100):
    start, end = step * math.pi, (step + 1) * math.pi
    steps = torch.linspace(start, end, TIME_STEP)
    x = torch.sin(steps).view(1, TIME_STEP, 1)
    y = torch.cos(steps).view(1, TIME_STEP, 1)

    prediction, h_state = rnn(x, h_state)
    # BUG: h_state keeps this window's graph; it should be h_state = h_state.detach()
    loss = loss_func(prediction, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step} loss {loss.item():.4f}")
