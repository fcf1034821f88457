"""Shared checks and statistics of the dense class-index tasks (classification, semantic segmentation)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mlflow_cv.tasks._base import FormatProblem, is_float, is_int, safe_div


def check_logits(logits: Any, n: int | None, num_classes: int | None, spatial: bool) -> Tensor:
    """``logits`` ``(N, C)`` or ``(N, C, H, W)`` float; raises :class:`FormatProblem` (part ``preds``)."""
    nd = 4 if spatial else 2
    dims = "(N, C, H, W)" if spatial else "(N, C)"
    if not is_float(logits) or logits.ndim != nd:
        raise FormatProblem("preds", f"'logits' must be a float tensor of shape {dims}")
    if n is not None and logits.shape[0] != n:
        raise FormatProblem("preds", f"'logits' has {logits.shape[0]} rows in dim 0 but the batch has {n} images")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise FormatProblem("preds", f"'logits' has {logits.shape[1]} classes in dim 1, num_classes={num_classes}")
    return logits


def check_index_targets(targets: Any, logits: Tensor | None, spatial: bool, n: int | None = None) -> Tensor:
    """Class-index ``targets`` ``(N,)`` / ``(N, H, W)`` matching ``logits`` (or only ``n`` when there are no logits,
    e.g. for drawing augmented samples); a list of ints is accepted for ``(N,)``."""
    if (
        not spatial
        and isinstance(targets, (list, tuple))
        and targets
        and all(isinstance(v, int) and not isinstance(v, bool) for v in targets)
    ):
        targets = torch.tensor(targets)
    tdims = "(N, H, W)" if spatial else "(N,)"
    nd = 3 if spatial else 1
    if not is_int(targets) or targets.ndim != nd:
        raise FormatProblem("targets", f"'targets' must be an integer tensor of shape {tdims} (class indices)")
    if logits is None:
        if n is not None and targets.shape[0] != n:
            raise FormatProblem("targets", f"'targets' has {targets.shape[0]} items but the batch has {n} images")
        return targets.long()
    want = (logits.shape[0], *logits.shape[2:])
    if tuple(targets.shape) != tuple(want):
        raise FormatProblem(
            "targets", f"'targets' shape {tuple(targets.shape)} does not match the logits' {tuple(want)}"
        )
    return targets.long()


def confusion_stats(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class statistics of a confusion matrix (rows: true class, columns: predicted class).

    Returns ``support``, ``precision``, ``recall``, ``f1``, ``iou`` (NaN where undefined) per class and the
    overall ``accuracy``.

    Example::

        >>> s = confusion_stats(torch.tensor([[3, 1], [0, 4]]))
        >>> [round(v, 3) for v in s["iou"].tolist()], round(float(s["accuracy"]), 3)
        ([0.75, 0.8], 0.875)
    """
    cm = confmat.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = safe_div(tp, predicted)
    recall = safe_div(tp, support)
    f1 = safe_div(2 * tp, support + predicted)
    iou = safe_div(tp, support + predicted - tp)
    accuracy = safe_div(tp.sum(), cm.sum())
    return {"support": support, "precision": precision, "recall": recall, "f1": f1, "iou": iou, "accuracy": accuracy}
