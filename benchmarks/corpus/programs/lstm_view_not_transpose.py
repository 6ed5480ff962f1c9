"""Faulty: a (batch, time, feature) tensor reshaped to (time, batch, feature) with .view instead of .transpose before a seq-first nn.LSTM.

The shapes match so nothing errors, but .view re-reads memory in order: each "sequence" the
LSTM sees is stitched from pieces of several samples, so the label of sample b no longer
matches sequence b. The loss sits at ln 3 = 1.0986 and accuracy at chance for all 8
epochs. One-line fix: x.transpose(0, 1) (`python lstm_view_not_transpose.py fix`), checked:
loss 0.15, accuracy 0.92-0.97.

Source: https://github.com/HHTseng/video-classification/issues/42 (x.view(...) proposed to
swap batch and time: "This will not work ... X.view(5, 2) ... the first one is erroneous")
and https://github.com/yunjey/pytorch-tutorial/issues/89 (dimensions changed for a
seq-first LSTM, "the accuracy drops to 11%").
"""
import sys, math, torch, torch.nn as nn
torch.manual_seed(67)
K, T, F, B = 3, 20, 4, 32
FIX = len(sys.argv) > 1
X = torch.randn(3200, T, F)
y = torch.bucketize(X[:, :, 0].sum(1) / math.sqrt(T), torch.tensor([-0.43, 0.43]))
class Net(nn.Module):
    def __init__(s):
        super().__init__(); s.lstm = nn.LSTM(F, 32); s.head = nn.Linear(32, K)
    def forward(s, x):
        seq = x.transpose(0, 1) if FIX else x.view(T, x.size(0), F)
        out, _ = s.lstm(seq)
        return s.head(out[-1])
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
lf = nn.CrossEntropyLoss()
print(f"ln K = {math.log(K):.4f}")
for epoch in range(8):
    perm = torch.randperm(3200); tot = 0.0
    for i in range(0, 3200, B):
        idx = perm[i:i+B]
        opt.zero_grad(); loss = lf(model(X[idx]), y[idx]); loss.backward(); opt.step(); tot += loss.item()
    with torch.no_grad(): out = torch.cat([model(X[i:i+B]) for i in range(0, 3200, B)])
    print(f"epoch {epoch} mean batch loss {tot / 100:.4f} accuracy {(out.argmax(1) == y).float().mean().item():.3f}")
