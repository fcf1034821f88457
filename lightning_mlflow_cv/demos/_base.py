"""What the example DataModules and LightningModules share (the digits demo's too): sets built once, the
three loaders, the three steps and the optimiser.

Subclasses keep their own typed ``__init__`` and docstring: LightningCLI builds a YAML's ``init_args`` from the
``__init__`` of the class the YAML names, so these bases take no constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

#: The split a dataset is built for.
Split = Literal["train", "val", "test"]


class ExampleDataModule(pl.LightningDataModule):
    """Train/val/test sets built once by :meth:`setup` (fit then test reuse them), one loader each.

    A subclass saves its ``__init__`` arguments with ``save_hyperparameters()``: ``batch_size`` and, where it takes
    one, ``num_workers`` feed the loaders. It builds its sets with :meth:`make_split` (one seeded set per split)
    or, when the splits come from one fixed dataset, by overriding :meth:`make_sets`.

    The class attributes ``mean``/``std`` (the normalisation the images carry) and ``class_names`` are what the
    plugin's callbacks read from ``trainer.datamodule``; ``collate_fn`` is the loaders'.
    """

    mean: ClassVar[tuple[float, ...]] = (0.0, 0.0, 0.0)
    std: ClassVar[tuple[float, ...]] = (1.0, 1.0, 1.0)
    class_names: ClassVar[list[str] | None] = None
    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        """The ``split`` set of ``n`` samples generated from ``seed``."""
        raise NotImplementedError(f"{type(self).__name__} must define make_split(n, seed, split) or make_sets()")

    def make_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Train, val and test sets: ``num_train`` samples from ``seed``, then ``num_val`` from ``seed + 1`` and
        ``num_val`` from ``seed + 2`` (so the three never share an image)."""
        h = self.hparams
        return (
            self.make_split(h.num_train, h.seed, "train"),
            self.make_split(h.num_val, h.seed + 1, "val"),
            self.make_split(h.num_val, h.seed + 2, "test"),
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            self.train_set, self.val_set, self.test_set = self.make_sets()

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        workers = h.get("num_workers", 0)
        return DataLoader(ds, h.batch_size, shuffle=shuffle, num_workers=workers, collate_fn=self.collate_fn)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class ExampleModule(pl.LightningModule):
    """Steps and optimiser of the example models.

    ``training_step``/``validation_step``/``test_step`` return :meth:`_step` of the batch with ``"train"``/
    ``"val"``/``"test"`` (a model that trains differently overrides ``training_step``). ``configure_optimizers``
    builds ``optimizer_class`` (``lr`` from the hyperparameters, ``weight_decay``) with a cosine schedule over
    ``max_epochs``.
    """

    optimizer_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    weight_decay: ClassVar[float] = 0  # as torch.optim.Adam's default (an int: logged optimiser settings unchanged)

    def _step(self, batch: Any, stage: Split) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define _step(batch, stage)")

    def log_stage(self, stage: Split, name: str, value: Tensor) -> None:
        """Log ``<stage>/<name>`` on the progress bar: per step and per epoch in training, per epoch (synced over
        ranks) in validation and test."""
        on_step = stage == "train"
        self.log(f"{stage}/{name}", value, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=not on_step)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, "test")

    @override
    def configure_optimizers(self) -> Any:
        opt = self.optimizer_class(self.parameters(), lr=self.hparams.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
