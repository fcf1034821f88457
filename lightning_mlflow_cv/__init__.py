"""lightning-mlflow-cv: MLflow best practice for computer-vision training with PyTorch Lightning."""

from lightning_mlflow_cv._spool import sync
from lightning_mlflow_cv.logger import MLflowCVLogger
from lightning_mlflow_cv.pipeline import pipeline_run

__version__ = "0.1.0"
__all__ = ["MLflowCVLogger", "pipeline_run", "sync", "__version__"]
