"""Faulty: a classifier trained on data sorted by label, with DataLoader(shuffle=False).

The samples come grouped by class (as they were read, one class folder after
another) and the DataLoader is built with shuffle=False, so every epoch shows
the network 16 batches of class 0, then 16 of class 1, and so on. Within a block
the easiest way down is to push the output towards the class in front of it, so
the batch loss falls to near 0 (0.0000-1.21 at each block's 13th batch), then
jumps at the first batch of the next class, every 16 steps (7.2, 12.7, 8.5,
11.5, 15.5, ... up to 27.9 at step 192). The network forgets each class while it sees the others: the
full-data loss after the 6 epochs is 7.27, 7.30, 3.25, 4.80, 4.78, 2.11 with
accuracy 0.375 to 0.764.

Fix (one line): DataLoader(..., shuffle=True). Checked: with it the same script
is at full-data loss 0.039, accuracy 0.989 after epoch 0 and ends at 0.024,
accuracy 0.993.

Source: https://github.com/Deci-AI/super-gradients/issues/416 (the default
dataloader had shuffle=False, so training "makes NN see only examples of a single
class which quickly throws it out of the minima"; "Passing shuffle=True to the
dataloader params solves the issue"), https://github.com/epfml/disco/issues/288
("if the data is not shuffled we saw some strange oscillatory behavior during
early training") and https://github.com/pytorch/vision/issues/7818 ("AirCraft
dataset samples are organized sequentially, which causes much Worse/biased
performance unless Dataloader is shuffled").
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(68)

K, per_class = 5, 800
centers = torch.randn(K, 16) * 1.0
labels = torch.arange(K).repeat_interleave(per_class)  # sorted by class
feats = centers[labels] + torch.randn(K * per_class, 16)
loader = DataLoader(TensorDataset(feats, labels), batch_size=50, shuffle=False)  # BUG: never shuffled

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, K))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()

step = 0
for epoch in range(6):
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step % 4 == 0:
            print(f"step {step:3d} batch classes {sorted(set(yb.tolist()))} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        out = model(feats)
        acc = (out.argmax(1) == labels).float().mean().item()
    print(f"epoch {epoch} full-data loss {criterion(out, labels).item():.4f} accuracy {acc:.3f}")
