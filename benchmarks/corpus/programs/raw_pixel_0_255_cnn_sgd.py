"""Faulty: 0-255 pixel values fed raw to a small CNN trained with SGD (lr 0.01, momentum 0.9).

Pixels 40..250, mean 105. The first batches give losses of 6.6, 36, 7.5, 37 (the logits are
in the tens); after these momentum-driven jumps the net ends at the uniform
prediction: loss 1.386 = ln 4, accuracy at chance for every epoch. One-line fix: X = (X -
mean) / std (`python raw_pixel_0_255_cnn_sgd.py fix`), checked: loss 4.6e-06, accuracy 1.000.

Source: https://github.com/kratzert/finetune_alexnet_with_tensorflow/issues/79 (inputs in
[-128, 128]: bad results and NaN at higher learning rates; "You probably should [scale]")
and https://github.com/chainer/chainercv/issues/358 (pixels not divided by 255 "may be
explode during further conv layer").
"""
import sys, math, torch, torch.nn as nn
torch.manual_seed(64)
K = 4
FIX = len(sys.argv) > 1
def make(n):
    y = torch.randint(0, K, (n,))
    img = torch.rand(n, 1, 16, 16) * 60 + 40
    r = torch.arange(16)
    for k in range(K):
        m = y == k
        if k == 0: img[m, :, 4:8, :] += 150
        if k == 1: img[m, :, :, 4:8] += 150
        if k == 2: img[m] += ((r[:, None] - r[None]).abs() < 3).float() * 150
        if k == 3: img[m, :, 5:11, 5:11] += 150
    return img.round().clamp(0, 255), y
X, y = make(2048)
if FIX: X = (X - X.mean()) / X.std()
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, K))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
lf = nn.CrossEntropyLoss()
print(f"pixel range {X.min().item():.0f}..{X.max().item():.0f} mean {X.mean().item():.1f}; ln K = {math.log(K):.4f}")
step = 0
for epoch in range(6):
    perm = torch.randperm(2048)
    for i in range(0, 2048, 32):
        idx = perm[i:i+32]
        opt.zero_grad(); loss = lf(model(X[idx]), y[idx]); loss.backward(); opt.step()
        if step < 8 or step % 32 == 0: print(f"step {step:3d} loss {loss.item():.4g}")
        step += 1
    with torch.no_grad(): out = model(X)
    print(f"epoch {epoch} full-data loss {lf(out, y).item():.4g} accuracy {(out.argmax(1) == y).float().mean().item():.3f}")
