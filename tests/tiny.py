"""A tiny deterministic LightningModule for logger tests (8 metrics per step)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_METRICS = 8


class TinyModel(pl.LightningModule):
    def __init__(self, lr: float = 0.05, fail_at_step: int | None = None, interrupt_at_step: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at_step is not None and self.global_step == self.hparams.fail_at_step:
            raise RuntimeError("planted failure")
        if self.hparams.interrupt_at_step is not None and self.global_step == self.hparams.interrupt_at_step:
            raise KeyboardInterrupt
        x, y = batch
        loss = nn.functional.cross_entropy(self.layer(x), y)
        for k in range(N_METRICS):
            self.log(f"train/m{k}", loss.detach() + k)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loaders(n: int = 64, batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=16)


def trainer(logger, max_epochs: int = 2, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=max_epochs,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        **kw,
    )


def history_counts(client, run_id: str) -> dict[str, int]:
    run = client.get_run(run_id)
    return {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics}


@contextlib.contextmanager
def ctrl_c() -> Iterator[None]:
    """Around a fit whose model raises KeyboardInterrupt (``interrupt_at_step``): Lightning shuts down gracefully
    (loggers finalized) and then, on newer releases, exits with status 1; Lightning 2.2 returns from ``fit``."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code != 1:
            raise
