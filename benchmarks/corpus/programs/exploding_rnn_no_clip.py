"""Faulty: an IRNN (ReLU RNN, identity-initialised recurrence) on 60-step sequences with no gradient clipping.

The task (recall the first input after 60 steps) needs long memory, so the
recurrent matrix starts at the identity (Le et al. 2015, "A Simple Way to
Initialize Recurrent Networks of Rectified Linear Units", which trains such nets
WITH gradient clipping). Here clipping was left out. Backpropagating through 60
ReLU steps gives a gradient norm of 1.9e3 at the first step and 3e10 at the
second; each unclipped SGD update pushes the recurrent weights' spectral radius
further above 1, the loss climbs 117 -> 4e3 -> 1.3e5 -> 2.7e17 and is inf at
step 18 and NaN from step 19. clip_grad_norm_ would have bounded every update.

Source: https://github.com/pytorch/pytorch/issues/2623 (the char-RNN tutorial on a
large data set hit exploding gradients; the fix in
https://discuss.pytorch.org/t/nan-loss-in-rnn-model/655 is to clip) and
https://github.com/keras-team/keras/issues/5127 ("why do the loss equal nan when i
don't use clipnorm?" - "the gradient gets really really large, which changes the
weight values a LOT").
"""
import torch
import torch.nn as nn

torch.manual_seed(34)

T, B, H = 60, 32, 64


class Recall(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(1, H, batch_first=True, nonlinearity="relu")
        nn.init.eye_(self.rnn.weight_hh_l0)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


model = Recall()
opt = torch.optim.SGD(model.parameters(), lr=3e-4, momentum=0.9)
for step in range(100):
    x = torch.randn(B, T, 1)
    target = x[:, 0]
    loss = nn.functional.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    opt.step()
    if step < 25 or step % 10 == 0:
        print(f"step {step:3d} loss {loss.item():.4g} grad_norm {gnorm.item():.4g}")
