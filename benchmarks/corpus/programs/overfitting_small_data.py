"""Faulty: a big MLP trained for 100 epochs on 60 noisy samples; the validation loss rises while the training loss falls.

No regularisation, no early stopping. The training loss goes towards 0 (the net
memorises the noise, whose variance is 0.25), while the validation loss, computed
every epoch under torch.no_grad() with the same criterion on 1000 fresh samples,
bottoms out within the first ten epochs and then climbs steadily for the rest of
the run, ending over 60% above its minimum.

Source: https://github.com/IcarusWizard/MAE/issues/6 ("the training loss is
decreasing while validation loss is increasing" - "Yes, the model is overfitting
since cifar10 is a small dataset and we did not perform any data augmentation")
and https://github.com/Alexander-H-Liu/End-to-end-ASR-Pytorch/issues/31 (training
loss constantly decreasing, validation loss increasing after a few epochs on a
small corpus).
"""
import torch
import torch.nn as nn

torch.manual_seed(54)


def make(n):
    x = torch.rand(n, 5) * 2 - 1
    y = torch.sin(3 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.5 * torch.randn(n, 1)
    return x, y


x_train, y_train = make(60)
x_val, y_val = make(1000)

model = nn.Sequential(nn.Linear(5, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
criterion = nn.MSELoss()

for epoch in range(100):
    model.train()
    perm = torch.randperm(60)
    for i in range(0, 60, 20):
        idx = perm[i:i + 20]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        train_loss = criterion(model(x_train), y_train).item()
        val_loss = criterion(model(x_val), y_val).item()
    if epoch % 5 == 0 or epoch == 99:
        print(f"epoch {epoch:2d} train_loss {train_loss:.4f} val_loss {val_loss:.4f}")
