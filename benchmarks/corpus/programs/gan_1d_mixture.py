"""Healthy: a vanilla GAN (two networks, two Adam optimizers) fitting a 1-D mixture.

The data are a mixture of N(-2, 0.4) and N(+2, 0.4). The discriminator loss
hovers around 2 ln 2 ~ 1.39 and the generator loss around ln 2 ~ 0.69, trading
blows step by step, as a GAN's losses should; neither "converges" in the usual
sense. What shows it works is the generated sample: its mean, spread and the
share of samples in each mode approach the data's (Goodfellow et al. 2014; the
two-optimizer loop of the PyTorch DCGAN tutorial).
"""
import torch
import torch.nn as nn

torch.manual_seed(6)


def real_batch(n):
    mode = torch.randint(0, 2, (n, 1)).float() * 4 - 2
    return mode + 0.4 * torch.randn(n, 1)


G = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
D = nn.Sequential(nn.Linear(1, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
batch = 128
ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)

for it in range(1500):
    # discriminator step
    real = real_batch(batch)
    fake = G(torch.randn(batch, 4)).detach()
    d_loss = bce(D(real), ones) + bce(D(fake), zeros)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    # generator step (non-saturating loss)
    fake = G(torch.randn(batch, 4))
    g_loss = bce(D(fake), ones)
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    if it % 100 == 0 or it == 1499:
        with torch.no_grad():
            s = G(torch.randn(4000, 4))
        print(f"iter {it:4d} d_loss {d_loss.item():.3f} g_loss {g_loss.item():.3f} "
              f"gen mean {s.mean().item():+.2f} std {s.std().item():.2f} share>0 {(s > 0).float().mean().item():.2f} "
              f"(data: mean 0, std {(4 + 0.16) ** 0.5:.2f}, share>0 0.50)")
