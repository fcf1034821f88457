"""lightning-mlflow-cv: MLflow best practice for computer-vision training with PyTorch Lightning.

Public names are imported lazily (PEP 562), so ``import lightning_mlflow_cv`` and the background writer
process stay light; ``from lightning_mlflow_cv import MLflowCVLogger`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AugmentationSamplesCallback": "lightning_mlflow_cv.callbacks.augmentation_samples",
    "CVMetricsCallback": "lightning_mlflow_cv.callbacks.cv_metrics",
    "DatasetLineageCallback": "lightning_mlflow_cv.callbacks.dataset_lineage",
    "GradCAMCallback": "lightning_mlflow_cv.callbacks.gradcam",
    "InferenceLatencyCallback": "lightning_mlflow_cv.callbacks.inference_latency",
    "MLflowCVCLI": "lightning_mlflow_cv.cli_lightning",
    "MLflowCVLogger": "lightning_mlflow_cv.logger",
    "MLflowSaveConfigCallback": "lightning_mlflow_cv.callbacks.save_config",
    "ModelRegistryCallback": "lightning_mlflow_cv.callbacks.model_registry",
    "ONNXExportCallback": "lightning_mlflow_cv.callbacks.onnx_export",
    "PredictionGridCallback": "lightning_mlflow_cv.callbacks.prediction_grid",
    "ReproducibilityCallback": "lightning_mlflow_cv.callbacks.reproducibility",
    "SystemMetricsCallback": "lightning_mlflow_cv.callbacks.system_metrics",
    "evaluate": "lightning_mlflow_cv.evaluation",
    "pipeline_run": "lightning_mlflow_cv.pipeline",
    "promote": "lightning_mlflow_cv.promotion",
    "sync": "lightning_mlflow_cv.spool_sync",
}
__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    __version__: str
    from lightning_mlflow_cv.callbacks import (
        AugmentationSamplesCallback,
        CVMetricsCallback,
        DatasetLineageCallback,
        GradCAMCallback,
        InferenceLatencyCallback,
        MLflowSaveConfigCallback,
        ModelRegistryCallback,
        ONNXExportCallback,
        PredictionGridCallback,
        ReproducibilityCallback,
        SystemMetricsCallback,
    )
    from lightning_mlflow_cv.cli_lightning import MLflowCVCLI
    from lightning_mlflow_cv.evaluation import evaluate
    from lightning_mlflow_cv.logger import MLflowCVLogger
    from lightning_mlflow_cv.pipeline import pipeline_run
    from lightning_mlflow_cv.promotion import promote
    from lightning_mlflow_cv.spool_sync import sync


def _version() -> str:
    """One source for the version: pyproject.toml, read back from the installed distribution's metadata (on first
    use: importing ``importlib.metadata`` and scanning the path costs ~15 ms that ``import lightning_mlflow_cv``
    does not need to pay)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("lightning-mlflow-cv")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = version = _version()
        return version
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_mlflow_cv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
