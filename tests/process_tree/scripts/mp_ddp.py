"""A tiny DistributedDataParallel job (gloo, CPU) started by the script itself, the way
PyTorch's own DDP tutorial does it, for the process-tree tests.

    python mp_ddp.py OUTDIR --launch mp.spawn|spawn|fork|forkserver [--steps N]
        [--nan-rank R --nan-step S] [--delay SECONDS]

``mp.spawn`` is ``torch.multiprocessing.spawn``; the others start two
``multiprocessing`` processes with that start method. The parent never trains. Each rank
writes ``OUTDIR/rank<r>.json`` (parameter checksum, losses) when it ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn as nn

WORLD = 2


def train(rank: int, port: int, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    losses = []
    for step in range(args.steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        if rank == args.nan_rank and step == args.nan_step:
            x[0, 0] = float("nan")  # a corrupt sample in this rank's shard
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if args.delay:
            time.sleep(args.delay)
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().numpy().tobytes())
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "checksum": h.hexdigest()[:16], "losses": losses}, f)
    # both ranks tear gloo down together: a rank destroying its group while the other is
    # still in it sometimes aborts ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("--launch", default="mp.spawn", choices=["mp.spawn", "spawn", "fork", "forkserver"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nan-rank", type=int, default=-1)
    p.add_argument("--nan-step", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.launch == "mp.spawn":
        tmp.spawn(train, args=(port, args), nprocs=WORLD)  # train(index, port, args)
    else:
        ctx = multiprocessing.get_context(args.launch)
        procs = [ctx.Process(target=train, args=(r, port, args)) for r in range(WORLD)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            raise SystemExit(f"a rank failed: {[proc.exitcode for proc in procs]}")
    print("job done")


if __name__ == "__main__":
    main()
