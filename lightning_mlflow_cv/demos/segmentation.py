"""Semantic segmentation example: a small encoder-decoder (U-Net style) on generated shapes.

Run it with the console script (``examples/segmentation/config.yaml``)::

    lightning-mlflow-cv fit --config examples/segmentation/config.yaml

``validation_step``/``test_step`` return the segmentation output convention
(``{"logits": (N, C, H, W), "targets": (N, H, W)}``), which ``CVMetricsCallback(task="semantic-segmentation")``
turns into ``val/mIoU``, ``val/pixel_acc``, ``val/per_class_IoU/<class>`` and a confusion matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from lightning_mlflow_cv.demos._base import ExampleDataModule, ExampleModule, Split
from lightning_mlflow_cv.demos.shapes import SHAPE_CLASSES, make_shapes

#: Normalisation of the generated images (PredictionGridCallback undoes it for display).
SHAPES_MEAN = (0.35, 0.35, 0.35)
SHAPES_STD = (0.3, 0.3, 0.3)


def _normalised(n: int, size: int, seed: int) -> Dataset:
    s = make_shapes(n, size=size, seed=seed)
    mean = torch.tensor(SHAPES_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SHAPES_STD).view(1, 3, 1, 1)
    return TensorDataset((s.images - mean) / std, s.masks)


class ShapesSegmentationDataModule(ExampleDataModule):
    """Train/val/test sets of generated shapes with per-pixel class masks (0 = background).

    Args:
        num_train: Training images.
        num_val: Validation images (also the test size).
        image_size: Side of the square images.
        batch_size: Batch size of every loader.
        seed: Base seed (train ``seed``, val ``seed + 1``, test ``seed + 2``).
        num_workers: DataLoader workers.

    Example::

        trainer.fit(ShapesSegmenter(), datamodule=ShapesSegmentationDataModule())
    """

    class_names = SHAPE_CLASSES
    mean = SHAPES_MEAN
    std = SHAPES_STD

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 128,
        image_size: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        return _normalised(n, self.hparams.image_size, seed)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Three-level encoder-decoder with skip connections; logits ``(N, num_classes, H, W)`` (H, W divisible by 8).

    Three poolings give the bottleneck a receptive field of about 60 pixels, enough to tell a circle's interior
    from a square's by their outlines.
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.mid = _block(4 * w, 4 * w)
        self.up3, self.dec3 = nn.ConvTranspose2d(4 * w, 4 * w, 2, 2), _block(8 * w, 2 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(2 * w, 2 * w, 2, 2), _block(4 * w, w)
        self.up1, self.dec1 = nn.ConvTranspose2d(w, w, 2, 2), _block(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        pool = nn.functional.max_pool2d
        e1 = self.enc1(x)
        e2 = self.enc2(pool(e1, 2))
        e3 = self.enc3(pool(e2, 2))
        m = self.mid(pool(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(m), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class ShapesSegmenter(ExampleModule):
    """TinyUNet trained with cross-entropy. ``validation_step``/``test_step`` return ``{"logits", "targets"}``.

    Args:
        num_classes: Classes including the background (index 0).
        width: Channels of the first level.
        lr: Adam learning rate.

    Example::

        trainer.fit(ShapesSegmenter(), datamodule=ShapesSegmentationDataModule())
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyUNet(num_classes, width)
        self.example_input_array = torch.zeros(1, 3, 64, 64)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def _step(self, batch: Any, stage: Split) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log_stage(stage, "loss", loss)
        return {"loss": loss, "logits": logits.detach(), "targets": y}
