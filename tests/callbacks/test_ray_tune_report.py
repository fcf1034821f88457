"""RayTuneReportCallback's pure parts (the callback inside real Ray trials: tests/test_hpo_ray.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_mlflow_cv.callbacks import RayTuneReportCallback
from lightning_mlflow_cv.callbacks.ray_tune_report import report_dict


def test_report_dict_floats_scalars_and_names_missing_metrics():
    metrics = {"val/loss": torch.tensor(0.25), "val/acc": 0.5, "val/cm": torch.zeros(2, 2)}
    assert report_dict(metrics, None) == {"val/loss": 0.25, "val/acc": 0.5}  # the non-scalar is skipped
    assert report_dict(metrics, ["val/acc"]) == {"val/acc": 0.5}
    with pytest.raises(KeyError, match=r"metric 'val/iou' was not logged .* logged: \['val/acc', 'val/cm', 'val/loss'\]"):
        report_dict(metrics, ["val/iou"])


@pytest.mark.parametrize("bad", [[1], [""], 3])
def test_metrics_argument_is_checked(bad):
    with pytest.raises(TypeError, match=r"`metrics` must be None \(all\) or a list of metric names"):
        RayTuneReportCallback(bad)
    assert RayTuneReportCallback("val/loss").metrics == ["val/loss"]
