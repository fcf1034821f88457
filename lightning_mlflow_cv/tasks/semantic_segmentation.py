"""Semantic segmentation: logits ``(N, C, H, W)`` and masks ``(N, H, W)``; mIoU, pixel accuracy, per-class IoU,
confusion matrix; the served model returns argmax class-id masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv.tasks._base import CVTask, PanelOptions, num
from lightning_mlflow_cv.tasks._dense import (
    check_index_targets,
    check_logits,
    confusion_stats,
)
from lightning_mlflow_cv.tasks._registry import register


@dataclass(frozen=True)
class SegmentationOutput:
    """Checked segmentation outputs: ``logits`` ``(N, C, H, W)`` float, ``targets`` ``(N, H, W)`` long."""

    logits: Tensor
    targets: Tensor


def segmentation_errors(logits: Tensor, targets: Tensor) -> Tensor:
    """Per image: ``1 - mean IoU`` of the argmax prediction over the classes present in its target or prediction;
    target ids outside ``[0, C)`` (an ignore index) are left out; NaN for an image without a valid pixel.

    Example::

        >>> t = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [1, 1]]])
        >>> logits = torch.stack([torch.nn.functional.one_hot(t[0], 2), torch.ones(2, 2, 2).long()]).permute(0, 3, 1, 2)
        >>> segmentation_errors(logits.float(), t).tolist()  # right; then everything class 0 (mIoU (0.5 + 0) / 2)
        [0.0, 0.75]
    """
    n, c = logits.shape[:2]
    pred = logits.detach().argmax(1).reshape(n, -1)
    t = targets.to(pred.device).reshape(n, -1)
    valid = (t >= 0) & (t < c)
    img = torch.arange(n, device=pred.device)[:, None].expand_as(t)
    flat = (img * c * c + t.clamp(0, c - 1) * c + pred)[valid]
    cm = torch.bincount(flat, minlength=n * c * c).reshape(n, c, c).double()
    tp = cm.diagonal(dim1=1, dim2=2)
    union = cm.sum(2) + cm.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1.0), torch.zeros_like(tp))
    miou = iou.sum(1) / present.sum(1).clamp_min(1)
    return torch.where(present.any(1), 1.0 - miou, torch.full_like(miou, float("nan")))


class SemanticSegmentation(CVTask):
    """``"semantic-segmentation"`` (``"segmentation"``): ``{"logits": (N, C, H, W) float, "targets": (N, H, W) int}``."""

    name = "semantic-segmentation"
    aliases = ("segmentation",)
    pred_key = "logits"
    expected_format = '{"logits": (N, C, H, W) float tensor, "targets": (N, H, W) integer tensor}'
    expected_output = "logits Tensor (N, C, H, W) with N = batch size"
    expected_target = "integer masks Tensor (N, H, W)"
    postprocess = "masks"
    main_metric = "mIoU"
    badness_name = "1 - mIoU"

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> Tensor:
        return check_logits(preds, n, num_classes, spatial=True)

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> Tensor:
        return check_index_targets(targets, preds, spatial=True, n=n)

    def align_for_display(self, preds: Tensor, targets: Any) -> Tensor:
        if isinstance(targets, Tensor) and targets.ndim == 3 and tuple(targets.shape[-2:]) != tuple(preds.shape[-2:]):
            preds = torch.nn.functional.interpolate(
                preds.float(), size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False
            )
        return preds

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> SegmentationOutput:
        return SegmentationOutput(preds, targets)

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        from torchmetrics import classification as C

        return {"confmat": C.MulticlassConfusionMatrix(cfg.num_classes, ignore_index=cfg.ignore_index)}

    def update_metrics(self, metrics: dict[str, Any], out: SegmentationOutput) -> None:
        metrics["confmat"].update(out.logits.detach().argmax(1), out.targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        names = cfg.class_names
        scalars: dict[str, float] = {}
        confmat = metrics["confmat"].compute().cpu()
        stats = confusion_stats(confmat)
        iou = stats["iou"]
        valid = ~torch.isnan(iou)
        scalars["mIoU"] = float(iou[valid].mean()) if bool(valid.any()) else float("nan")
        scalars["pixel_acc"] = float(stats["accuracy"])
        for i, name in enumerate(names):
            if bool(valid[i]):
                scalars[f"per_class_IoU/{name}"] = float(iou[i])
        table = [
            {
                "class": name,
                "support_pixels": int(stats["support"][i]),
                "iou": num(iou[i]),
                "pixel_acc": num(stats["recall"][i]),
                "precision": num(stats["precision"][i]),
            }
            for i, name in enumerate(names)
        ]
        return scalars, {"confmat": confmat, "table": table}

    def panel(self, img: Tensor, src_size: tuple[int, int], out: SegmentationOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        logits = out.logits[i]
        return _panels.segmentation_panel(img, out.targets[i], logits.argmax(0), logits.shape[0], opts.background_class,
                                        font_size=opts.font_size)  # fmt: skip

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        n = opts.num_classes or (int(target.max()) + 1 if target.numel() else 1)
        return _panels.segmentation_panel(img, target, None, n, opts.background_class, font_size=opts.font_size)

    def badness(self, out: SegmentationOutput, opts: PanelOptions) -> Tensor:
        return segmentation_errors(out.logits, out.targets)

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        """Mean IoU over the whole dataset (one confusion matrix, then the mean over the classes present in targets
        or predictions, as CVMetricsCallback's ``val/mIoU``), not a mean of per-image scores; pixel accuracy."""
        import numpy as np
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        from lightning_mlflow_cv.tasks._dense import confusion_stats

        pred = torch.from_numpy(np.concatenate(preds)).long()
        target = torch.cat([torch.as_tensor(t) for t in targets]).long()
        num_classes = int(max(pred.max(), target.max())) + 1
        iou = confusion_stats(multiclass_confusion_matrix(pred.flatten(), target.flatten(), num_classes))["iou"]
        miou = iou[~torch.isnan(iou)].mean()
        return {"mean_iou": float(miou), "pixel_accuracy": float((pred == target).float().mean())}


TASK = register(SemanticSegmentation)
