"""Object detection: torchvision-style lists of dicts; COCO mAP50 / mAP50-95 (torchmetrics), precision and
recall at one IoU and score threshold; the served model returns boxes after score threshold and NMS."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv.tasks._base import (
    CVTask,
    FormatProblem,
    PanelOptions,
    is_float,
    is_int,
    is_seq,
    num,
    safe_div,
)
from lightning_mlflow_cv.tasks._registry import register


@dataclass(frozen=True)
class DetectionOutput:
    """Checked detection outputs: one dict per image for ``preds`` and ``targets`` (torchvision style)."""

    preds: list[dict[str, Tensor]]
    targets: list[dict[str, Tensor]]


def check_dicts(key: str, items: Any, need: tuple[str, ...], n: int | None, num_classes: int | None,
                extra: Any = None) -> list[dict[str, Tensor]]:  # fmt: skip
    """A list of per-image dicts with ``boxes`` ``(K, 4)`` float xyxy, ``labels`` ``(K,)`` int and, when in
    ``need``, ``scores`` ``(K,)`` float. ``extra(i, d, item)`` checks further keys (masks). Raises
    :class:`FormatProblem` with part ``"preds"`` for ``key == "preds"``, else ``"targets"``."""
    part = "preds" if key == "preds" else "targets"
    if not is_seq(items):
        raise FormatProblem(part, f"'{key}' must be a list with one dict per image")
    if n is not None and len(items) != n:
        if part == "targets":
            raise FormatProblem(part, f"{n} 'preds' dicts but {len(items)} 'targets' dicts (one per image)")
        raise FormatProblem(part, f"'{key}' has {len(items)} dicts but the batch has {n} images")
    out = []
    for i, d in enumerate(items):
        if not isinstance(d, Mapping) or any(k not in d for k in need):
            raise FormatProblem(part, f"'{key}'[{i}] must be a dict with keys {list(need)}")
        boxes, labels = d["boxes"], d["labels"]
        if not is_float(boxes) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise FormatProblem(part, f"'{key}'[{i}]['boxes'] must be a float tensor of shape (K, 4) (xyxy)")
        k = boxes.shape[0]
        if not is_int(labels) or labels.shape != (k,):
            raise FormatProblem(
                part, f"'{key}'[{i}]['labels'] must be an integer tensor of shape ({k},) like its boxes"
            )
        item = {"boxes": boxes, "labels": labels.long()}
        if "scores" in need:
            scores = d["scores"]
            if not is_float(scores) or scores.shape != (k,):
                raise FormatProblem(part, f"'{key}'[{i}]['scores'] must be a float tensor of shape ({k},)")
            item["scores"] = scores
        if extra is not None:
            extra(i, d, item)
        if num_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise FormatProblem(
                part,
                f"'{key}'[{i}]['labels'] has values outside [0, {num_classes - 1}] (num_classes={num_classes}); "
                "labels are class indices (with a background class, count it in num_classes)",
            )
        out.append(item)
    return out


def match_detections(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    pred_labels: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    iou_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class true positives, false positives and false negatives of one image's detections.

    Predictions with ``score >= score_threshold`` are taken in descending score order; each matches the
    unmatched ground-truth box of its class with the highest IoU if that IoU is ``>= iou_threshold`` (a true
    positive), else it is a false positive. Ground-truth boxes left unmatched are false negatives. ``iou_fn``
    (default ``torchvision.ops.box_iou``) pairs other per-instance items, e.g. :func:`mask_iou` for masks.

    Returns:
        ``(tp, fp, fn)``, each a ``(num_classes,)`` long tensor.

    Example::

        >>> b = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> match_detections(b, torch.tensor([0.9]), torch.tensor([1]), b, torch.tensor([1]), num_classes=2)
        (tensor([0, 1]), tensor([0, 0]), tensor([0, 0]))
    """
    from torchvision.ops import box_iou

    tp = torch.zeros(num_classes, dtype=torch.long)
    fp = torch.zeros(num_classes, dtype=torch.long)
    fn = torch.zeros(num_classes, dtype=torch.long)
    keep = pred_scores >= score_threshold
    pred_boxes, pred_scores, pred_labels = pred_boxes[keep].cpu(), pred_scores[keep].cpu(), pred_labels[keep].cpu()
    gt_boxes, gt_labels = gt_boxes.cpu(), gt_labels.cpu()
    for c in torch.unique(torch.cat([pred_labels, gt_labels])).tolist():
        p = pred_labels == c
        g = gt_labels == c
        pb = pred_boxes[p][pred_scores[p].argsort(descending=True, stable=True)]
        gb = gt_boxes[g]
        if len(gb) == 0:
            fp[c] += len(pb)
            continue
        if len(pb) == 0:
            fn[c] += len(gb)
            continue
        iou = (iou_fn or box_iou)(pb.double(), gb.double())
        matched = torch.zeros(len(gb), dtype=torch.bool)
        for i in range(len(pb)):
            cand = iou[i].masked_fill(matched, -1.0)
            j = int(cand.argmax())
            if cand[j] >= iou_threshold:
                matched[j] = True
                tp[c] += 1
            else:
                fp[c] += 1
        fn[c] += int((~matched).sum())
    return tp, fp, fn


def detection_errors(
    preds: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    key: str = "boxes",
    iou_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Per image: ``1 - F1`` of its detections with ``score >= score_threshold`` matched to its ground truth as
    :func:`match_detections` does (same class, IoU >= ``iou_threshold``); 0 for an image with neither
    ground truth nor kept detections. ``key``/``iou_fn``: what is matched (``"masks"`` with :func:`mask_iou`
    for instance segmentation).

    Example::

        >>> gt = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}] * 2
        >>> box = torch.tensor([[0.0, 0.0, 10.0, 9.0]])
        >>> good = {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
        >>> bad = dict(good, boxes=torch.tensor([[20.0, 20.0, 30.0, 30.0]]))
        >>> detection_errors([good, bad], gt).tolist()
        [0.0, 1.0]
    """
    out = []
    for p, t in zip(preds, targets, strict=True):
        labels = torch.cat([p["labels"].reshape(-1).cpu(), t["labels"].reshape(-1).cpu()])
        n_cls = int(labels.max()) + 1 if labels.numel() else 1
        tp, fp, fn = match_detections(
            p[key], p["scores"], p["labels"], t[key], t["labels"], n_cls, iou_threshold, score_threshold, iou_fn
        )
        tp_, wrong = int(tp.sum()), int(fp.sum() + fn.sum())
        out.append(wrong / (2 * tp_ + wrong) if wrong else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair of masks ``a`` ``(K, H, W)`` and ``b`` ``(M, H, W)`` (nonzero = inside): ``(K, M)``.

    Example::

        >>> m = torch.zeros(2, 4, 4)
        >>> m[0, :2] = 1
        >>> m[1, :, :2] = 1
        >>> mask_iou(m, m[:1]).tolist()
        [[1.0], [0.3333333333333333]]
    """
    fa, fb = (a.reshape(a.shape[0], -1) != 0).double(), (b.reshape(b.shape[0], -1) != 0).double()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


class DetectionMatchCounts(Metric):
    """True/false positives and false negatives per class at one IoU and score threshold (DDP: summed).

    Args:
        num_classes: Number of classes (label values ``0 .. num_classes - 1``).
        iou_threshold: Minimum IoU of a true positive.
        score_threshold: Predictions below this score are ignored.

    Example::

        m = DetectionMatchCounts(num_classes=3)
        m.update(preds, targets)
        tp, fp, fn = m.compute()
    """

    full_state_update = False
    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, score_threshold: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        for p, t in zip(preds, targets, strict=False):
            tp, fp, fn = match_detections(
                p["boxes"],
                p["scores"],
                p["labels"],
                t["boxes"],
                t["labels"],
                self.num_classes,
                self.iou_threshold,
                self.score_threshold,
            )
            self.tp += tp.to(self.device)
            self.fp += fp.to(self.device)
            self.fn += fn.to(self.device)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.tp, self.fp, self.fn


def mean_ap(cfg: Any, iou_type: Any) -> Any:
    """torchmetrics ``MeanAveragePrecision`` (per-class, extended summary, COCOeval's exact thresholds) with an
    install hint when missing."""
    import numpy as np
    from torchmetrics.detection import MeanAveragePrecision

    try:
        return MeanAveragePrecision(
            box_format="xyxy",
            iou_type=iou_type,
            class_metrics=True,
            extended_summary=True,
            backend=cfg.detection_backend,
            # COCOeval's own thresholds in float64: torchmetrics' default float32 ones (0.550000011...) drop
            # matches whose IoU or recall lies exactly on a threshold, which pixel masks often do
            iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
            rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        )
    except ModuleNotFoundError as err:
        extra = "pycocotools" if cfg.detection_backend == "pycocotools" else "faster-coco-eval"
        raise ModuleNotFoundError(
            f"CVMetricsCallback: task={cfg.task!r} needs {extra} for MeanAveragePrecision ({err}). "
            f"Fix: pip install {extra}  (or: pip install 'lightning-mlflow-cv[detection]')"
        ) from err


def ap50_per_class(precision: Any, k: int) -> float | None:
    """COCO AP at IoU 0.5 of class column ``k`` from the extended summary's precision ``(T, R, K, A, M)``."""
    if isinstance(precision, Tensor) and precision.ndim == 5 and k < precision.shape[2]:
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        return float(p.mean()) if p.numel() else None
    return None


class ObjectDetection(CVTask):
    """``"object-detection"`` (``"detection"``): torchvision-style ``{"preds": [...], "targets": [...]}``."""

    name = "object-detection"
    aliases = ("detection",)
    expected_format = (
        '{"preds": list of N dicts {"boxes": (K, 4) float xyxy, "scores": (K,) float, "labels": (K,) int}, '
        '"targets": list of N dicts {"boxes": (M, 4) float xyxy, "labels": (M,) int}}'
    )
    expected_output = "list of N dicts with 'boxes' (K, 4) xyxy, 'scores' (K,), 'labels' (K,)"
    expected_target = "list of N dicts with 'boxes' (K, 4) xyxy and 'labels' (K,)"
    postprocess = "boxes"
    main_metric = "mAP50"
    badness_name = "1 - F1@0.5"

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> list[dict[str, Tensor]]:
        return check_dicts("preds", preds, ("boxes", "scores", "labels"), n, num_classes)

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> list[dict[str, Tensor]]:
        return check_dicts("targets", targets, ("boxes", "labels"), n, num_classes)

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> DetectionOutput:
        return DetectionOutput(preds, targets)

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        return {
            "map": mean_ap(cfg, "bbox"),
            "counts": DetectionMatchCounts(cfg.num_classes, cfg.iou_threshold, cfg.score_threshold),
        }

    def update_metrics(self, metrics: dict[str, Any], out: DetectionOutput) -> None:
        preds = [{k: v.detach() for k, v in d.items()} for d in out.preds]
        metrics["map"].update(preds, out.targets)
        metrics["counts"].update(preds, out.targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        names = cfg.class_names
        scalars: dict[str, float] = {}
        res = metrics["map"].compute()
        tp, fp, fn = (t.cpu() for t in metrics["counts"].compute())
        scalars["mAP50"] = float(res["map_50"])
        scalars["mAP50-95"] = float(res["map"])
        seen = (tp + fp + fn) > 0
        prec = safe_div(tp, tp + fp).nan_to_num(0.0)
        rec = safe_div(tp, tp + fn).nan_to_num(0.0)
        scalars["precision"] = float(prec[seen].mean()) if bool(seen.any()) else 0.0
        scalars["recall"] = float(rec[seen].mean()) if bool(seen.any()) else 0.0
        classes = [int(c) for c in torch.atleast_1d(res["classes"]).tolist()]
        ap_all = torch.atleast_1d(res["map_per_class"]).cpu()
        ar_all = torch.atleast_1d(res["mar_100_per_class"]).cpu()
        precision = res.get("precision")  # (T, R, K, A, M), -1 where undefined
        n = cfg.num_classes
        rows: list[dict[str, str | float | int | None]] = []
        for k, c in enumerate(classes):
            rows.append(
                {
                    "class": names[c] if 0 <= c < len(names) else str(c),
                    "ap50_95": num(ap_all[k]) if k < ap_all.numel() else None,
                    "ap50": ap50_per_class(precision, k),
                    "ar100": num(ar_all[k]) if k < ar_all.numel() else None,
                    "precision": num(prec[c]) if 0 <= c < n else None,
                    "recall": num(rec[c]) if 0 <= c < n else None,
                    "tp": int(tp[c]) if 0 <= c < n else None,
                    "fp": int(fp[c]) if 0 <= c < n else None,
                    "fn": int(fn[c]) if 0 <= c < n else None,
                }
            )
        for r in rows:  # COCO reports -1 for classes without ground truth
            for key in ("ap50_95", "ar100", "ap50"):
                v = r[key]
                if isinstance(v, float) and v < 0:
                    r[key] = None
        return scalars, {"table": rows}

    def panel(self, img: Tensor, src_size: tuple[int, int], out: DetectionOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        return _panels.detection_panel(
            img, src_size, out.targets[i], out.preds[i], opts.score_threshold, opts.class_names, opts.font_size
        )

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        return _panels.detection_panel(img, src_size, target, None, class_names=opts.class_names,
                                     font_size=opts.font_size)  # fmt: skip

    def badness(self, out: DetectionOutput, opts: PanelOptions) -> Tensor:
        return detection_errors(out.preds, out.targets, 0.5, opts.score_threshold)

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type="bbox")
        metric.update(
            [{k: torch.as_tensor(v) for k, v in p.items()} for b in preds for p in b],
            [{k: torch.as_tensor(v) for k, v in t.items()} for b in targets for t in b],
        )
        out = metric.compute()
        return {"map": float(out["map"]), "map_50": float(out["map_50"])}


TASK = register(ObjectDetection)
