"""Object detection example: a small torchvision Faster R-CNN (no pretrained weights) on generated shapes.

Run it with the console script (``examples/detection/config.yaml``)::

    lightning-mlflow-cv fit --config examples/detection/config.yaml

``validation_step``/``test_step`` return the detection output convention
(``{"preds": [{"boxes", "scores", "labels"}], "targets": [{"boxes", "labels"}]}``), which
``CVMetricsCallback(task="object-detection")`` turns into ``val/mAP50``, ``val/mAP50-95``, precision, recall
and a per-class AP table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_mlflow_cv.demos._base import ExampleDataModule, ExampleModule, Split
from lightning_mlflow_cv.demos.shapes import SHAPE_CLASSES, Shapes, make_shapes


class ShapesDetectionDataset(Dataset):
    """Generated shapes as ``(image (3, S, S) float in [0, 1], {"boxes": (K, 4) xyxy, "labels": (K,)})``."""

    def __init__(self, n: int, size: int = 64, seed: int = 0) -> None:
        s = make_shapes(n, size=size, seed=seed)
        self.images = s.images
        self.targets = [self.target(s, i) for i in range(n)]

    def target(self, s: Shapes, i: int) -> dict[str, Tensor]:
        """Image ``i``'s target dict."""
        return {"boxes": s.boxes[i], "labels": s.labels[i]}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], self.targets[i]


def collate_detection(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and targets as lists (torchvision detection style)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class ShapesDetectionDataModule(ExampleDataModule):
    """Train/val/test sets of generated shapes for detection (different seeds, no download).

    Args:
        num_train: Training images.
        num_val: Validation images (also the test size).
        image_size: Side of the square images.
        batch_size: Batch size of every loader.
        seed: Base seed (train uses ``seed``, val ``seed + 1``, test ``seed + 2``).
        num_workers: DataLoader workers.

    Example::

        dm = ShapesDetectionDataModule(num_train=512)
        trainer.fit(ShapesDetector(), datamodule=dm)
    """

    class_names = SHAPE_CLASSES
    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 128,
        image_size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        return ShapesDetectionDataset(n, self.hparams.image_size, seed)


def tiny_backbone(width: int = 32) -> nn.Module:
    """A 3-stage conv backbone of stride 4 with ``out_channels`` (as torchvision detectors need)."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    body = nn.Sequential(
        block(3, width // 2, 2), block(width // 2, width, 1), block(width, width, 2), block(width, width, 1)
    )
    body.out_channels = width  # type: ignore[assignment]
    return body


def rcnn_options(image_size: int = 64) -> dict[str, Any]:
    """Keyword arguments the small Faster and Mask R-CNNs share: the image size, no normalisation (the images are
    in [0, 1]), anchors scaled to the image, one feature map, few proposals and samples."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    s = image_size / 64
    anchors = AnchorGenerator(sizes=((int(8 * s), int(16 * s), int(24 * s)),), aspect_ratios=((0.5, 1.0, 2.0),))
    return {
        "min_size": image_size,
        "max_size": image_size,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "rpn_anchor_generator": anchors,
        "box_roi_pool": MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        "rpn_pre_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_train": 150,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 128,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 20,
        "box_score_thresh": 0.05,
    }


def build_faster_rcnn(num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32) -> nn.Module:
    """A small :class:`torchvision.models.detection.FasterRCNN`: tiny backbone, one feature map, no weights."""
    from torchvision.models.detection import FasterRCNN

    return FasterRCNN(
        tiny_backbone(width), num_classes=num_classes, representation_size=128, **rcnn_options(image_size)
    )


class RCNNModule(ExampleModule):
    """Training and evaluation of a torchvision R-CNN held as ``self.model`` on ``(images, targets)`` list batches:
    training logs ``train/loss`` (the sum) and each of the model's losses; evaluation returns
    ``{"preds": self(images), "targets": targets}``. AdamW with a cosine schedule."""

    optimizer_class = torch.optim.AdamW
    weight_decay = 1e-4
    model: nn.Module

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=len(images))
        return loss

    @override
    def _step(self, batch: Any, stage: Split) -> dict[str, Any]:
        images, targets = batch
        return {"preds": self(images), "targets": targets}


class ShapesDetector(RCNNModule):
    """Faster R-CNN on generated shapes. ``validation_step``/``test_step`` return ``{"preds", "targets"}``.

    Args:
        num_classes: Classes including the background (index 0).
        image_size: Input side, used to size the anchors.
        width: Backbone channels.
        lr: AdamW learning rate.

    Example::

        trainer.fit(ShapesDetector(), datamodule=ShapesDetectionDataModule())
    """

    def __init__(
        self, num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32, lr: float = 2e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_faster_rcnn(num_classes, image_size, width)

    @override
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(images)
