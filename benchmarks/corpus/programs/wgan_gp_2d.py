"""Healthy: WGAN-GP on 2-D data (a Gaussian blob centred at (3, -2)).

The critic is trained 5 times per generator step with the gradient penalty of
Gulrajani et al. 2017 (https://arxiv.org/abs/1704.00028). The critic loss
E[D(fake)] - E[D(real)] + 10 * GP is negative by design (it is minus the
Wasserstein estimate, plus the penalty); it starts at about -2.7 and its
magnitude shrinks towards 0 (crossing it now and then) as the generator's
samples approach the data, while the generator loss -E[D(fake)] wanders in sign
and size (the critic's output has no fixed offset).
"""
import torch
from torch import nn, autograd

torch.manual_seed(7)

data_mean = torch.tensor([3.0, -2.0])


def sample_real(n):
    return data_mean + 0.5 * torch.randn(n, 2)


generator = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
critic = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.9))
c_opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
LAMBDA, N_CRITIC, BATCH = 10.0, 5, 128


def gradient_penalty(real, fake):
    alpha = torch.rand(real.size(0), 1)
    mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grads = autograd.grad(critic(mix).sum(), mix, create_graph=True)[0]
    return ((grads.norm(2, dim=1) - 1) ** 2).mean()


for gen_step in range(300):
    for _ in range(N_CRITIC):
        real = sample_real(BATCH)
        fake = generator(torch.randn(BATCH, 2)).detach()
        c_loss = critic(fake).mean() - critic(real).mean() + LAMBDA * gradient_penalty(real, fake)
        c_opt.zero_grad()
        c_loss.backward()
        c_opt.step()
    g_loss = -critic(generator(torch.randn(BATCH, 2))).mean()
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
    if gen_step % 20 == 0 or gen_step == 299:
        with torch.no_grad():
            s = generator(torch.randn(2000, 2))
        print(f"gen step {gen_step:3d} critic loss {c_loss.item():+.4f} gen loss {g_loss.item():+.4f} "
              f"sample mean ({s[:, 0].mean().item():+.2f}, {s[:, 1].mean().item():+.2f}) std {s.std(0).mean().item():.2f} "
              f"[data (3.00, -2.00) std 0.50]")
