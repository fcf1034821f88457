"""Smoke runs of what the README tells users to run: the detection and segmentation example YAMLs (through the
CLI, with fewer epochs and batches) and `make demo`'s `run_demo` (one epoch). Each asserts the run, its
artifacts and a sane metric; the README's metric values need the full runs (minutes), not these."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path or None):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def cli_fit(config: str, tracking_uri: str, *extra: str) -> str:
    from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

    cli = MLflowCVCLI(
        args=["fit", "--config", str(REPO / config), *SHORT, f"--trainer.logger.init_args.tracking_uri={tracking_uri}", *extra]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    return cli.trainer.logger.run_id


def test_detection_example_yaml(tracking_uri):
    run_id = cli_fit("examples/detection/config.yaml", tracking_uri, "--data.init_args.num_train=32",
                     "--data.init_args.num_val=16")  # fmt: skip
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "faster-rcnn-tiny"
    assert run.data.tags["task"] == "object-detection"
    m = run.data.metrics
    assert 0.0 <= m["val/mAP50"] <= 1.0 and 0.0 <= m["val/mAP50-95"] <= m["val/mAP50"]
    assert "best/val/mAP50" in m and m["best/epoch"] == 0
    arts = artifact_paths(client, run_id)
    assert "configs/config.yaml" in arts
    assert any(p.startswith("images/") and p.endswith(".png") for p in arts), arts  # the prediction grid
    assert any(p.startswith("cv_metrics/val/") for p in arts), arts


def test_segmentation_example_yaml(tracking_uri):
    run_id = cli_fit("examples/segmentation/config.yaml", tracking_uri, "--data.init_args.num_train=32",
                     "--data.init_args.num_val=16")  # fmt: skip
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "semantic-segmentation"
    m = run.data.metrics
    assert 0.0 <= m["val/mIoU"] <= 1.0 and 0.0 <= m["val/pixel_acc"] <= 1.0
    assert "val/per_class_IoU/background" in m and m["best/epoch"] == 0
    arts = artifact_paths(client, run_id)
    assert "configs/config.yaml" in arts
    assert any(p.startswith("images/") and p.endswith(".png") for p in arts), arts
    assert any("confusion" in p for p in arts), arts


def test_make_demo_run_demo(tracking_uri):
    from lightning_mlflow_cv.demos.digits import run_demo

    out = run_demo(max_epochs=1, experiment_name="demo-smoke", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-cnn"
    assert out["metrics"]["val/acc"] > 0.5  # ten classes: chance is 0.1; one epoch of the demo CNN gets far above
    assert out["test"] and 0.0 <= out["test"][0]["test/acc"] <= 1.0
    assert out["models"], "the demo registers its model"
    arts = artifact_paths(client, out["run_id"])
    assert any(p.endswith(".onnx") for p in arts), arts
    assert any(p.startswith("images/") for p in arts), arts
