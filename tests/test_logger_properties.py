"""The logger's public read-only properties that callbacks use instead of its private attributes."""

from __future__ import annotations

import pytest

from lightning_mlflow_cv.logger import MLflowCVLogger


def test_read_only_properties_mirror_the_run(tracking_uri):
    logger = MLflowCVLogger(experiment_name="props", tracking_uri=tracking_uri, request_timeout_s=3)
    assert logger.tracking_uri == tracking_uri and logger.request_timeout_s == 3.0
    logger.log_hyperparams({"lr": 0.1, "model": {"width": 4}})
    assert dict(logger.logged_params) == {"lr": "0.1", "model/width": "4"}
    with pytest.raises(AttributeError):
        logger.tracking_uri = "sqlite:///elsewhere.db"  # type: ignore[misc]
    with pytest.raises(TypeError):
        logger.logged_params["lr"] = "1"  # type: ignore[index]
    assert logger.flush()

    resumed = MLflowCVLogger(tracking_uri=tracking_uri, run_id=logger.run_id)
    resumed.log_metrics({"x": 1.0}, step=0)  # starts the logger on the existing run
    assert dict(resumed.logged_params) == {"lr": "0.1", "model/width": "4"}  # the run's own params
    assert resumed.flush()
