"""Faulty: nn.NLLLoss applied to raw linear scores (no log_softmax): the loss goes negative and falls without bound.

NLLLoss just returns -input[target]; it expects log-probabilities, which are <= 0.
Fed raw scores, the optimizer can lower the loss forever by making the target
class's score larger and larger. The loss passes through 0 and keeps falling,
faster and faster (-3, -14, -83, -593, ... -2.4e5 after 7 epochs), while the weight
norm grows over 200x; accuracy falls back towards the majority class as the
scores blow up: nothing is being learnt about the data beyond "make the scores big".

Source: https://github.com/yanx27/Pointnet_Pointnet2_pytorch/issues/30 ("nll_loss is
used but the input ... is not a log_softmax, causing a negative label loss value")
and https://github.com/AnubhavGupta3377/Text-Classification-Models-Pytorch/issues/9
("the input of nn.NLLloss() is after logsoftmax ... therefore, the loss is always
negative").
"""
import torch
import torch.nn as nn

torch.manual_seed(43)

K = 5
X = torch.randn(3000, 20)
Y = (X[:, :K] + 0.5 * torch.randn(3000, K)).argmax(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(20, 64)
        self.scores = nn.Linear(64, K)

    def forward(self, x):
        return self.scores(torch.relu(self.hidden(x)))  # BUG: no log_softmax before NLLLoss


net = Net()
criterion = nn.NLLLoss()
optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)


def weight_norm():
    return torch.sqrt(sum((p.detach() ** 2).sum() for p in net.parameters())).item()


w0 = weight_norm()
for epoch in range(7):
    perm = torch.randperm(3000)
    for i in range(0, 3000, 100):
        idx = perm[i:i + 100]
        optimizer.zero_grad()
        loss = criterion(net(X[idx]), Y[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        acc = (net(X).argmax(1) == Y).float().mean().item()
    print(f"epoch {epoch:2d} loss {loss.item():10.2f} weight norm {weight_norm():8.1f} ({weight_norm() / w0:5.1f}x) acc {acc:.3f}")
