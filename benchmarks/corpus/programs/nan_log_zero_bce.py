"""Faulty: a hand-written binary cross-entropy, torch.log(p) with no epsilon, turns NaN once the model is confident.

The loss is -(y log p + (1 - y) log(1 - p)) with p = sigmoid(logit). The data are
easy, the model becomes confident, and in float32 sigmoid(logit) rounds to exactly
1.0 for logits above ~17: log(1 - p) = log(0) = -inf, and (1 - y) * -inf with
y = 1 is 0 * inf = NaN. The loss and every gradient are NaN from that step on,
and the weights turn NaN after the next update. (F.binary_cross_entropy_with_logits,
or clamping p to [eps, 1 - eps], avoids it.)

Source: https://github.com/mathiaszinnen/focal_loss_torch/issues/3 ("This is due to
the fact that the logarithm of 0 is not defined ... adding a small number inside
torch.log()") and https://github.com/yhenon/pytorch-retinanet/issues/3 ("If any
value inside of classification is equal to zero, then we take log(0), which is not
valid, and results in NaN").
"""
import torch
import torch.nn as nn

torch.manual_seed(36)

x = torch.randn(4000, 10)
y = (x[:, 0] - x[:, 1] + 0.5 * x[:, 2] > 0).float().unsqueeze(1)

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)


def bce(prob, target):
    return -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean()


reported = False
for epoch in range(15):
    perm = torch.randperm(4000)
    for i in range(0, 4000, 100):
        idx = perm[i:i + 100]
        p = torch.sigmoid(model(x[idx]))
        loss = bce(p, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss) and not reported:
            print(f"epoch {epoch} batch {i // 100}: loss is {loss.item()}, max p {p.max().item():.8f} min p {p.min().item():.3g}")
            reported = True
    with torch.no_grad():
        logits = model(x)
    print(f"epoch {epoch:2d} last batch loss {loss.item():.5f} max |logit| {logits.abs().max().item():.1f}")
