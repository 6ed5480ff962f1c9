"""Faulty: a GRU next-token language model whose loss counts the padding positions (no ignore_index).

Short "sentences" (BOS, a random first word, then 2-5 words that each follow the
one before by a fixed successor table, then EOS) are right-padded with token 0
to a fixed length of 64, and the shifted targets are padded with 0 as well.
nn.CrossEntropyLoss() is built without ignore_index, so 91% of the positions it
averages over are "after EOS, predict PAD". That part is trivial: within 50
steps the loss falls from 3.4 to ~0.28 and then only creeps down (0.17 after 8
epochs), the floor being set by the real tokens' share, while the real
next-token loss and accuracy (printed separately) learn at a fraction of the
rate because the real positions get only ~9% of the gradient: real-token
accuracy 0.12 after epoch 0 and 0.48 after 8 epochs, a level the fixed run
passes in its first epoch. The model has mostly learned to predict the pad token.

Fix (one line): nn.CrossEntropyLoss(ignore_index=PAD). Checked: with it the
real-token loss is 1.078 (accuracy 0.677) after epoch 1 and ends at 0.873,
accuracy 0.686, after-word accuracy 0.827.

Source: https://github.com/saahiluppal/catr/issues/12 (caption decoder trained with
CrossEntropyLoss without ignore_index=pad_token_id: "the model must predict [PAD]
token, too") and https://github.com/DaoyuanLi2816/Molecule-Generator/pull/20
("Since padded sequences are mostly padding, the model spent most of its loss
budget learning to predict the pad token"; fixed with cross_entropy(ignore_index=...)).
"""
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(301)

PAD, BOS, EOS, V, L = 0, 1, 2, 26, 64
N = 1200
# each sentence: BOS, a random first word, then 2-5 words that each follow from the one
# before by a fixed successor table (learnable), then EOS
succ = torch.randperm(V - 3) + 3
seqs = torch.full((N, L + 1), PAD)
for i in range(N):
    n = int(torch.randint(3, 7, (1,)))
    row = [BOS, int(torch.randint(3, V, (1,)))]
    for _ in range(n - 1):
        row.append(int(succ[row[-1] - 3]))
    row.append(EOS)
    seqs[i, :len(row)] = torch.tensor(row)
inputs, targets = seqs[:, :-1], seqs[:, 1:]
real = targets != PAD
learnable = real & (inputs > EOS)  # targets after a word: the successor or EOS
print(f"padding share of target positions: {1 - real.float().mean().item():.3f}")


class GRULM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.out = nn.Linear(64, V)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.out(h)


model = GRULM()
optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
criterion = nn.CrossEntropyLoss()  # BUG: no ignore_index=PAD

step = 0
for epoch in range(8):
    perm = torch.randperm(N)
    for i in range(0, N, 24):
        idx = perm[i:i + 24]
        optimizer.zero_grad()
        logits = model(inputs[idx])
        loss = criterion(logits.reshape(-1, V), targets[idx].reshape(-1))
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():
        logits = model(inputs)
        all_loss = criterion(logits.reshape(-1, V), targets.reshape(-1)).item()
        real_loss = F.cross_entropy(logits[real], targets[real]).item()
        real_acc = (logits[real].argmax(-1) == targets[real]).float().mean().item()
        succ_acc = (logits[learnable].argmax(-1) == targets[learnable]).float().mean().item()
        pad_acc = (logits[~real].argmax(-1) == PAD).float().mean().item()
    print(f"epoch {epoch} loss {all_loss:.4f} real-token loss {real_loss:.4f} "
          f"real-token accuracy {real_acc:.3f} after-word accuracy {succ_acc:.3f} pad accuracy {pad_acc:.3f}")
