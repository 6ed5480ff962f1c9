"""Faulty: a hand-written Euclidean distance loss, sqrt(sum(d^2)), gives NaN gradients where the distance is exactly 0.

A trajectory predictor is trained on padded trajectories: padded time steps are
masked out by multiplying both the prediction and the target by the mask, so
there the displacement is exactly 0. The loss is finite, but d/dx sqrt(x) at x = 0
is inf, and inf * 0 = NaN: from the very first backward every gradient is NaN,
the optimizer writes NaN into every weight, and the next forward returns a NaN
loss. The fix is torch.linalg.vector_norm (whose gradient at 0 is defined as 0)
or sqrt(x + eps).

Source: https://github.com/pytorch/pytorch/issues/2421 ("Gradient of zero norm is
nan" - "in the 2 norm, there is a square root, which has a gradient of +infinity
at 0. The gradient gives you nan because you then multiply 0 and an infinity");
torch.norm itself was fixed, a hand-written sqrt of a sum of squares still hits it.
"""
import torch
import torch.nn as nn

torch.manual_seed(37)

N, T = 512, 12
lengths = torch.randint(6, T + 1, (N,))
mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float().unsqueeze(-1)  # (N, T, 1)
start = torch.randn(N, 2)
velocity = torch.randn(N, 2) * 0.3
steps = torch.arange(1, T + 1).float().view(1, T, 1)
future = (start.unsqueeze(1) + velocity.unsqueeze(1) * steps) * mask  # zero-padded
history = torch.cat([start, start - velocity], 1)


class Predictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, T * 2))

    def forward(self, h):
        return self.net(h).view(-1, T, 2)


def ade_loss(pred, target, m):
    disp = (pred - target) * m
    dist = torch.sqrt((disp ** 2).sum(-1))  # exactly 0 on padded steps
    return dist.sum() / m.sum()


model = Predictor()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(5):
    for i in range(0, N, 64):
        pred = model(history[i:i + 64])
        loss = ade_loss(pred, future[i:i + 64], mask[i:i + 64])
        opt.zero_grad()
        loss.backward()
        grad_finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        if i == 0 or not grad_finite and epoch == 0 and i < 192:
            print(f"epoch {epoch} batch {i // 64} loss {loss.item():.4f} gradients finite: {grad_finite}")
    print(f"epoch {epoch} last loss {loss.item():.4f}")
