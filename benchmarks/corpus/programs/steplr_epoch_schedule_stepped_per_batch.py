"""Faulty: StepLR(step_size=10, gamma=0.1) written in epochs but stepped after every batch, on a GRU sequence classifier.

The schedule was meant as "divide the lr by 10 every 10 epochs" over a 6-epoch
run, but scheduler.step() sits inside the batch loop, so the lr is divided by 10
every 10 batches: 0.05 for batches 0-9, 5e-3 for 10-19, ... and ~5e-12 by the end
of the first epoch (100 batches), 5e-62 at the end. The GRU learns for its first
~20 steps, then the updates shrink to nothing and the loss freezes for the rest
of the run at a level far above what the model reaches with the intended
schedule; the printed lr shows the collapse.

Fix (one line): move scheduler.step() out of the batch loop to the end of each
epoch. Checked: with scheduler.step() per epoch the loss is 0.642
(accuracy 0.755) after epoch 0 and ends at 0.030, accuracy 0.993.

Source: https://github.com/leftthomas/SRGAN/issues/94 (StepLR with step_size =
epochs // 2 and gamma 0.1, "called at each training step which means that learning
rate is quickly becoming zero after a few training steps"; "when I put
schedulerD.step() and schedulerG.step() after the epoch end, it started to train")
and https://github.com/pytorch/vision/issues/1261 (a scheduler stepped every
iteration in a loop that also steps it per epoch).
"""
import torch
from torch import nn

torch.manual_seed(306)

K, T, N = 5, 24, 3200
# each class is a noisy random walk with its own drift and oscillation
drift = torch.linspace(-0.2, 0.2, K)
freq = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.75])
labels = torch.randint(0, K, (N,))
t = torch.arange(T).float()
seqs = (drift[labels, None] * t + torch.sin(freq[labels, None] * t)
        + torch.randn(N, T).cumsum(1) * 0.3).unsqueeze(-1)


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(1, 32, batch_first=True)
        self.head = nn.Linear(32, K)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(h[-1])


model = GRUClassifier()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)  # meant: every 10 epochs
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(6):
    perm = torch.randperm(N)
    for i in range(0, N, 32):
        idx = perm[i:i + 32]
        optimizer.zero_grad()
        loss = criterion(model(seqs[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()  # BUG: per batch, the schedule is written in epochs
        if step % 10 == 0:
            print(f"step {step:3d} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.3g}")
        step += 1
    with torch.no_grad():
        out = model(seqs)
        acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} loss {criterion(out, labels).item():.4f} accuracy {acc:.3f} "
          f"lr {optimizer.param_groups[0]['lr']:.3g}")
