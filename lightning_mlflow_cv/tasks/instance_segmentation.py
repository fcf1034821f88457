"""Instance segmentation: torchvision Mask R-CNN style lists of dicts with per-instance masks; COCO mask and box
AP (torchmetrics ``MeanAveragePrecision(iou_type=("bbox", "segm"))``) overall and per class; the served model
returns instances (boxes, labels, scores, masks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.tasks._base import CVTask, FormatProblem, PanelOptions, num
from lightning_mlflow_cv.tasks._registry import register
from lightning_mlflow_cv.tasks.object_detection import (
    ap50_per_class,
    check_dicts,
    detection_errors,
    mask_iou,
    mean_ap,
)

#: Probability masks are binarised at this value.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class InstanceOutput:
    """Checked instance outputs: one dict per image; ``masks`` are bool ``(K, H, W)``."""

    preds: list[dict[str, Tensor]]
    targets: list[dict[str, Tensor]]


def _mask_check(key: str) -> Any:
    part = "preds" if key == "preds" else "targets"

    def check(i: int, d: Mapping[str, Any], item: dict[str, Tensor]) -> None:
        masks, k = d["masks"], item["boxes"].shape[0]
        if isinstance(masks, Tensor) and masks.ndim == 4 and masks.shape[1] == 1:  # Mask R-CNN: (K, 1, H, W)
            masks = masks[:, 0]
        if not isinstance(masks, Tensor) or masks.ndim != 3 or masks.shape[0] != k:
            raise FormatProblem(part, f"'{key}'[{i}]['masks'] must be a tensor of shape ({k}, H, W) like its boxes")
        item["masks"] = masks > MASK_THRESHOLD if masks.is_floating_point() else masks.bool()

    return check


def per_image_masks_match(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
    for i, (p, t) in enumerate(zip(preds, targets, strict=False)):
        if tuple(p["masks"].shape[-2:]) != tuple(t["masks"].shape[-2:]):
            raise FormatProblem(
                "targets",
                f"'targets'[{i}]['masks'] are {tuple(t['masks'].shape[-2:])} but 'preds'[{i}]['masks'] are "
                f"{tuple(p['masks'].shape[-2:])} (same H, W per image)",
            )


class InstanceSegmentation(CVTask):
    """``"instance-segmentation"`` (``"instance"``): as object detection plus ``"masks"`` per instance."""

    name = "instance-segmentation"
    aliases = ("instance",)
    expected_format = (
        '{"preds": list of N dicts {"boxes": (K, 4) float xyxy, "scores": (K,) float, "labels": (K,) int, '
        '"masks": (K, H, W) bool or probabilities}, "targets": list of N dicts {"boxes": (M, 4) float xyxy, '
        '"labels": (M,) int, "masks": (M, H, W) bool}}'
    )
    expected_output = "list of N dicts with 'boxes' (K, 4) xyxy, 'scores' (K,), 'labels' (K,), 'masks' (K, H, W)"
    expected_target = "list of N dicts with 'boxes' (M, 4) xyxy, 'labels' (M,), 'masks' (M, H, W)"
    postprocess = "instances"
    main_metric = "mask_AP"
    badness_name = "1 - F1@mask IoU 0.5"

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> list[dict[str, Tensor]]:
        return check_dicts("preds", preds, ("boxes", "scores", "labels", "masks"), n, num_classes, _mask_check("preds"))

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> list[dict[str, Tensor]]:
        out = check_dicts("targets", targets, ("boxes", "labels", "masks"), n, num_classes, _mask_check("targets"))
        if preds is not None:
            per_image_masks_match(preds, out)
        return out

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> InstanceOutput:
        return InstanceOutput(preds, targets)

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        return {"map": mean_ap(cfg, ("bbox", "segm"))}

    def update_metrics(self, metrics: dict[str, Any], out: InstanceOutput) -> None:
        preds = [{k: v.detach() for k, v in d.items()} for d in out.preds]
        metrics["map"].update(preds, out.targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        res = metrics["map"].compute()
        scalars = {
            "mask_AP": float(res["segm_map"]), "bbox_AP": float(res["bbox_map"]),
            "mask_AP50": float(res["segm_map_50"]), "bbox_AP50": float(res["bbox_map_50"]),
        }  # fmt: skip
        names = cfg.class_names
        classes = [int(c) for c in torch.atleast_1d(res["classes"]).tolist()]
        rows = []
        for k, c in enumerate(classes):
            row: dict[str, Any] = {"class": names[c] if 0 <= c < len(names) else str(c)}
            for kind, prefix in (("mask", "segm"), ("bbox", "bbox")):
                ap = torch.atleast_1d(res[f"{prefix}_map_per_class"]).cpu()
                row[f"{kind}_AP"] = num(ap[k]) if k < ap.numel() else None
                row[f"{kind}_AP50"] = ap50_per_class(res.get(f"{prefix}_precision"), k)
            for key, v in row.items():  # COCO reports -1 for classes without ground truth
                if isinstance(v, float) and v < 0:
                    row[key] = None
            rows.append(row)
        return scalars, {"table": rows}

    def panel(self, img: Tensor, src_size: tuple[int, int], out: InstanceOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        p = out.preds[i]
        left = self.target_panel(img, src_size, out.targets[i], opts)
        keep = p["scores"] >= opts.score_threshold
        right = _draw_instances(img, p, keep, src_size, p["scores"][keep], opts.class_names)
        right = _pixels.caption(right, [f"pred>={opts.score_threshold:g}: {int(keep.sum())}"], font_size=opts.font_size)
        return _pixels.hstack([left, right])

    def badness(self, out: InstanceOutput, opts: PanelOptions) -> Tensor:
        return instance_errors(out.preds, out.targets, 0.5, opts.score_threshold)

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        everything = torch.ones(len(target["boxes"]), dtype=torch.bool)
        shown = _draw_instances(img, target, everything, src_size, None, opts.class_names)
        return _pixels.caption(shown, [f"truth: {len(target['boxes'])}"], font_size=opts.font_size)

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type=("bbox", "segm"))

        def tens(d: Mapping[str, Any]) -> dict[str, Tensor]:
            out = {k: torch.as_tensor(v) for k, v in d.items() if k in ("boxes", "scores", "labels", "masks")}
            out["masks"] = out["masks"].bool()
            return out

        metric.update([tens(p) for b in preds for p in b], [tens(t) for b in targets for t in b])
        res = metric.compute()
        return {
            "mask_AP": float(res["segm_map"]), "bbox_AP": float(res["bbox_map"]),
            "mask_AP50": float(res["segm_map_50"]), "bbox_AP50": float(res["bbox_map_50"]),
        }  # fmt: skip


def instance_errors(preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                    iou_threshold: float = 0.5, score_threshold: float = 0.5) -> Tensor:  # fmt: skip
    """Per image: ``1 - F1`` of its instances with ``score >= score_threshold`` matched to its ground truth by
    mask IoU >= ``iou_threshold`` (same class, greedy by score); 0 for an image with neither.

    Example::

        >>> m = torch.zeros(1, 8, 8, dtype=torch.bool)
        >>> m[0, :4, :4] = True
        >>> gt = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]), "masks": m}
        >>> good = dict(gt, scores=torch.tensor([0.9]))
        >>> bad = dict(good, masks=m.flip(-1))  # same box count, mask on the other side
        >>> instance_errors([good, bad], [gt, gt]).tolist()
        [0.0, 1.0]
    """
    return detection_errors(preds, targets, iou_threshold, score_threshold, key="masks", iou_fn=mask_iou)


def _draw_instances(img: Tensor, d: Mapping[str, Tensor], keep: Tensor, src_size: tuple[int, int],
                    scores: Tensor | None, class_names: Sequence[str] | None) -> Tensor:  # fmt: skip
    """The kept instances of ``d`` on the display image ``img``: masks in one colour per instance, then boxes."""
    from torchvision.utils import draw_segmentation_masks

    masks = d["masks"][keep]
    shown = img
    if masks.numel():
        m = torch.nn.functional.interpolate(masks[:, None].float(), size=tuple(img.shape[-2:]), mode="nearest")
        colors = [_pixels.PALETTE[j % len(_pixels.PALETTE)] for j in range(masks.shape[0])]  # one per instance
        shown = draw_segmentation_masks(img, m[:, 0] > 0.5, alpha=0.5, colors=colors)
    return _panels.draw_boxes(shown, d["boxes"][keep], d["labels"][keep], src_size, scores, class_names)


TASK = register(InstanceSegmentation)
