"""Healthy: SimCLR-style contrastive pre-training of an MLP encoder with an InfoNCE loss.

Each unlabelled sample is a 4-d latent "content" vector; a view of it is 16
content features (a fixed nonlinear map of the latent, lightly jittered) beside
16 larger "style" features that every augmentation redraws, the way crops and
colour jitter change an image but not what it shows. Each batch of 128 samples
is viewed twice; the encoder + projection head embeds both views on the unit
sphere and the loss is InfoNCE: cross-entropy of each view's cosine-similarity
row (temperature 0.2) against its own partner, with the other 127 samples of the
batch as negatives. A fresh encoder is dominated by the style features and
cannot tell the partner from the negatives, so the loss starts at about ln(128)
= 4.85 (the uniform guess over the batch) and falls to about 1.1 as the encoder
learns to ignore style; it does not go to zero (InfoNCE at temperature 0.2 keeps
a floor while negatives with nearby content remain). The labels (which of 4
regions the latent falls in) are never trained on: a 5-nearest-neighbour probe
on the frozen encoder features shows what was learned (0.53 before training,
0.94 at the end; the partner is the top-1 match for 2% of views at step 1 and
for all of them from step 300). (Chen et al., "SimCLR",
https://arxiv.org/abs/2002.05709; van den Oord et al., "CPC/InfoNCE",
https://arxiv.org/abs/1807.03748.)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(4)

N_CLASSES, D_LATENT, D_CONTENT, D_STYLE, BATCH, TEMP = 4, 4, 16, 16, 128, 0.2
mix = torch.randn(D_LATENT, D_CONTENT) / math.sqrt(D_LATENT)
class_dirs = torch.randn(D_LATENT, N_CLASSES)


def sample(n):
    """Latent content vectors and the class each one falls in (the class is never trained on)."""
    z = torch.randn(n, D_LATENT)
    return z, (z @ class_dirs).argmax(1)


def view(z):
    """One augmented view: the content features, jittered, beside freshly drawn, larger "style" features."""
    content = torch.tanh(z @ mix) + 0.05 * torch.randn(z.shape[0], D_CONTENT)
    return torch.cat([content, 1.5 * torch.randn(z.shape[0], D_STYLE)], 1)


encoder = nn.Sequential(nn.Linear(D_CONTENT + D_STYLE, 128), nn.ReLU(), nn.Linear(128, 64))
projector = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
opt = torch.optim.Adam(list(encoder.parameters()) + list(projector.parameters()), lr=1e-3)

probe_train, probe_train_y = sample(2000)
probe_test, probe_test_y = sample(1000)


def probe_accuracy():
    """5-nearest-neighbour class vote on frozen encoder features of one view (labels used only here)."""
    with torch.no_grad():
        ftr = F.normalize(encoder(view(probe_train)), dim=1)
        fte = F.normalize(encoder(view(probe_test)), dim=1)
        nn_idx = (fte @ ftr.T).topk(5, dim=1).indices
        vote = F.one_hot(probe_train_y[nn_idx], N_CLASSES).sum(1).argmax(1)
        return (vote == probe_test_y).float().mean().item()


def info_nce(z1, z2):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = z1 @ z2.T / TEMP
    target = torch.arange(z1.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)), (logits.argmax(1) == target).float().mean()


print(f"ln(batch) = {math.log(BATCH):.3f}; probe acc before training {probe_accuracy():.3f} (chance {1 / N_CLASSES:.2f})")
for step in range(1, 801):
    z, _ = sample(BATCH)
    loss, top1 = info_nce(projector(encoder(view(z))), projector(encoder(view(z))))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step == 1 or step % 50 == 0:
        print(f"step {step:4d} infonce {loss.item():.4f} partner top-1 {top1.item():.3f} probe acc {probe_accuracy():.3f}")
