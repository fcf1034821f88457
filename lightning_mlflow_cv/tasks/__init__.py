"""One module per CV task, each defined once and read by every callback.

A task (:class:`~lightning_mlflow_cv.tasks.CVTask`) holds its canonical name and short names, its output
convention with one format check, its torchmetrics preset, how its prediction panel is drawn and the servable
model's post-processing. ``CVMetricsCallback``, ``PredictionGridCallback``, ``GradCAMCallback``,
``AugmentationSamplesCallback``, ``ModelRegistryCallback``, :func:`~lightning_mlflow_cv.evaluation.evaluate` and
the logger's ``task`` tag check all read this registry. Adding a task is adding one module that calls
:func:`register` and importing it below.

=========================  ================  ==============================================================
task                       short name        step outputs (``validation_step``/``test_step`` or ``output_fn``)
=========================  ================  ==============================================================
``classification``                           ``{"logits": (N, C), "targets": (N,)}``
``object-detection``       ``detection``     ``{"preds": [{"boxes", "scores", "labels"}], "targets": [{"boxes", "labels"}]}``
``semantic-segmentation``  ``segmentation``  ``{"logits": (N, C, H, W), "targets": (N, H, W)}``
``instance-segmentation``  ``instance``      as detection, plus ``"masks"`` ``(K, H, W)`` in every dict
``anomaly-detection``      ``anomaly``       ``{"scores": (N,), "targets": (N,) in {0, 1}}`` (+ ``"maps": (N, H, W)``)
``depth-estimation``       ``depth``         ``{"preds": (N, 1, H, W) or (N, H, W), "targets": same}``; 0/NaN invalid
=========================  ================  ==============================================================

The mapping hook, the same for every callback: ``output_fn(outputs, batch) -> dict`` in the format above,
given as a callable or an import path (``"pkg.module:fn"``) so a LightningCLI YAML can name it.
"""

from __future__ import annotations

from lightning_mlflow_cv.tasks._base import (
    CVTask,
    FormatProblem,
    PanelOptions,
    describe,
    describe_short,
    load_output_fn,
    logits_and_batch_targets,
)
from lightning_mlflow_cv.tasks._registry import (
    adapt_outputs,
    check_model_outputs,
    check_model_preds,
    check_outputs,
    get_task,
    normalize_task,
    register,
    task_aliases,
    task_names,
)

# built-in tasks, in the order of the project's task table (each module registers itself)
from lightning_mlflow_cv.tasks import classification as _classification  # noqa: F401  isort: skip
from lightning_mlflow_cv.tasks import object_detection as _object_detection  # noqa: F401  isort: skip
from lightning_mlflow_cv.tasks import semantic_segmentation as _semantic_segmentation  # noqa: F401  isort: skip
from lightning_mlflow_cv.tasks import instance_segmentation as _instance_segmentation  # noqa: F401  isort: skip
from lightning_mlflow_cv.tasks import anomaly_detection as _anomaly_detection  # noqa: F401  isort: skip
from lightning_mlflow_cv.tasks import depth_estimation as _depth_estimation  # noqa: F401  isort: skip

#: The canonical names of the built-in tasks (also the logger's ``task`` tag values).
TASKS: tuple[str, ...] = task_names()
#: Short names accepted everywhere a task is named.
TASK_ALIASES: dict[str, str] = task_aliases()

__all__ = [
    "TASKS",
    "TASK_ALIASES",
    "CVTask",
    "FormatProblem",
    "PanelOptions",
    "adapt_outputs",
    "check_model_outputs",
    "check_model_preds",
    "check_outputs",
    "describe",
    "describe_short",
    "get_task",
    "load_output_fn",
    "logits_and_batch_targets",
    "normalize_task",
    "register",
    "task_aliases",
    "task_names",
]
