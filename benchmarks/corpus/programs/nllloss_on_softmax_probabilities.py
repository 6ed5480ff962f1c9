"""Faulty: the classifier ends in nn.Softmax and its probabilities go into nn.NLLLoss (which expects log-probabilities).

NLLLoss returns -input[target] averaged over the batch. Given probabilities instead of
log-probabilities it computes -p(target), which lies in [-1, 0]: the printed loss is
negative from the first batch and creeps towards -1 instead of towards 0, and the
gradient of -p through the softmax is p(1-p)-sized, vanishing for confidently wrong
samples, so learning starts far slower than with log-probabilities (after one epoch
accuracy 0.16 against 0.62 for the fixed run). One-line fix: nn.LogSoftmax(dim=1) in place of nn.Softmax(dim=1)
(checked: the fixed run's loss and accuracy are printed by FIXED=1 and quoted in the
corpus entry).

Source: https://github.com/clvrai/ACGAN-PyTorch/issues/3 (Softmax output trained with
NLLLoss; fixed in https://github.com/clvrai/ACGAN-PyTorch/pull/4 "Change Softmax to
LogSoftmax to use NLLLoss") and https://github.com/midas-research/man-sf-emnlp/issues/2
(F.softmax before nll_loss; "should the right thing be F.log_softmax?").
"""
import os

import torch
import torch.nn as nn

torch.manual_seed(7)

K = 10
N = 6000
centers = torch.randn(K, 24) * 0.45
labels = torch.randint(0, K, (N,))
feats = centers[labels] + torch.randn(N, 24)
test_labels = torch.randint(0, K, (2000,))
test_feats = centers[test_labels] + torch.randn(2000, 24)

last = nn.LogSoftmax(dim=1) if os.environ.get("FIXED") else nn.Softmax(dim=1)  # BUG: NLLLoss expects log-probabilities
model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, K), last)
criterion = nn.NLLLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

step = 0
for epoch in range(12):
    perm = torch.randperm(N)
    for i in range(0, N, 64):
        idx = perm[i:i + 64]
        optimizer.zero_grad()
        loss = criterion(model(feats[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(feats)
        full = criterion(out, labels).item()
        test_acc = (model(test_feats).argmax(1) == test_labels).float().mean().item()
        train_acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch:2d} loss {full:.4f} train_acc {train_acc:.3f} test_acc {test_acc:.3f} lr {optimizer.param_groups[0]['lr']}")
