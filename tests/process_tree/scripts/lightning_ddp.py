"""Lightning ``Trainer(strategy="ddp", devices=2, accelerator="cpu")``: Lightning starts the
second process itself (the script again, with ``LOCAL_RANK=1`` and no ``RANK``).

    python lightning_ddp.py [--nan-rank R] [--nan-step S]
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(L.LightningModule):
    def __init__(self, nan_rank: int, nan_step: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.nan_rank, self.nan_step = nan_rank, nan_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_rank == self.nan_rank and self.global_step == self.nan_step:
            x = x.clone()
            x[0, 0] = float("nan")  # a corrupt sample in this rank's shard
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nan-rank", type=int, default=-1)
    p.add_argument("--nan-step", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 4), torch.randn(128, 1))
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=os.getcwd())
    trainer.fit(Regressor(args.nan_rank, args.nan_step), DataLoader(data, batch_size=16))
    with open(f"fit-done-rank{trainer.global_rank}", "w"):  # (two processes printing would interleave)
        pass


if __name__ == "__main__":
    main()
