"""Healthy: full-batch LBFGS (strong-Wolfe line search) on a smooth 1-D regression.

LBFGS is a quasi-Newton method: each optimizer.step(closure) evaluates the loss
and gradient several times and takes curvature-scaled steps, so the per-step
update sizes look nothing like SGD's and the loss drops by orders of magnitude
in a few steps before flattening at the noise floor.
"""
import torch

torch.manual_seed(10)

x = torch.linspace(-2, 2, 400).unsqueeze(1)
y = x ** 3 - 2 * x + torch.sin(4 * x) + 0.01 * torch.randn_like(x)
y = (y - y.mean()) / y.std()

model = torch.nn.Sequential(
    torch.nn.Linear(1, 32), torch.nn.Tanh(),
    torch.nn.Linear(32, 32), torch.nn.Tanh(),
    torch.nn.Linear(32, 1),
)
opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")


def closure():
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


for it in range(30):
    loss = opt.step(closure)
    print(f"iter {it:2d} loss {loss.item():.3e}")
