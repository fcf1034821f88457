"""MLflow 2.4 .. 3.x by feature detection (`lightning_mlflow_cv._compat.mlflow_api`).

This file runs in the main suite (MLflow 3 client) and in the compatibility leg (`make test-compat`), under
MLflow 2.22 and 2.4 clients, and with `LMC_TEST_SERVER_MLFLOW` naming an MLflow 2.22 server's executable.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from conftest import needs_newer
from faults import FaultProxy
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from PIL import Image

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv.callbacks.dataset_lineage import DatasetLineageCallback
from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.evaluation import classifier_metrics, evaluate
from lightning_mlflow_cv.promotion import promote

V = _compat.mlflow_version()


def test_feature_detection_matches_the_documented_mlflow_versions():
    """The README's support table, as detected on the installed MLflow."""
    assert _compat.has_logged_model_api() == (V >= (3, 0, 0))
    assert _compat.has_multimedia() == (V >= (2, 12, 0))
    assert _compat.has_meta_dataset() == (V >= (2, 10, 0))
    assert _compat.has_models_from_code() == (V >= (2, 13, 0))
    assert _compat.evaluate_takes_predictions() == (V >= (2, 8, 0))


@needs_newer("mlflow", "2.12", _compat.has_multimedia(), "compares with mlflow.tracking.multimedia")
@pytest.mark.parametrize("size", [(300, 40), (40, 300), (256, 256), (17, 9)])
def test_thumbnail_fallback_equals_mlflows(size, monkeypatch):
    from mlflow.tracking.multimedia import compress_image_size

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    monkeypatch.setattr(_compat, "has_multimedia", lambda: False)
    ours = _compat.compress_image_size(img)
    assert ours.size == compress_image_size(img).size
    assert np.array_equal(np.asarray(ours), np.asarray(compress_image_size(img)))


@needs_newer("mlflow", "2.10", _compat.has_meta_dataset(), "compares with mlflow.data.meta_dataset.MetaDataset")
@pytest.mark.parametrize("digest", [None, "abc123"])
def test_dataset_entity_fallback_equals_metadatasets(digest, monkeypatch):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = CodeDatasetSource({"uri": "/data/digits"})
    theirs = MetaDataset(source, name="digits", digest=digest)._to_mlflow_entity()
    monkeypatch.setattr(_compat, "has_meta_dataset", lambda: False)
    ours = _compat.meta_dataset(source, "digits", digest)
    for field in ("name", "digest", "source_type", "source"):
        assert getattr(ours, field) == getattr(theirs, field), field


@needs_newer("mlflow", "2.8", _compat.evaluate_takes_predictions(), "compares with evaluate(predictions=...)")
def test_classifier_metrics_fallback_equals_mlflow_evaluate(tracking_uri):
    """The metrics evaluate() computes itself on MLflow < 2.8 carry MLflow's names and values."""
    import pandas as pd

    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, 4, 200))
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(experiment_id="0"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = mlflow.models.evaluate(
                data=pd.DataFrame({"label": target, "prediction": pred}), targets="label", predictions="prediction",
                model_type="classifier", evaluators=["default"],
            )
    finally:
        mlflow.set_tracking_uri(None)
    ours = classifier_metrics(pred, target, 4)
    for k, v in ours.items():
        assert result.metrics[k] == pytest.approx(v, abs=1e-6), k


# -- a tracking server without the logged-model API (MLflow 2.x) --------------------------------------------------
class LogAtEnd(Callback):
    def on_train_end(self, trainer, pl_module):
        trainer.logger.log_image("compat/sample", np.full((8, 8, 3), 200, dtype=np.uint8), step=0)
        trainer.logger.log_metrics({"quality": 0.9}, step=trainer.global_step)


def _old_server_paths(method: str, path: str) -> int | bool:
    if "/logged-models" in path:
        return 404  # what an MLflow 2.x server answers (ENDPOINT_NOT_FOUND)
    if path.startswith("/version") and not os.environ.get("LMC_TEST_SERVER_MLFLOW"):
        return 404  # the simulated server does not tell its version
    return False


@pytest.fixture
def old_server(mlflow_server):
    """A real tracking server without LoggedModels: the real MLflow 2.22 server of the compatibility leg
    (``LMC_TEST_SERVER_MLFLOW``), or this MLflow's server behind a proxy answering 404 ENDPOINT_NOT_FOUND for the
    ``/logged-models`` endpoints, as 2.x servers do. A client without the logged-model API takes the same path."""
    with FaultProxy(mlflow_server.uri) as proxy:
        proxy.error_if = _old_server_paths
        yield proxy


def _artifacts(uri: str, run_id: str, dst) -> set[str]:
    """Every artifact path of the run (downloaded: MLflow 3's ``list_artifacts(run_id, path)`` asks the
    logged-model API too, which an MLflow 2.x server does not have)."""
    dst.mkdir()
    mlflow.set_tracking_uri(uri)  # MLflow 2.x resolves proxied artifacts with the global URI
    try:
        root = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="", dst_path=str(dst), tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(None)
    return {p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.server
@pytest.mark.slow
def test_register_promote_load_and_evaluate_without_logged_models(old_server, tmp_path):
    uri = old_server.uri
    # the fluent (global) URI points elsewhere: every upload must use the logger's own tracking URI
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    pl.seed_everything(0)
    logger = MLflowCVLogger(experiment_name="compat", tracking_uri=uri, flush_interval_s=0.5)
    reg = ModelRegistryCallback("digits-compat", gates={"quality": ">=0.5"}, compare_metric="quality",
                                class_names=[str(i) for i in range(10)])
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=logger,
        callbacks=[DatasetLineageCallback(), LogAtEnd(), reg], enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=".", enable_checkpointing=False,
    )
    dm = DigitsDataModule(batch_size=32, augment=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(DigitsClassifier(), datamodule=dm)
    mlflow.set_tracking_uri(None)
    notes = [str(w.message) for w in rec if "no logged-model API" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in rec]
    limit = f"MLflow {_compat.version_string()}" if not _compat.has_logged_model_api() else "MLflow "
    assert limit in notes[0] and "runs:/<run>/model" in notes[0]
    assert not [w for w in rec if "registering" in str(w.message)], "registration must not fail"

    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["registry.status"] == "registered" and reg.version == "1" and reg.decision.promoted
    mv = client.get_model_version("digits-compat", "1")
    assert mv.source == f"runs:/{logger.run_id}/model" and mv.run_id == logger.run_id
    assert mv.tags["lmc.model_source"].startswith("run artifacts: ") and "logged-model API" in mv.tags["lmc.model_source"]
    assert set(mv.aliases) == {"challenger", "champion"}
    files = _artifacts(uri, logger.run_id, tmp_path / "dl")
    assert {"model/MLmodel", "MODEL_CARD.md"} <= files
    assert any(p.startswith("images/compat~sample+step+0+") and p.endswith(".png") for p in files), files
    assert any(p.startswith("images/compat~sample+") and p.endswith("+compressed.webp") for p in files), files
    assert [d.dataset.name for d in run.inputs.dataset_inputs], "dataset inputs were not logged"

    # promote again from the CLI's function: gates read from the run, the champion stays on version 1
    decision = promote("digits-compat", 1, {"quality": ">=0.5"}, tracking_uri=uri)
    assert decision.promoted

    # load by alias, predict raw uint8 images, evaluate: no FAILED run, predictions table and metrics logged
    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model("models:/digits-compat@champion")
        raw = dm.val_set.images[:5].permute(0, 2, 3, 1).numpy()
        probs = served.predict(raw)
        assert probs.shape == (5, 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    finally:
        mlflow.set_tracking_uri(None)
    metrics = evaluate("models:/digits-compat@champion", dm.test_dataloader(), tracking_uri=uri)
    assert 0.0 <= metrics["accuracy_score"] <= 1.0 and {"f1_score", "roc_auc_macro"} <= set(metrics)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert "eval/predictions.json" in _artifacts(uri, logger.run_id, tmp_path / "dl2")
    assert {"path": "eval/predictions.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert run.data.metrics["accuracy_score"] == pytest.approx(metrics["accuracy_score"])
    assert torch.isfinite(torch.tensor(metrics["roc_auc_macro"]))


@pytest.mark.server
@pytest.mark.slow
def test_a_store_that_lacks_an_endpoint_is_not_called_down(mlflow_server, tmp_path):
    """A registry call answered 404 ENDPOINT_NOT_FOUND: the warning says the store lacks the call, not that it
    is down (waiting for it to come back would not help)."""
    with FaultProxy(mlflow_server.uri) as proxy:
        proxy.error_if = lambda method, path: 404 if "/model-versions/create" in path else False
        logger = MLflowCVLogger(experiment_name="lacks", tracking_uri=proxy.uri, flush_interval_s=0.5)
        reg = ModelRegistryCallback("digits-lacks", preprocess={"mean": [0.5], "std": [0.25]})
        trainer = pl.Trainer(
            max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger, callbacks=[reg],
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=".",
            enable_checkpointing=False,
        )
        with pytest.warns(RuntimeWarning, match=r"registering 'digits-lacks' failed.*ENDPOINT_NOT_FOUND") as rec:
            trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(batch_size=16, augment=False))
    msg = next(str(w.message) for w in rec if "registering" in str(w.message))
    assert "does not support this call" in msg and "when the store is back" not in msg
    assert (reg.kept_model_dir / "model" / "MLmodel").is_file()
