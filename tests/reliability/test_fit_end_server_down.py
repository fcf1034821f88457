"""Fit-end callbacks (ONNX, latency, registry) while the server is down: results survive, uploads wait."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient

from lightning_mlflow_cv import InferenceLatencyCallback, MLflowCVLogger, ModelRegistryCallback, ONNXExportCallback
from lightning_mlflow_cv._delivery.journal import metric_points
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

pytestmark = [pytest.mark.server, pytest.mark.slow]


class _StopServerBeforeFitEnd(pl.Callback):
    def __init__(self, server) -> None:
        self.server = server

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1 and not trainer.sanity_checking:
            self.server.stop()


def test_fit_end_callbacks_with_server_down_keep_results_and_spool_uploads(mlflow_server, tmp_path, capfd):
    logger = MLflowCVLogger(
        tracking_uri=mlflow_server.uri, experiment_name="fitend", request_timeout_s=1, finalize_timeout_s=2
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    onnx, reg = ONNXExportCallback(), ModelRegistryCallback("fitend-digits")
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=logger, enable_progress_bar=False,
        default_root_dir=str(tmp_path / "root"),
        callbacks=[ckpt, _StopServerBeforeFitEnd(mlflow_server), onnx, InferenceLatencyCallback(iters=10, warmup=2), reg],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    # the fit result and its checkpoint survive
    assert trainer.state.finished and Path(ckpt.best_model_path).is_file()
    assert onnx.onnx_path is not None and Path(onnx.onnx_path).is_file()
    assert reg.version is None and reg.kept_model_dir is not None and Path(reg.kept_model_dir).is_dir()
    # pending uploads (ONNX file, latency metrics, final status) are in the spool, whose path is printed
    spool = logger.last_spool_path
    assert spool is not None and spool.is_file()
    err = capfd.readouterr().err
    assert str(spool) in err and str(reg.kept_model_dir) in err
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert any(r["t"] == "a" and r.get("dst") == "onnx" for r in records)
    assert any(r["t"] == "m" and "latency/torch/p95_ms" in dict(metric_points(r)) for r in records)

    # once the server is back, sync delivers them
    mlflow_server.start()
    exe = str(Path(sys.executable).with_name("lightning-mlflow-cv"))
    res = subprocess.run([exe, "sync", str(spool)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(logger.run_id)
    assert "latency/torch/p95_ms" in run.data.metrics and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(logger.run_id, "onnx")] == ["onnx/model.onnx"]
