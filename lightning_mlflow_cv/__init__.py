"""lightning-mlflow-cv: MLflow best practice for computer-vision training with PyTorch Lightning."""

from lightning_mlflow_cv._spool import sync
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
)
from lightning_mlflow_cv.cli_lightning import MLflowCVCLI
from lightning_mlflow_cv.logger import MLflowCVLogger
from lightning_mlflow_cv.pipeline import pipeline_run
from lightning_mlflow_cv.registry import evaluate, promote

__version__ = "0.1.0"
__all__ = [
    "AugmentationSamplesCallback",
    "CVMetricsCallback",
    "DatasetLineageCallback",
    "GradCAMCallback",
    "InferenceLatencyCallback",
    "MLflowCVCLI",
    "MLflowCVLogger",
    "MLflowSaveConfigCallback",
    "ModelRegistryCallback",
    "ONNXExportCallback",
    "PredictionGridCallback",
    "ReproducibilityCallback",
    "__version__",
    "evaluate",
    "pipeline_run",
    "promote",
    "sync",
]
