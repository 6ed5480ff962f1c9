"""Healthy: the original WGAN (critic weights clipped to [-0.01, 0.01], RMSprop) on 1-D data.

Arjovsky et al. 2017 (https://arxiv.org/abs/1701.07875): the critic is trained 5
times per generator step and its weights are clamped after every update. The
critic loss E[D(fake)] - E[D(real)] is negative by construction (minus the
Wasserstein estimate) and shrinks towards 0 as the generated distribution
approaches the data (N(4, 1.5)); the generator loss wanders with the critic's
offset. Small losses and tiny gradients through the clamped critic are the
method, not a fault.
"""
import torch
import torch.nn as nn

torch.manual_seed(58)


def real(n):
    return 4.0 + 1.5 * torch.randn(n, 1)


G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
D = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt_g = torch.optim.RMSprop(G.parameters(), lr=5e-4)
opt_d = torch.optim.RMSprop(D.parameters(), lr=5e-4)
CLIP, N_CRITIC, BATCH = 0.01, 5, 128

for it in range(300):
    for _ in range(N_CRITIC):
        d_loss = D(G(torch.randn(BATCH, 8)).detach()).mean() - D(real(BATCH)).mean()
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        for p in D.parameters():
            p.data.clamp_(-CLIP, CLIP)
    g_loss = -D(G(torch.randn(BATCH, 8))).mean()
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    if it % 25 == 0 or it == 299:
        with torch.no_grad():
            s = G(torch.randn(5000, 8))
        print(f"iter {it:3d} critic loss {d_loss.item():+.6f} gen loss {g_loss.item():+.6f} "
              f"sample mean {s.mean().item():.2f} std {s.std().item():.2f} (data 4.00, 1.50)")
