"""Panels, one per sample, and the mosaic of panels (pure drawing: no Trainer, no MLflow, no task registry).

- :func:`classification_panel`, :func:`detection_panel`, :func:`segmentation_panel`: what each task's
  ``draw_panel`` in :mod:`lightning_mlflow_cv.tasks` composes;
- :func:`make_image_grid`, :func:`grid_columns`: the panels as one image, wider than tall.

Everything returns ``uint8`` ``(3, H, W)`` CPU tensors, ready for ``MLflowCVLogger.log_image``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_mlflow_cv._draw.pixels import GREEN, PALETTE, RED, border, caption, class_name, hstack, resize_mask


def classification_panel(img: Tensor, target: int | None, pred: int | None = None, score: float | None = None,
                         class_names: Sequence[str] | None = None, font_size: int = 12) -> Tensor:  # fmt: skip
    """One sample: the image with ``pred`` (and its probability) and ``target`` below.

    A wrong prediction gets a red frame and red text; a right one green text. With ``pred=None`` only the
    label is shown (augmentation samples).
    """
    if pred is None:
        text = class_name(int(target), class_names) if target is not None else ""
        return caption(img, [text], font_size=font_size)
    wrong = target is not None and int(pred) != int(target)
    p = class_name(int(pred), class_names) + (f" ({score:.0%})" if score is not None else "")
    lines = [f"pred: {p}", f"true: {class_name(int(target), class_names)}" if target is not None else "true: ?"]
    if wrong:
        return caption(border(img, RED), ["x " + lines[0], lines[1]], color=RED, font_size=font_size)
    return caption(img, lines, color=GREEN, font_size=font_size)


def _scaled_boxes(boxes: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    return boxes.float() * torch.tensor([sx, sy, sx, sy])


def draw_boxes(img: Tensor, boxes: Tensor, labels: Tensor, src_size: tuple[int, int], scores: Tensor | None = None,
               class_names: Sequence[str] | None = None) -> Tensor:  # fmt: skip
    """``draw_bounding_boxes`` with boxes given in ``src_size`` pixel coordinates, coloured by class."""
    from torchvision.utils import draw_bounding_boxes

    if boxes.numel() == 0:
        return img
    b = _scaled_boxes(boxes, src_size, (img.shape[-2], img.shape[-1]))
    b[:, 0::2] = b[:, 0::2].clamp(0, img.shape[-1] - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, img.shape[-2] - 1)
    texts = [
        class_name(int(lbl), class_names) + (f" {float(s):.2f}" if scores is not None else "")
        for lbl, s in zip(labels.tolist(), scores.tolist() if scores is not None else [None] * len(labels), strict=True)
    ]
    colors = [PALETTE[int(lbl) % len(PALETTE)] for lbl in labels.tolist()]
    try:  # white text on a filled label background (torchvision >= 0.20), readable on any image
        return draw_bounding_boxes(img, b, labels=texts, colors=colors, width=2, label_colors="white", fill_labels=True)
    except TypeError:  # pragma: no cover - older torchvision
        return draw_bounding_boxes(img, b, labels=texts, colors=colors, width=2)


def detection_panel(img: Tensor, src_size: tuple[int, int], target: Mapping[str, Tensor] | None,
                    pred: Mapping[str, Tensor] | None = None, score_threshold: float = 0.5,
                    class_names: Sequence[str] | None = None, font_size: int = 12) -> Tensor:  # fmt: skip
    """Ground-truth boxes (left) beside predicted boxes with ``score >= score_threshold`` (right).

    ``img`` is the display image; boxes are in ``src_size`` (the model input's ``(H, W)``) coordinates.
    """
    left = img
    if target is not None:
        left = draw_boxes(img, target["boxes"], target["labels"], src_size, None, class_names)
        left = caption(left, [f"truth: {len(target['boxes'])}"], font_size=font_size)
    if pred is None:
        return left
    keep = pred["scores"] >= score_threshold
    right = draw_boxes(img, pred["boxes"][keep], pred["labels"][keep], src_size, pred["scores"][keep], class_names)
    right = caption(right, [f"pred>={score_threshold:g}: {int(keep.sum())}"], font_size=font_size)
    return hstack([left, right])


def overlay_mask(img: Tensor, mask: Tensor, num_classes: int, background_class: int | None = None,
                 alpha: float = 0.5) -> Tensor:  # fmt: skip
    """``draw_segmentation_masks`` of an integer mask (resized to the image); ids outside ``[0, num_classes)``
    (e.g. an ignore index of 255) and ``background_class`` stay uncoloured."""
    from torchvision.utils import draw_segmentation_masks

    m = resize_mask(mask, (img.shape[-2], img.shape[-1]))
    ids = [c for c in range(num_classes) if c != background_class]
    if not ids:
        return img
    masks = torch.stack([m == c for c in ids])
    colors = [PALETTE[c % len(PALETTE)] for c in ids]
    return draw_segmentation_masks(img, masks, alpha=alpha, colors=colors)


def segmentation_panel(img: Tensor, target: Tensor | None, pred: Tensor | None, num_classes: int,
                       background_class: int | None = None, alpha: float = 0.5,
                       font_size: int = 12) -> Tensor:  # fmt: skip
    """Image | ground-truth overlay | predicted overlay, with the predicted mask's pixel accuracy."""
    parts = [caption(img, ["image"], font_size=font_size)]
    if target is not None:
        truth = overlay_mask(img, target, num_classes, background_class, alpha)
        parts.append(caption(truth, ["truth"], font_size=font_size))
    if pred is not None:
        text = "pred"
        if target is not None and target.shape == pred.shape:
            valid = (target >= 0) & (target < num_classes)
            if valid.any():
                text += f" (acc {float((pred[valid] == target[valid]).float().mean()):.0%})"
        predicted = overlay_mask(img, pred, num_classes, background_class, alpha)
        parts.append(caption(predicted, [text], font_size=font_size))
    return hstack(parts)


#: The least width / height of the default grid layout: MLflow's image card shows an image centred in a square box
#: under the run's name, in a card body shorter than it is wide (about 250 px at the default card size), so only a
#: landscape grid shows whole there (a 4x4 grid of captioned tiles is taller than wide and overflowed it).
GRID_MIN_ASPECT = 1.4


def grid_columns(n: int, panel_h: int, panel_w: int, min_aspect: float = GRID_MIN_ASPECT, padding: int = 4) -> int:
    """The fewest panels per row that lay ``n`` panels of ``panel_h x panel_w`` out at least ``min_aspect`` times
    wider than tall (``n`` in one row when none does).

    Example::

        >>> grid_columns(16, 150, 128), grid_columns(8, 150, 128), grid_columns(4, 150, 128), grid_columns(1, 9, 9)
        (6, 4, 4, 1)
    """
    for cols in range(1, n + 1):
        rows = math.ceil(n / cols)
        if cols * (panel_w + padding) + padding >= min_aspect * (rows * (panel_h + padding) + padding):
            return cols
    return max(1, n)


def make_image_grid(panels: Sequence[Tensor], nrow: int | None = None, padding: int = 4) -> Tensor:
    """``torchvision.utils.make_grid`` of ``uint8`` panels of any sizes (padded to the largest, white background).

    ``nrow`` (panels per row) defaults to :func:`grid_columns`: at least :data:`GRID_MIN_ASPECT` times wider than
    tall, so MLflow's image card shows the whole grid. Returns ``uint8`` ``(3, H, W)``.
    """
    from torchvision.utils import make_grid

    if not panels:
        raise ValueError("make_image_grid: no panels to lay out.")
    h = max(p.shape[1] for p in panels)
    w = max(p.shape[2] for p in panels)
    padded = []
    for p in panels:
        canvas = torch.full((3, h, w), 255, dtype=torch.uint8)
        canvas[:, : p.shape[1], : p.shape[2]] = p
        padded.append(canvas)
    nrow = nrow or grid_columns(len(panels), h, w, padding=padding)
    return make_grid(torch.stack(padded), nrow=nrow, padding=padding, pad_value=255)
