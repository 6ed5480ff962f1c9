"""A training loop with a torch.compile'd model, for the no-observer-effect tests.

    python compile_loop.py [BACKEND] [STEPS]

Prints one JSON line: a checksum of the parameters (and of the next draw of the RNG
stream), the graph breaks and graphs dynamo counted, and the losses.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import torch._dynamo
import torch.nn as nn


def main(argv: list[str]) -> dict:
    backend = argv[0] if argv else "aot_eager"
    steps = int(argv[1]) if len(argv) > 1 else 6
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        loss = nn.functional.mse_loss(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        losses.append(float(loss.detach()))
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    h.update(torch.randn(4).numpy().tobytes())
    counters = torch._dynamo.utils.counters
    out = {"checksum": h.hexdigest()[:16], "graph_breaks": sum(counters["graph_break"].values()),
           "unique_graphs": counters["stats"]["unique_graphs"], "losses": losses}
    torch._dynamo.reset()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
