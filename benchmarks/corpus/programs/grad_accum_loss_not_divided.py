"""Faulty: gradient accumulation over 8 micro-batches without dividing the loss by 8.

SGD lr 0.1 momentum 0.9 was tuned for the averaged loss; summing 8 micro-batch gradients
makes every step 8x too large. The micro-batch loss jumps 0.88, 0.40, 8.0, 23.7, 1.9, 10.6
in the first optimizer steps and the model never fits: full-data mse stays 0.79-1.19, at or
above the target variance 0.749, for all 6 epochs. One-line fix: (loss / 8).backward()
(`python grad_accum_loss_not_divided.py fix`), checked: full-data mse 0.023.

Source: https://github.com/hirofumi0810/neural_sp/issues/168 ("should divide loss by
accum_grad_n_steps") and https://github.com/ApolloResearch/e2e_sae/pull/70 ("Divide loss by
grad accumulation steps").
"""
import sys, torch, torch.nn as nn
torch.manual_seed(65)
ACC = 8
FIX = len(sys.argv) > 1
X = torch.randn(4096, 20)
y = torch.tanh(X @ torch.randn(20, 1) * 0.4) + 0.5 * torch.sin(X[:, 1:2] * 2) + 0.1 * torch.randn(4096, 1)
model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
lf = nn.MSELoss()
step = 0
for epoch in range(6):
    perm = torch.randperm(4096)
    opt.zero_grad()
    for m, i in enumerate(range(0, 4096, 16)):
        idx = perm[i:i+16]
        loss = lf(model(X[idx]), y[idx])
        (loss / ACC if FIX else loss).backward()
        if (m + 1) % ACC == 0:
            opt.step(); opt.zero_grad(); step += 1
            if step % 16 == 0 or (epoch == 0 and step <= 12):
                print(f"optimizer step {step:3d} micro-batch loss {loss.item():.4g}")
    with torch.no_grad():
        print(f"epoch {epoch} full-data mse {lf(model(X), y).item():.4g} (target var {y.var().item():.3f}) lr 0.1")
