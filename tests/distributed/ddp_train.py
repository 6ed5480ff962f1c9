"""A tiny DistributedDataParallel training script for the torchrun tests (gloo, CPU).

    torchrun --nproc_per_node=2 ddp_train.py OUTDIR [--steps N] [--nan-rank R --nan-step S]
        [--watch LOGDIR] [--manual-allreduce]

Each rank writes ``OUTDIR/rank<r>.json``: the parameters' checksum, the losses, the reduced
gradient norm it computed itself after each backward (a brute-force reference for the log's
``grad_norm``), the process group's collective sequence number (every collective, the C++
reducer's included) and the Python-level ``torch.distributed`` collective calls, counted by
wrapping them before anything else runs. ``--watch`` records with ``gradprobe.watch`` inside
the script; under ``gradprobe run`` the runner records instead. ``--manual-allreduce``
averages the gradients with ``dist.all_reduce`` instead of DDP (for TORCH_DISTRIBUTED_DEBUG,
which cannot wrap DDP on this CPU build).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn as nn

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
               "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "broadcast_object_list", "send", "recv",
               "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced")
CALLS: collections.Counter[str] = collections.Counter()


def _count(name: str, fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return counted


for _owner in (dist, c10d):
    for _name in COLLECTIVES:
        if hasattr(_owner, _name):
            setattr(_owner, _name, _count(_name, getattr(_owner, _name)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nan-rank", type=int, default=-1)
    p.add_argument("--nan-step", type=int, default=3)
    p.add_argument("--watch", default=None)
    p.add_argument("--manual-allreduce", action="store_true")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = c10d._get_default_group()
    seq0 = pg._get_sequence_number_for_group()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    model = net if args.manual_allreduce else nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = None
    if args.watch:
        import gradprobe

        probe = gradprobe.watch(model, opt, logdir=args.watch)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    losses, norms = [], []
    for step in range(args.steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        if rank == args.nan_rank and step == args.nan_step:
            x[0, 0] = float("nan")  # a corrupt sample in this rank's shard
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if args.manual_allreduce:
            for prm in net.parameters():
                dist.all_reduce(prm.grad)
                prm.grad /= world
        with torch.no_grad():
            norms.append(float(torch.linalg.vector_norm(torch.stack([prm.grad.norm() for prm in net.parameters()]))))
        opt.step()
        losses.append(float(loss.detach()))
    if probe is not None:
        probe.close()
    seq1 = pg._get_sequence_number_for_group()
    h = hashlib.sha256()
    for prm in net.parameters():
        h.update(prm.detach().numpy().tobytes())
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "checksum": h.hexdigest()[:16], "losses": losses,
                   "grad_norms": norms, "collective_seq": seq1 - seq0, "collective_calls": dict(CALLS)}, f)
    # both ranks tear gloo down together (after the counts above): a rank destroying its group
    # while the other is still in it sometimes aborts ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
