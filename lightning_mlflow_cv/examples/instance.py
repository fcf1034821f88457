"""Instance segmentation example: a small torchvision Mask R-CNN (no pretrained weights) on generated shapes.

Run it with the console script (``examples/instance/config.yaml``)::

    lightning-mlflow-cv fit --config examples/instance/config.yaml

The shapes never overlap, so each shape's pixels are its instance mask. ``validation_step``/``test_step``
return the instance output convention (torchvision's Mask R-CNN output with masks squeezed to ``(K, H, W)``, and
targets with ``boxes``, ``labels``, ``masks``), which ``CVMetricsCallback(task="instance")`` turns into
``val/mask_AP``, ``val/bbox_AP``, ``val/mask_AP50``, ``val/bbox_AP50`` and a per-class mask/box AP table.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mlflow_cv.examples.detection import collate_detection, tiny_backbone
from lightning_mlflow_cv.examples.shapes import SHAPE_CLASSES, make_shapes


class ShapesInstanceDataset(Dataset):
    """Generated shapes as ``(image (3, S, S), {"boxes", "labels", "masks" (K, S, S) bool})``."""

    def __init__(self, n: int, size: int = 64, seed: int = 0) -> None:
        s = make_shapes(n, size=size, seed=seed)
        self.images = s.images
        self.targets = []
        for mask, boxes, labels in zip(s.masks, s.boxes, s.labels):
            inst = []
            for b, lab in zip(boxes.long().tolist(), labels.tolist()):
                m = torch.zeros_like(mask, dtype=torch.bool)
                m[b[1] : b[3], b[0] : b[2]] = mask[b[1] : b[3], b[0] : b[2]] == lab
                inst.append(m)
            masks = torch.stack(inst) if inst else torch.zeros(0, size, size, dtype=torch.bool)
            self.targets.append({"boxes": boxes, "labels": labels, "masks": masks})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], self.targets[i]


class ShapesInstanceDataModule(pl.LightningDataModule):
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

    def __init__(self, num_train: int = 384, num_val: int = 96, image_size: int = 64, batch_size: int = 16,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.class_names = SHAPE_CLASSES
        self.mean = (0.0, 0.0, 0.0)
        self.std = (1.0, 1.0, 1.0)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        h = self.hparams
        self.train_set = ShapesInstanceDataset(h.num_train, h.image_size, h.seed)
        self.val_set = ShapesInstanceDataset(h.num_val, h.image_size, h.seed + 1)
        self.test_set = ShapesInstanceDataset(h.num_val, h.image_size, h.seed + 2)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, self.hparams.batch_size, shuffle=shuffle, collate_fn=collate_detection)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


def build_mask_rcnn(num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32) -> nn.Module:
    """A small :class:`torchvision.models.detection.MaskRCNN`: tiny backbone, one feature map, a two-layer mask
    head, no weights."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    s = image_size / 64
    anchors = AnchorGenerator(sizes=((int(8 * s), int(16 * s), int(24 * s)),), aspect_ratios=((0.5, 1.0, 2.0),))
    return MaskRCNN(
        tiny_backbone(width),
        num_classes=None,  # set by the box and mask predictors below
        box_predictor=FastRCNNPredictor(128, num_classes),
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(width, [width, width], 1),
        mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        box_head=TwoMLPHead(width * 7 * 7, 128),
        rpn_pre_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_train=150,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=64,
        box_detections_per_img=20,
        box_score_thresh=0.05,
    )


class ShapesMaskRCNN(pl.LightningModule):
    """Mask R-CNN on generated shapes; ``forward`` returns torchvision's output with masks ``(K, H, W)``.

    Args:
        num_classes: Classes including the background (index 0).
        image_size: Input side, used to size the anchors.
        width: Backbone and mask-head channels.
        lr: AdamW learning rate.

    Example::

        trainer.fit(ShapesMaskRCNN(), datamodule=ShapesInstanceDataModule())
    """

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), image_size: int = 64, width: int = 32, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_mask_rcnn(num_classes, image_size, width)

    def forward(self, images: list[Tensor] | Tensor) -> list[dict[str, Tensor]]:
        out = self.model(list(images))
        return [dict(d, masks=d["masks"][:, 0]) for d in out]  # (K, 1, H, W) probabilities -> (K, H, W)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _eval_step(self, batch: Any) -> dict[str, Any]:
        images, targets = batch
        return {"preds": self(images), "targets": targets}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
