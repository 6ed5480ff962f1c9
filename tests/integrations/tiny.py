"""Tiny real Hugging Face and Lightning training runs (CPU, seconds, no downloads).

Models are built from configs in code and fed random data made here, so nothing is fetched.
Imports of the frameworks happen inside the functions: importing this module is free.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _token_dataset(n: int, seq: int = 16, vocab: int = 100, seed: int = 1) -> Any:
    class TokenDataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(seed)
            # a learnable pattern: each sequence counts up from a random start
            start = torch.randint(0, vocab, (n, 1), generator=g)
            self.x = (start + torch.arange(seq)) % vocab

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i], "labels": self.x[i]}

    return TokenDataset()


def hf_tiny_run(output_dir: str, *, lr: float = 1e-3, max_steps: int = 30, report_to: list[str] | None = None,
                callbacks: list[Any] | None = None, eval_steps: int | None = 10, save_state: bool = True,
                seed: int = 0) -> Any:
    """Trains a 1-layer GPT-2 (vocab 100, width 32) with the real ``Trainer``; returns it.

    ``trainer.save_state()`` writes ``<output_dir>/trainer_state.json`` with HF's own writer.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    kwargs: dict[str, Any] = {}
    if eval_steps:
        kwargs.update(eval_strategy="steps", eval_steps=eval_steps)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=report_to or [],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **kwargs,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_token_dataset(128),
        eval_dataset=_token_dataset(16, seed=2) if eval_steps else None,
        callbacks=callbacks or [],
    )
    trainer.train()
    if save_state:
        trainer.save_state()
    return trainer


def lightning_module(lr: float = 0.05, optimizer: str = "SGD", fail_at_step: int | None = None) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import grad_norm

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if fail_at_step is not None and self.global_step >= fail_at_step:
                raise RuntimeError("boom: failing on purpose")
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self) -> Any:
            return getattr(torch.optim, optimizer)(self.parameters(), lr=lr)

    return Regressor()


def regression_loader(n: int = 256, batch: int = 32, seed: int = 0) -> Any:
    """y = x @ w + noise with one fixed w (train and validation sets differ only by ``seed``)."""
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ w + 0.05 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def lightning_tiny_run(root: str, *, lr: float = 0.05, optimizer: str = "SGD", max_epochs: int = 4,
                       callbacks: list[Any] | None = None, csv: bool = True, tensorboard: bool = False,
                       validate: bool = True,
                       plugins: list[Any] | None = None, fail_at_step: int | None = None,
                       gradient_clip_val: float | None = None, seed: int = 0) -> Any:
    """Fits a small MLP regressor with the real ``Trainer`` (CSVLogger + LearningRateMonitor);
    ``metrics.csv`` lands in ``<root>/lightning_logs/version_0/`` (TensorBoardLogger events in
    ``<root>/tb/lightning_logs/version_0/`` with ``tensorboard=True``). Returns the trainer."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(seed, verbose=False)
    loader = regression_loader()
    cbs = list(callbacks or [])
    loggers: list[Any] = []
    if csv:
        loggers.append(CSVLogger(root))
    if tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(os.path.join(root, "tb")))
    if loggers:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=loggers or False,
        log_every_n_steps=1,
        callbacks=cbs,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        plugins=plugins,
        gradient_clip_val=gradient_clip_val,
        num_sanity_val_steps=0,
    )
    trainer.fit(lightning_module(lr, optimizer, fail_at_step), loader, regression_loader(64, seed=1) if validate else None)
    return trainer


def metrics_csv(root: str) -> str:
    return os.path.join(root, "lightning_logs", "version_0", "metrics.csv")
