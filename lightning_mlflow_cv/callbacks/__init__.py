"""The plugin's callbacks, one per module."""

from lightning_mlflow_cv.callbacks.augmentation_samples import AugmentationSamplesCallback
from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
from lightning_mlflow_cv.callbacks.dataset_lineage import DatasetLineageCallback
from lightning_mlflow_cv.callbacks.gradcam import GradCAMCallback
from lightning_mlflow_cv.callbacks.inference_latency import InferenceLatencyCallback
from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback
from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback
from lightning_mlflow_cv.callbacks.prediction_grid import PredictionGridCallback
from lightning_mlflow_cv.callbacks.ray_tune_report import RayTuneReportCallback
from lightning_mlflow_cv.callbacks.reproducibility import ReproducibilityCallback
from lightning_mlflow_cv.callbacks.save_config import MLflowSaveConfigCallback
from lightning_mlflow_cv.callbacks.system_metrics import SystemMetricsCallback

__all__ = [
    "AugmentationSamplesCallback",
    "CVMetricsCallback",
    "DatasetLineageCallback",
    "GradCAMCallback",
    "InferenceLatencyCallback",
    "MLflowSaveConfigCallback",
    "ModelRegistryCallback",
    "ONNXExportCallback",
    "PredictionGridCallback",
    "RayTuneReportCallback",
    "ReproducibilityCallback",
    "SystemMetricsCallback",
]
