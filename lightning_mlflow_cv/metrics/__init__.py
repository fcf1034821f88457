"""Metric code of :class:`~lightning_mlflow_cv.callbacks.cv_metrics.CVMetricsCallback`, testable without a Trainer.

As torchmetrics keeps its functional code apart from its modules, the callback here only wires hooks to:

- :mod:`~lightning_mlflow_cv.metrics.functional`: pure functions on metric results (the confusion matrix
  normalised by true class and as a JSON record, per-class tables as CSV, the integer ``bincount`` fast path
  under deterministic mode);
- :mod:`~lightning_mlflow_cv.metrics.plots`: figures of those results (confusion matrices, PR/ROC curves) with
  matplotlib, and the cheap PIL confusion matrix image logged every epoch;
- :mod:`~lightning_mlflow_cv.metrics.best_epoch`: which validation epoch is the best (``monitor``/``mode``) and
  the fit-end summary metrics.

The torchmetrics states themselves (the task presets, and the one custom ``Metric``,
:class:`~lightning_mlflow_cv.tasks.object_detection.DetectionMatchCounts`) live with their task in
:mod:`lightning_mlflow_cv.tasks`.
"""

from __future__ import annotations

from lightning_mlflow_cv.metrics.best_epoch import fit_summary, is_new_best, resolve_monitor
from lightning_mlflow_cv.metrics.functional import (
    confusion_matrix_record,
    integer_bincount_allowed,
    normalize_by_true_class,
    table_csv,
)

__all__ = [
    "confusion_matrix_record",
    "fit_summary",
    "integer_bincount_allowed",
    "is_new_best",
    "normalize_by_true_class",
    "resolve_monitor",
    "table_csv",
]
