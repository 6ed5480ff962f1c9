"""Faulty: a transformer-encoder classifier whose freezing loop froze every parameter, head included, and still "trains".

The plan was to freeze the encoder (randomly initialised here, standing in for a
pretrained one) and train only the classification head:
the loop runs over model.parameters() instead of model.encoder.parameters(), so
every parameter, the head too, gets requires_grad=False. The run does not crash,
because the script trains with activation checkpointing and, as the checkpoint
warning ("None of the inputs have requires_grad=True") advises, makes the
embedding output require grad (what transformers' enable_input_require_grads()
does). loss.backward() therefore has a graph to walk, every parameter's .grad
stays None, and AdamW skips them all: 0 trainable parameters, the weights never
change and the full-data loss and accuracy are identical in every epoch (only
dropout makes the batch loss wiggle).

Fix (one line): freeze model.encoder.parameters() (and model.embed), not
model.parameters(). Checked: freezing only the embedding and encoder leaves 132
trainable parameters (the head) and the loss falls 1.274 -> 1.077, accuracy
0.456 -> 0.578 over the 5 epochs.

Source: https://github.com/OpenGVLab/Ask-Anything/issues/235 (every parameter of
the language model set to requires_grad=False, the checkpoint warning "None of the
inputs have requires_grad=True", and the question whether training was still
effective), https://github.com/huggingface/transformers/issues/21381 (gradient
checkpointing with frozen first layers turns off all gradient computation) and
https://github.com/cfzd/Ultra-Fast-Lane-Detection/issues/282 (a freezing loop over
model.parameters() instead of the backbone's).
"""
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

warnings.filterwarnings("ignore", message="enable_nested_tensor")
torch.manual_seed(305)

V, L, K, N = 30, 20, 4, 2000
tokens = torch.randint(1, V, (N, L))
# the label is which of 4 marker tokens (1-4) occurs most often in the sequence
labels = torch.stack([(tokens == m).sum(1) for m in range(1, K + 1)], 1).float()
labels = (labels + 0.1 * torch.rand(N, K)).argmax(1)


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 32)
        self.pos = nn.Parameter(0.02 * torch.randn(L, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, K)

    def forward(self, x):
        h = self.embed(x) + self.pos
        for layer in self.encoder.layers:
            if torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=True)  # activation checkpointing while training
            else:
                h = layer(h)
        return self.head(h.mean(1))


model = EncoderClassifier()
for p in model.parameters():  # BUG: meant model.encoder.parameters(); the head is frozen too
    p.requires_grad = False
# make the checkpointed blocks see an input that requires grad (enable_input_require_grads)
model.embed.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
criterion = nn.CrossEntropyLoss()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(f"trainable parameters {trainable} of {total}")
start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()

step = 0
for epoch in range(5):
    model.train()
    perm = torch.randperm(N)
    for i in range(0, N, 50):
        idx = perm[i:i + 50]
        optimizer.zero_grad()
        loss = criterion(model(tokens[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
        step += 1
    model.eval()
    with torch.no_grad():
        out = model(tokens)
        full = criterion(out, labels).item()
        acc = (out.argmax(1) == labels).float().mean().item()
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm().item()
    print(f"epoch {epoch} loss {full:.4f} accuracy {acc:.3f} weight change {moved:.4f}")
