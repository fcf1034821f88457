"""Pure functions on metric results: no Trainer, no MLflow, no plotting."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["confusion_matrix_record", "integer_bincount_allowed", "normalize_by_true_class", "table_csv"]


@contextmanager
def integer_bincount_allowed() -> Iterator[None]:
    """Let torchmetrics use ``torch.bincount`` while ``torch.use_deterministic_algorithms(True)`` is on.

    In deterministic mode torchmetrics replaces ``bincount`` with a dense ``(len(x), minlength)`` comparison,
    which for a binned 10-class PR curve over a batch of 128 needs 16 GB (and for a segmentation confusion
    matrix grows with the pixel count). Counting integers without weights gives the same result in any order,
    so the fast path is exact; the global setting is restored right after.

    Example::

        >>> torch.use_deterministic_algorithms(True, warn_only=True)
        >>> with integer_bincount_allowed():
        ...     torch.are_deterministic_algorithms_enabled()
        False
        >>> torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        (True, True)
        >>> torch.use_deterministic_algorithms(False)
    """
    if not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def normalize_by_true_class(confmat: Tensor) -> Tensor:
    """The confusion matrix with each row (true class) divided by its sum, as float64; empty rows stay 0.

    Example::

        >>> normalize_by_true_class(torch.tensor([[3, 1], [0, 0]]))
        tensor([[0.7500, 0.2500],
                [0.0000, 0.0000]], dtype=torch.float64)
    """
    cm = confmat.double()
    rows = cm.sum(1, keepdim=True)
    return torch.where(rows > 0, cm / rows.clamp(min=1), torch.zeros_like(cm))


def confusion_matrix_record(confmat: Tensor, labels: Sequence[str], stage: str, epoch: int | None) -> dict[str, Any]:
    """The JSON content of ``confusion_matrix.json``: counts, row-normalised values (6 decimals) and the labels.

    Example::

        >>> rec = confusion_matrix_record(torch.tensor([[2, 1], [0, 3]]), ["cat", "dog"], "val", 4)
        >>> rec["matrix"], rec["normalized"], rec["rows"], rec["columns"]
        ([[2, 1], [0, 3]], [[0.666667, 0.333333], [0.0, 1.0]], 'true class', 'predicted class')
    """
    return {
        "stage": stage,
        "epoch": epoch,
        "labels": list(labels),
        "rows": "true class",
        "columns": "predicted class",
        "matrix": confmat.tolist(),
        "normalized": [[round(v, 6) for v in r] for r in normalize_by_true_class(confmat).tolist()],
    }


def table_csv(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as CSV text: the first row's keys are the header, None is an empty cell, floats have 6 decimals.

    Example::

        >>> print(table_csv([{"class": "a", "iou": 0.5, "n": 3}, {"class": "b", "iou": None, "n": 0}]), end="")
        class,iou,n
        a,0.5,3
        b,,0
    """
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()
