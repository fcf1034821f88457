"""Registry operations on a store without a Model Registry: one clear error naming the store and the fix.

Two real kinds of such a store: a tracking server whose registry endpoints answer 404 (a tracking-only
deployment or gateway; here a real `mlflow server` behind a proxy that answers 404 for `/registered-models`
and `/model-versions`), and a URI scheme MLflow has no registry store for.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from conftest import refused_port
from faults import FaultProxy
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback
from lightning_mlflow_cv.cli import promote_main
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.promotion import promote, registry_unsupported


def _no_registry(method: str, path: str) -> int | bool:
    return 404 if ("/registered-models" in path or "/model-versions" in path) else False


@pytest.fixture
def tracking_only(mlflow_server):
    with FaultProxy(mlflow_server.uri) as proxy:
        proxy.error_if = _no_registry
        yield proxy


@pytest.mark.server
def test_promote_on_a_tracking_only_server_names_the_store_and_the_fix(tracking_only, capsys):
    with pytest.raises(ValueError, match=r"promote: the store 'http://127\.0\.0\.1:\d+' does not support the MLflow Model "
                       r"Registry \(ENDPOINT_NOT_FOUND.*Fix: use a tracking URI whose store has a registry"):
        promote("digits-cnn", 1, {"val/acc": ">=0.9"}, tracking_uri=tracking_only.uri)
    assert promote_main(["-m", "digits-cnn", "-c", "1", "--tracking-uri", tracking_only.uri]) == 2
    assert "does not support the MLflow Model Registry" in capsys.readouterr().err


def test_promote_on_a_tracking_plugin_without_registry_store(tmp_path):
    """A tracking-store plugin (MLflow's `mlflow.tracking_store` mechanism) that registers no registry store: the
    plugin here serves a real SQLite tracking store under its own URI scheme, as such plugins do."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    def builder(store_uri: str, artifact_uri: str | None = None) -> SqlAlchemyStore:
        return SqlAlchemyStore("sqlite:///" + store_uri.split(":///", 1)[1], artifact_uri or str(tmp_path / "art"))

    _tracking_store_registry.register("lmcnoregistry", builder)
    uri = f"lmcnoregistry:///{tmp_path / 'plugin.db'}"
    MlflowClient(uri).search_experiments()  # the tracking side works
    with pytest.raises(ValueError, match=r"promote: the store 'lmcnoregistry:///.*' does not support the MLflow Model "
                       r"Registry \(FEATURE_DISABLED: Model Registry features are not supported.*Fix: use a tracking URI whose store has a registry"):
        promote("digits-cnn", 1, tracking_uri=uri)


@pytest.mark.server
@pytest.mark.slow
def test_registry_callback_fails_before_training_and_keeps_what_was_logged(tracking_only, mlflow_server):
    logger = MLflowCVLogger(experiment_name="noreg", tracking_uri=tracking_only.uri, flush_interval_s=0.5)
    logger.log_hyperparams({"lr": 0.01})
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
        callbacks=[ModelRegistryCallback("digits-cnn")], enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", default_root_dir=".", enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ModelRegistryCallback: the store .* does not support the MLflow Model Registry"):
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(batch_size=32, augment=False))
    assert trainer.global_step == 0, "the error must come before training"
    run = MlflowClient(mlflow_server.uri).get_run(logger.run_id)
    assert run.data.params["lr"] == "0.01"  # what was logged before the error is kept
    assert run.info.status == "FAILED"


def test_a_store_that_is_down_is_not_reported_as_unsupported():
    # an outage is a tracking failure (warning + spool at fit end), not a configuration mistake
    from lightning_mlflow_cv._delivery import http as _http

    with refused_port() as port, _http.fail_fast(0.5):
        down = f"http://127.0.0.1:{port}"
        assert registry_unsupported(MlflowClient(down, registry_uri=down)) is None


@pytest.mark.server
def test_a_store_with_a_registry_is_supported(mlflow_server, tmp_path):
    assert registry_unsupported(MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)) is None
    sqlite = f"sqlite:///{tmp_path / 'r.db'}"
    assert registry_unsupported(MlflowClient(sqlite, registry_uri=sqlite)) is None
