"""Faulty: a 6-class classifier with one output trained with MSELoss on the class index.

The classes are blobs on a ring whose index order has nothing to do with their position,
so regressing the integer label averages neighbouring indices (between class 0 and class 5
the net predicts ~2.5): the MSE plateaus near 1.05 and rounded predictions reach only
~0.62 accuracy. One-line fix: K outputs + CrossEntropyLoss on the indices (`python
mse_regressing_class_index.py fix`), checked: loss 0.371, accuracy 0.847 (Bayes-limited,
the blobs overlap).

Source: https://github.com/FluxML/model-zoo/issues/8 (classification trained with MSE;
"It should be using cross entropy loss", fixed in a commit) and
https://github.com/jax-ml/jax/issues/2697 (classification by MSE regression of the label:
the loss "continues to get stuck").
"""
import sys, torch, torch.nn as nn
torch.manual_seed(62)
K = 6
FIX = len(sys.argv) > 1
centres = torch.tensor([[0., 2.], [1.7, -1.], [-1.7, -1.], [0., -2.], [1.7, 1.], [-1.7, 1.]]) * 1.5
y = torch.randint(0, K, (3000,))
X = centres[y] + 1.0 * torch.randn(3000, 2)
model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, K if FIX else 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
lf = nn.CrossEntropyLoss() if FIX else nn.MSELoss()
def loss_of(out, t): return lf(out, t) if FIX else lf(out.squeeze(1), t.float())
def pred(out): return out.argmax(1) if FIX else out.squeeze(1).round().clamp(0, K - 1).long()
for epoch in range(15):
    perm = torch.randperm(3000)
    for i in range(0, 3000, 32):
        idx = perm[i:i+32]
        opt.zero_grad(); loss = loss_of(model(X[idx]), y[idx]); loss.backward(); opt.step()
    with torch.no_grad():
        out = model(X)
        print(f"epoch {epoch:2d} loss {loss_of(out, y).item():.4f} accuracy {(pred(out) == y).float().mean().item():.3f}")
