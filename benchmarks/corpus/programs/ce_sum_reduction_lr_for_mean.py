"""Faulty: CrossEntropyLoss(reduction='sum') over batches of 512 with an SGD lr tuned for 'mean'.

lr 0.05 momentum 0.9 works for the mean loss; with 'sum' the gradient is 512x larger, an
effective lr of 25.6. The summed batch loss goes 1188, 3861, 8.2e4, 3.6e5, 2.6e9, 2.3e14,
1.1e23, 1.1e38 and is NaN from step 8 on. One-line fix: reduction='mean' (`python
ce_sum_reduction_lr_for_mean.py fix`), checked: loss 0.187, accuracy 0.938.

Source: https://github.com/ai-safety-foundation/sparse_autoencoder/issues/63 (with sum "the
loss scale (and gradients) depend on the batch size, so you would probably need to change
the learning rate"; switched to mean) and https://github.com/deepchem/deepchem/pull/640
(reduce_sum made the loss proportional to the rollout length; changed to reduce_mean).
"""
import sys, math, torch, torch.nn as nn
torch.manual_seed(68)
K = 10
FIX = len(sys.argv) > 1
X = torch.randn(8192, 32)
W = torch.randn(32, K)
y = (X @ W + 0.5 * torch.randn(8192, K)).argmax(1)
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, K))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
lf = nn.CrossEntropyLoss(reduction='mean' if FIX else 'sum')
mean_lf = nn.CrossEntropyLoss()
step = 0
for epoch in range(10):
    perm = torch.randperm(8192)
    for i in range(0, 8192, 512):
        idx = perm[i:i+512]
        opt.zero_grad(); loss = lf(model(X[idx]), y[idx]); loss.backward(); opt.step()
        if step < 10 or step % 16 == 0:
            print(f"step {step:3d} batch loss ({'mean' if FIX else 'sum'}) {loss.item():.4g}")
        step += 1
    with torch.no_grad():
        out = model(X)
    print(f"epoch {epoch} full-data mean loss {mean_lf(out, y).item():.4g} accuracy {(out.argmax(1) == y).float().mean().item():.3f}")
