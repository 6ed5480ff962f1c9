"""Healthy: a GRU learning to sum a sequence, with a sequence-length curriculum 5 -> 10 -> 20.

A GRU (hidden 32) reads sequences of values uniform in [-1, 1] and regresses their
sum from its last hidden state (MSE, Adam lr 3e-3, batches of 64). A length
curriculum: 300 steps at length 5, 300 at length 10, 300 at length 20. Each stage
switch makes the loss jump -- at the 5 -> 10 switch held-out MSE goes from 0.002 to
0.07-0.11, at the 10 -> 20 switch from 0.0016 to 0.5-1.2 (the GRU's integrator has
never run that long, and the target variance doubles) -- and recover within about
50 steps, to held-out MSE 0.0016 (R^2 1.000) at length 10 and 0.006 (R^2 0.999) at
length 20. The jumps are the curriculum (Bengio et al., "Curriculum Learning",
ICML 2009, https://dl.acm.org/doi/10.1145/1553374.1553380; Zaremba & Sutskever,
"Learning to Execute", https://arxiv.org/abs/1410.4615, grow sequence lengths the
same way).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(32)

STAGES = [(5, 300), (10, 300), (20, 300)]  # (sequence length, optimizer steps)
BATCH = 64


class Summer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(1, 32, batch_first=True)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1]).squeeze(1)


def batch(n, length):
    x = torch.rand(n, length, 1) * 2 - 1
    return x, x.sum(dim=(1, 2))


net = Summer()
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
step = 0
for length, n_steps in STAGES:
    tx, ty = batch(1000, length)
    print(f"--- stage: sequence length {length} from step {step + 1} (target variance {ty.var().item():.2f}) ---")
    for i in range(n_steps):
        x, y = batch(BATCH, length)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if i < 3 or step % 25 == 0:
            with torch.no_grad():
                test = F.mse_loss(net(tx), ty).item()
            print(f"step {step:4d} len {length:2d} loss {loss.item():.4f} held-out mse {test:.4f} "
                  f"R^2 {1 - test / ty.var().item():.3f}")
print("final held-out mse per length: " + ", ".join(
    f"len {L}: {F.mse_loss(net(b[0]), b[1]).item():.4f}" for L, b in ((L, batch(1000, L)) for L in (5, 10, 20))))
