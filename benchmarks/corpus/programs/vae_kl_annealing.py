"""Healthy: a VAE trained with KL annealing (beta warm-up), so the logged loss rises before it falls.

The data are 24-d points on a noisy 2-d curved manifold. The VAE (4-d latent,
Gaussian decoder) minimises recon + beta * KL, with beta held at 0 for 5 epochs
and then ramped linearly to 1 over the next 15 (of 40), the warm-up Bowman et
al. use against posterior collapse. While beta is near 0 the encoder is free to
spend many nats of KL on sharp posteriors, so the reconstruction falls fast; as
beta grows, the beta * KL term grows faster than the encoder gives KL back, and
the optimised total loss rises for twelve epochs (about 14.5 -> 18.6). Once beta
reaches 1 the objective is the plain negative ELBO and it falls again (to about
15.6). The loss rising here is the schedule changing the objective, not training
going wrong: the per-epoch negative ELBO at beta = 1 (recon + KL, printed as
neg_elbo) falls the whole run (409 -> 15.6). (Bowman et al., "Generating
Sentences from a Continuous Space", https://arxiv.org/abs/1511.06349; Kingma &
Welling, https://arxiv.org/abs/1312.6114.)
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(6)

D_X, D_Z, HOLD_EPOCHS, WARMUP_EPOCHS, EPOCHS = 24, 4, 5, 15, 40
t = torch.rand(3000, 2) * 2 - 1
basis = torch.randn(4, D_X)
feats = torch.cat([t, torch.sin(3 * t[:, :1]) * t[:, 1:], t[:, :1] ** 2], 1)
data = torch.tanh(feats @ basis) + 0.05 * torch.randn(3000, D_X)
loader = DataLoader(TensorDataset(data), batch_size=100, shuffle=True)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(D_X, 64), nn.ReLU(), nn.Linear(64, 2 * D_Z))
        self.dec = nn.Sequential(nn.Linear(D_Z, 64), nn.ReLU(), nn.Linear(64, D_X))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = ((self.dec(z) - x) ** 2).sum(1).mean() / (2 * 0.1 ** 2)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).mean()
        return recon, kl


vae = VAE()
opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
step = 0
for epoch in range(EPOCHS):
    sums = torch.zeros(3)
    for (x,) in loader:
        beta = min(1.0, max(0.0, step / len(loader) - HOLD_EPOCHS) / WARMUP_EPOCHS)
        recon, kl = vae(x)
        loss = recon + beta * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        sums += torch.tensor([loss.item(), recon.item(), kl.item()])
    total, rec, kl_ = (sums / len(loader)).tolist()
    print(f"epoch {epoch:2d} beta {beta:.3f} loss {total:8.3f} recon {rec:8.3f} kl {kl_:7.3f} neg_elbo {rec + kl_:8.3f}")
