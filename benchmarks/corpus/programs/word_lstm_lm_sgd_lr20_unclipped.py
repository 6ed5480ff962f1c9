"""Faulty: the pytorch/examples word_language_model recipe (2-layer LSTM, plain SGD at lr 20, bptt 35, lr/4 on a worse validation loss) with its gradient-clipping line removed: the gradients explode.

The recipe only works at lr 20 because clip_grad_norm_(model.parameters(), 0.25) bounds
every step. Without that line, the first steps' gradients, multiplied by 20, throw the
LSTM into a regime where the gradient norm grows by orders of magnitude and the loss
jumps far above ln(V); the lr/4 annealing then freezes the damage in. Corpus: word ids from
a small synthetic grammar (determiner, adjective, noun, verb, ...), batchified into 20
streams like the example, hidden state repackaged (detached) between bptt windows.
One-line fix: restore torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25) before
optimizer.step() (checked with FIXED=1: numbers in the corpus entry).

Source: https://github.com/pytorch/examples/issues/95 (the word_language_model baseline
and its gradient clipping) and https://github.com/asappresearch/sru/issues/2 (the LSTM
language model run stopped on a nan/inf loss: "i suspect LSTM gets gradient explosion").
"""
import math
import os

import torch
import torch.nn as nn

torch.manual_seed(61)

DET = ["the", "a", "every", "some"]
ADJ = ["red", "old", "tiny", "quiet", "bright", "heavy"]
NOUN = ["cat", "dog", "river", "house", "king", "tree", "boat", "bird", "child", "stone"]
VERB = ["sees", "likes", "finds", "pushes", "follows", "hears", "builds"]
PREP = ["near", "under", "behind", "with"]
vocab = DET + ADJ + NOUN + VERB + PREP + [".", "<eos>"]
V = len(vocab)
wid = {w: i for i, w in enumerate(vocab)}


def pick(lst):
    return lst[torch.randint(0, len(lst), (1,)).item()]


def noun_phrase():
    words = [pick(DET)]
    if torch.rand(1).item() < 0.5:
        words.append(pick(ADJ))
    words.append(pick(NOUN))
    if torch.rand(1).item() < 0.25:
        words += [pick(PREP), pick(DET), pick(NOUN)]
    return words


def corpus(n_sent):
    ids = []
    for _ in range(n_sent):
        ids += [wid[w] for w in noun_phrase() + [pick(VERB)] + noun_phrase() + [".", "<eos>"]]
    return torch.tensor(ids)


def batchify(data, bsz):
    nb = data.size(0) // bsz
    return data[:nb * bsz].view(bsz, -1).t().contiguous()


train_data = batchify(corpus(2600), 20)
val_data = batchify(corpus(300), 10)
BPTT = 35


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    return tuple(v.detach() for v in h)


def get_batch(source, i):
    seq_len = min(BPTT, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


model = RNNModel(V, 64, 64, 2)
criterion = nn.CrossEntropyLoss()
lr = 20.0
optimizer = torch.optim.SGD(model.parameters(), lr=lr)
print(f"vocabulary {V} words, ln(V) = {math.log(V):.3f}; train tokens {train_data.numel()}")


def evaluate(source):
    model.eval()
    total, hidden = 0.0, model.init_hidden(source.size(1))
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, BPTT):
            x, y = get_batch(source, i)
            out, hidden = model(x, hidden)
            total += len(x) * criterion(out.view(-1, V), y).item()
    return total / (len(source) - 1)


best_val = None
step = 0
for epoch in range(6):
    model.train()
    hidden = model.init_hidden(20)
    for i in range(0, train_data.size(0) - 1, BPTT):
        x, y = get_batch(train_data, i)
        hidden = repackage_hidden(hidden)
        optimizer.zero_grad()
        out, hidden = model(x, hidden)
        loss = criterion(out.view(-1, V), y)
        loss.backward()
        gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
        if os.environ.get("FIXED"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        # BUG: the example's clip_grad_norm_(model.parameters(), 0.25) line was removed here
        optimizer.step()
        if step % 5 == 0:
            print(f"step {step:3d} loss {loss.item():.4g} grad norm {gnorm:.4g}")
        step += 1
    val_loss = evaluate(val_data)
    print(f"epoch {epoch} valid loss {val_loss:.4g} valid ppl {math.exp(min(val_loss, 50)):.4g} lr {lr:g}")
    if best_val is None or val_loss < best_val:
        best_val = val_loss
    else:
        lr /= 4.0
        for g in optimizer.param_groups:
            g["lr"] = lr
