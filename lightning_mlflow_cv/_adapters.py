"""Compatibility names for the output conventions, which now live in :mod:`lightning_mlflow_cv.tasks`.

Kept so existing import paths (``output_fn: lightning_mlflow_cv._adapters:logits_and_batch_targets`` in a YAML)
keep working; new code imports from :mod:`lightning_mlflow_cv.tasks`.
"""

from __future__ import annotations

from lightning_mlflow_cv.tasks import (
    TASK_ALIASES,
    TASKS,
    adapt_outputs,
    check_outputs,
    describe,
    get_task,
    load_output_fn,
    logits_and_batch_targets,
    normalize_task,
)
from lightning_mlflow_cv.tasks._base import OutputFn
from lightning_mlflow_cv.tasks.classification import ClassificationOutput
from lightning_mlflow_cv.tasks.object_detection import DetectionOutput
from lightning_mlflow_cv.tasks.semantic_segmentation import SegmentationOutput

#: The expected step-output format per task, as shown in error messages.
EXPECTED_FORMAT: dict[str, str] = {t: get_task(t).expected_format for t in TASKS}

__all__ = [
    "EXPECTED_FORMAT",
    "TASKS",
    "TASK_ALIASES",
    "ClassificationOutput",
    "DetectionOutput",
    "OutputFn",
    "SegmentationOutput",
    "adapt_outputs",
    "check_outputs",
    "describe",
    "load_output_fn",
    "logits_and_batch_targets",
    "normalize_task",
]
