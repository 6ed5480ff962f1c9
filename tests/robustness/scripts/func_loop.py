"""A training loop that leans on torch.func and autograd's extension points, for the
no-observer-effect tests: per-sample gradients (vmap(grad(functional_call))), a Jacobian
(jacrev), a gradient penalty (double backward, create_graph=True), activation
checkpointing (non-reentrant), saved-tensor hooks of the user's own (save_on_cpu and a
pack/unpack pair), and torch.autograd.grad.

    python func_loop.py [STEPS]

Prints one JSON line: a checksum of the parameters and of every intermediate result.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.checkpoint import checkpoint


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 1)
        self.checkpointed = True  # torch.func transforms do not support checkpoint's saved-tensor hooks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.checkpointed:
            h = checkpoint(lambda t: torch.relu(self.b(t)), h, use_reentrant=False)
        else:
            h = torch.relu(self.b(h))
        return self.c(h)


def main(argv: list[str]) -> dict:
    steps = int(argv[0]) if argv else 4
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    h = hashlib.sha256()
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t.clone()

    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def sample_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        model.checkpointed = False
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
        norms = torch.stack([v.flatten(1).norm(dim=1) for v in per_sample.values()]).sum(0)
        jac = jacrev(lambda inp: functional_call(model, params, (inp,)))(x[:2])
        model.checkpointed = True
        with torch.autograd.graph.save_on_cpu():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x.requires_grad_(True))
                loss = nn.functional.mse_loss(out, y)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (gx.norm(dim=1) - 1).pow(2).mean()
        total = loss + 0.1 * penalty
        opt.zero_grad()
        total.backward()
        opt.step()
        for t in (norms, jac, gx.detach(), total.detach()):
            h.update(t.detach().contiguous().numpy().tobytes())
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    h.update(torch.randn(4).numpy().tobytes())
    return {"checksum": h.hexdigest()[:16], "packed": len(packed)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
