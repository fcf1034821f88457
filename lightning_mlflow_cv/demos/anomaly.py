"""Anomaly detection example: a small convolutional autoencoder on generated shapes with planted defects.

Run it with the console script (``examples/anomaly/config.yaml``)::

    lightning-mlflow-cv fit --config examples/anomaly/config.yaml

The autoencoder trains on normal images only. An image's anomaly map is its locally averaged reconstruction
error and its score the map's maximum; a defect (a checkerboard patch the autoencoder never saw) reconstructs
badly. ``validation_step``/``test_step`` return the anomaly output convention
(``{"scores": (N,), "targets": (N,), "maps": (N, H, W)}``), which ``CVMetricsCallback(task="anomaly")`` turns into
``val/AUROC``, ``val/AUPRC``, ``val/F1_at_best_threshold`` and ``val/best_threshold``, with PR/ROC curves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from lightning_mlflow_cv.demos._base import ExampleDataModule, ExampleModule, Split
from lightning_mlflow_cv.demos.shapes import make_shapes


def plant_defects(images: Tensor, seed: int, fraction: float = 0.5, size: int = 6) -> tuple[Tensor, Tensor]:
    """A copy of ``images`` ``(N, 3, S, S)`` where ``fraction`` of them get a ``size``-pixel checkerboard patch
    at a random place; returns ``(images, labels)`` with label 1 for the defective ones."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    n, _, s, _ = images.shape
    labels = (torch.rand(n, generator=g) < fraction).long()
    board = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2).float()
    for i in torch.nonzero(labels).flatten().tolist():
        y, x = torch.randint(0, s - size, (2,), generator=g).tolist()
        out[i, :, y : y + size, x : x + size] = board
    return out, labels


class ShapesAnomalyDataModule(ExampleDataModule):
    """Normal generated shapes for training; validation/test sets where half the images have a defect.

    Args:
        num_train: Training images (all normal).
        num_val: Validation images (also the test size).
        image_size: Side of the square images.
        batch_size: Batch size of every loader.
        seed: Base seed.

    Example::

        trainer.fit(ShapesAutoencoder(), datamodule=ShapesAnomalyDataModule())
    """

    class_names = ["normal", "anomalous"]

    def __init__(self, num_train: int = 512, num_val: int = 128, image_size: int = 32, batch_size: int = 32,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        images = make_shapes(n, size=self.hparams.image_size, seed=seed).images
        if split == "train":
            return TensorDataset(images, torch.zeros(n, dtype=torch.long))
        return TensorDataset(*plant_defects(images, seed=seed))


class ShapesAutoencoder(ExampleModule):
    """A small conv autoencoder; ``forward`` returns ``{"scores": (N,), "maps": (N, H, W)}``.

    Args:
        width: Channels of the first encoder stage.
        lr: Adam learning rate.
        smooth: Side of the box filter that averages the squared error into the anomaly map.

    Example::

        out = ShapesAutoencoder()(images)   # out["scores"], out["maps"]
    """

    def __init__(self, width: int = 16, lr: float = 2e-3, smooth: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))

        w = width
        self.encoder = nn.Sequential(conv(3, w, 2), conv(w, 2 * w, 2), conv(2 * w, 2 * w))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), conv(2 * w, w), nn.Upsample(scale_factor=2), nn.Conv2d(w, 3, 3, 1, 1),
            nn.Sigmoid(),
        )  # fmt: skip

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    @override
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        err = (self.reconstruct(x) - x).pow(2).mean(1, keepdim=True)
        k = self.hparams.smooth
        maps = nn.functional.avg_pool2d(err, k, 1, k // 2)[:, 0]
        return {"scores": maps.flatten(1).amax(1), "maps": maps}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        loss = nn.functional.mse_loss(self.reconstruct(x), x)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def _step(self, batch: Any, stage: Split) -> dict[str, Tensor]:
        x, y = batch
        out = self(x)
        self.log(f"{stage}/loss", nn.functional.mse_loss(self.reconstruct(x), x), sync_dist=True)
        return {"scores": out["scores"], "targets": y, "maps": out["maps"]}

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
