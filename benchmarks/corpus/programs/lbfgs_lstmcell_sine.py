"""Healthy: an LSTMCell sequence model trained with LBFGS on whole sine-wave sequences.

Each LBFGS step runs its closure several times; every closure unrolls two
stacked LSTMCells over the full 90-step sequences and computes the MSE of the
prediction at every time step, so gradients reach all time steps directly from
their own loss terms (the recipe of PyTorch's examples/time_sequence_prediction).
The loss falls by orders of magnitude in ten steps.
"""
import torch
import torch.nn as nn

torch.manual_seed(9)

N, L = 32, 91
phase = torch.randint(-40, 40, (N, 1)).float()
t = torch.arange(L).float().unsqueeze(0) + phase
waves = torch.sin(t / 8.0)
inputs, targets = waves[:, :-1], waves[:, 1:]


class Sequence(nn.Module):
    def __init__(self, hidden=24):
        super().__init__()
        self.hidden = hidden
        self.cell1 = nn.LSTMCell(1, hidden)
        self.cell2 = nn.LSTMCell(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, seq):
        b = seq.size(0)
        h1 = c1 = h2 = c2 = torch.zeros(b, self.hidden)
        preds = []
        for x_t in seq.split(1, dim=1):
            h1, c1 = self.cell1(x_t, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            preds.append(self.out(h2))
        return torch.cat(preds, dim=1)


model = Sequence()
criterion = nn.MSELoss()
optimizer = torch.optim.LBFGS(model.parameters(), lr=0.8, max_iter=5)

for step in range(10):
    def closure():
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    print(f"step {step:2d} loss {loss.item():.6f}")

with torch.no_grad():
    print(f"final loss {criterion(model(inputs), targets).item():.6f}")
