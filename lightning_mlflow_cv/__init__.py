"""lightning-mlflow-cv: MLflow best practice for computer-vision training with PyTorch Lightning."""

from lightning_mlflow_cv._spool import sync
from lightning_mlflow_cv.callbacks import (
    AugmentationSamplesCallback,
    DatasetLineageCallback,
    GradCAMCallback,
    MLflowSaveConfigCallback,
    PredictionGridCallback,
    ReproducibilityCallback,
)
from lightning_mlflow_cv.cli_lightning import MLflowCVCLI
from lightning_mlflow_cv.logger import MLflowCVLogger
from lightning_mlflow_cv.pipeline import pipeline_run

__version__ = "0.1.0"
__all__ = [
    "AugmentationSamplesCallback",
    "DatasetLineageCallback",
    "GradCAMCallback",
    "MLflowCVCLI",
    "MLflowCVLogger",
    "MLflowSaveConfigCallback",
    "PredictionGridCallback",
    "ReproducibilityCallback",
    "__version__",
    "pipeline_run",
    "sync",
]
