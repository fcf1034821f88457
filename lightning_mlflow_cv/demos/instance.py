"""Instance segmentation example: a small torchvision Mask R-CNN (no pretrained weights) on generated shapes.

Run it with the console script (``examples/instance/config.yaml``)::

    lightning-mlflow-cv fit --config examples/instance/config.yaml

The shapes never overlap, so each shape's pixels are its instance mask. ``validation_step``/``test_step``
return the instance output convention (torchvision's Mask R-CNN output with masks squeezed to ``(K, H, W)``, and
targets with ``boxes``, ``labels``, ``masks``), which ``CVMetricsCallback(task="instance")`` turns into
``val/mask_AP``, ``val/bbox_AP``, ``val/mask_AP50``, ``val/bbox_AP50`` and a per-class mask/box AP table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_mlflow_cv.demos._base import ExampleDataModule, Split
from lightning_mlflow_cv.demos.detection import (
    RCNNModule,
    ShapesDetectionDataset,
    collate_detection,
    rcnn_options,
    tiny_backbone,
)
from lightning_mlflow_cv.demos.shapes import SHAPE_CLASSES, Shapes


class ShapesInstanceDataset(ShapesDetectionDataset):
    """Generated shapes as ``(image (3, S, S), {"boxes", "labels", "masks" (K, S, S) bool})``."""

    @override
    def target(self, s: Shapes, i: int) -> dict[str, Tensor]:
        mask, inst = s.masks[i], []
        for b, lab in zip(s.boxes[i].long().tolist(), s.labels[i].tolist(), strict=True):
            m = torch.zeros_like(mask, dtype=torch.bool)
            m[b[1] : b[3], b[0] : b[2]] = mask[b[1] : b[3], b[0] : b[2]] == lab
            inst.append(m)
        masks = torch.stack(inst) if inst else torch.zeros(0, *mask.shape, dtype=torch.bool)
        return {**super().target(s, i), "masks": masks}


class ShapesInstanceDataModule(ExampleDataModule):
    """Train/val/test sets of :class:`ShapesInstanceDataset` (lists of images and target dicts per batch).

    Args:
        num_train: Training images.
        num_val: Validation images (also the test size).
        image_size: Side of the square images.
        batch_size: Batch size of every loader.
        seed: Base seed.

    Example::

        trainer.fit(ShapesMaskRCNN(), datamodule=ShapesInstanceDataModule())
    """

    class_names = SHAPE_CLASSES
    collate_fn = staticmethod(collate_detection)

    def __init__(self, num_train: int = 384, num_val: int = 96, image_size: int = 64, batch_size: int = 16,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        return ShapesInstanceDataset(n, self.hparams.image_size, seed)


def build_mask_rcnn(num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32) -> nn.Module:
    """A small :class:`torchvision.models.detection.MaskRCNN`: tiny backbone, one feature map, a two-layer mask
    head, no weights."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    return MaskRCNN(
        tiny_backbone(width),
        num_classes=None,  # set by the box and mask predictors below
        box_predictor=FastRCNNPredictor(128, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(width, [width, width], 1),
        mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        box_head=TwoMLPHead(width * 7 * 7, 128),
        **rcnn_options(image_size),
    )


class ShapesMaskRCNN(RCNNModule):
    """Mask R-CNN on generated shapes; ``forward`` returns torchvision's output with masks ``(K, H, W)``.

    Args:
        num_classes: Classes including the background (index 0).
        image_size: Input side, used to size the anchors.
        width: Backbone and mask-head channels.
        lr: AdamW learning rate.

    Example::

        trainer.fit(ShapesMaskRCNN(), datamodule=ShapesInstanceDataModule())
    """

    def __init__(
        self, num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32, lr: float = 2e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_mask_rcnn(num_classes, image_size, width)

    @override
    def forward(self, images: list[Tensor] | Tensor) -> list[dict[str, Tensor]]:
        out = self.model(list(images))
        return [dict(d, masks=d["masks"][:, 0]) for d in out]  # (K, 1, H, W) probabilities -> (K, H, W)
