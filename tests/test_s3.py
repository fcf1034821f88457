"""An S3 artifact store for real: moto's S3 server on 127.0.0.1, both ways MLflow uses one.

- ``proxied``: ``mlflow server --artifacts-destination s3://...``; only the server has S3 credentials, the client
  uploads over HTTP (it has no AWS variables at all).
- ``direct``: ``mlflow server --default-artifact-root s3://... --no-serve-artifacts``; the client writes to S3
  itself with its own credentials and ``MLFLOW_S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
from conftest import MlflowServer, S3Server
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger, ModelRegistryCallback, ReproducibilityCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule, demo_callbacks

pytestmark = [pytest.mark.server, pytest.mark.slow]
_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL")


def _server(tmp_path: Path, s3: S3Server, mode: str) -> MlflowServer:
    root = tmp_path / "server"
    root.mkdir()
    if mode == "proxied":
        return MlflowServer(root, env=s3.env(), artifacts=["--artifacts-destination", f"s3://{s3.BUCKET}/proxied"])
    return MlflowServer(root, artifacts=["--default-artifact-root", f"s3://{s3.BUCKET}/direct", "--no-serve-artifacts"])


class _S3Outage(pl.Callback):
    """Stops the object store after the first validation and starts it again after the second one."""

    def __init__(self, s3: S3Server) -> None:
        self.s3 = s3
        self.flushed_during_outage: bool | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if trainer.current_epoch == 0:
            trainer.logger.flush(timeout=30)  # epoch 0's grid reached S3 before the outage
            self.s3.stop()
        elif trainer.current_epoch == 1:
            self.flushed_during_outage = trainer.logger.flush(timeout=30)  # epoch 1's grid cannot be stored
            self.s3.start()


@pytest.mark.parametrize("mode", ["proxied", "direct"])
def test_full_callback_set_on_s3_survives_an_object_store_outage(s3_server, tmp_path, monkeypatch, mode, recwarn):
    for var in _AWS:
        monkeypatch.delenv(var, raising=False)
    if mode == "direct":
        for k, v in s3_server.env().items():
            monkeypatch.setenv(k, v)
    server = _server(tmp_path, s3_server, mode)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", server.uri)  # MLflow's set_registry_uri leaves it behind otherwise
    try:
        _fit_and_check(server, s3_server, mode, tmp_path, recwarn)
    finally:
        server.stop()


def _fit_and_check(server: MlflowServer, s3: S3Server, mode: str, tmp_path: Path, recwarn) -> None:
    pl.seed_everything(0)
    name = f"s3-digits-{mode}"
    logger = MLflowCVLogger(
        tracking_uri=server.uri, experiment_name=f"s3-{mode}", log_model=True, flush_interval_s=0.5, request_timeout_s=15
    )
    callbacks = [c for c in demo_callbacks() if type(c).__name__ not in ("ModelRegistryCallback", "GradCAMCallback")]
    outage = _S3Outage(s3)
    registry = ModelRegistryCallback(name)  # no gates: the first version becomes the champion
    callbacks += [ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max"), outage, registry]
    tr = pl.Trainer(
        max_epochs=3, limit_train_batches=4, limit_val_batches=2, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    dm = DigitsDataModule(batch_size=32, augment=False)
    tr.fit(DigitsClassifier(), datamodule=dm)

    # the outage was hit: one warning naming the object store, and the flush during it did not complete
    assert outage.flushed_during_outage is False
    warned = [str(w.message) for w in recwarn if "MLflowCVLogger: cannot reach" in str(w.message)]
    assert len(warned) == 1, warned
    if mode == "direct":
        assert "S3 artifact store" in warned[0] and s3.endpoint in warned[0], warned[0]

    # nothing lost: the run finished, every point and every artifact arrived, nothing is left in the spool
    client = MlflowClient(server.uri, registry_uri=server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(logger.run_id, "val/acc")) == 3
    assert logger.last_spool_path is None and not list(Path(os.environ["LIGHTNING_MLFLOW_CV_SPOOL_DIR"]).glob("*.jsonl"))
    exp = client.get_experiment(run.info.experiment_id)
    if mode == "proxied":
        assert exp.artifact_location.startswith("mlflow-artifacts:")
        prefix = f"proxied/{run.info.experiment_id}/{logger.run_id}/artifacts/"
    else:
        assert run.info.artifact_uri == f"s3://{s3.BUCKET}/direct/{run.info.experiment_id}/{logger.run_id}/artifacts"
        prefix = f"direct/{run.info.experiment_id}/{logger.run_id}/artifacts/"
    keys = [k[len(prefix) :] for k in s3.keys(prefix)]
    grids = sorted(k for k in keys if k.startswith("images/val~predictions+step+") and not k.endswith("+compressed.webp"))
    assert sorted(int(k.split("+step+")[1].split("+")[0]) for k in grids) == [0, 1, 2], keys  # step = epoch
    assert "onnx/model.onnx" in keys
    ckpts = [k for k in keys if k.endswith(".ckpt")]
    assert ckpts and all(k.split("/")[0] + "/metadata.yaml" in keys for k in ckpts), keys
    assert any(k.startswith("augmentations/") for k in keys) and any(k.endswith(".png") and "confusion" in k for k in keys), keys
    listed = {a.path for a in client.list_artifacts(logger.run_id, "onnx")}
    assert listed == {"onnx/model.onnx"}  # what the MLflow UI lists is what S3 holds

    # the registered model lives in S3 and loads back by alias
    assert registry.version == "1" and registry.decision.promoted, (registry.decision, registry.kept_model_dir)
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.run_id == logger.run_id
    model_keys = [k for k in s3.keys(f"{mode}/{run.info.experiment_id}/models/")]
    assert any(k.endswith("/MLmodel") for k in model_keys), model_keys
    mlflow.set_tracking_uri(server.uri)  # what a serving process does (its registry URI follows; env restored by monkeypatch)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    raw = dm.val_set.images[:4].permute(0, 2, 3, 1).numpy()
    probs = served.predict(raw)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)


WRONG = "Wrong-S3-Secret-0123456789"


def test_wrong_s3_credentials_one_clear_warning_and_no_secret_in_the_run(tmp_path, monkeypatch, capfd, recwarn):
    root = tmp_path / "s3"
    root.mkdir()
    s3 = S3Server(root, auth=True)
    s3.start()
    server = None
    try:
        key_id, secret = s3.credentials()
        for var in _AWS:
            monkeypatch.delenv(var, raising=False)
        for k, v in s3.env(secret=WRONG).items():  # the right key id with the wrong secret
            monkeypatch.setenv(k, v)
        server = _server(tmp_path, s3, "direct")
        server.start()
        logger = MLflowCVLogger(tracking_uri=server.uri, experiment_name="s3-creds", request_timeout_s=5, finalize_timeout_s=5)
        logger.log_hyperparams({"lr": 0.05, "aws_secret_access_key": WRONG})
        train, val = loaders()
        tr = trainer(logger, max_epochs=1, callbacks=[ReproducibilityCallback(seed=1)])
        tr.fit(TinyModel(), train, val)
        assert tr.global_step == 16

        warned = [str(w.message) for w in recwarn if "refused the credentials" in str(w.message)]
        assert len(warned) == 1, [str(w.message) for w in recwarn]
        assert "S3 artifact store" in warned[0] and "AWS_SECRET_ACCESS_KEY" in warned[0]
        spool = logger.last_spool_path
        assert spool is not None and spool.is_file()  # the artifacts (and what followed them) wait there
        client = MlflowClient(server.uri)
        run = client.get_run(logger.run_id)
        out = capfd.readouterr()
        texts = [json.dumps(run.data.params), json.dumps(run.data.tags), out.out, out.err]
        texts += [str(w.message) for w in recwarn]
        texts += [p.read_text(errors="ignore") for p in spool.parent.rglob("*") if p.is_file()]

        # with the credentials fixed, `sync` delivers the artifacts; none of them holds a secret either
        env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret}
        exe = str(Path(sys.executable).with_name("lightning-mlflow-cv"))
        res = subprocess.run([exe, "sync", str(spool)], capture_output=True, text=True, timeout=180, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        prefix = f"direct/{run.info.experiment_id}/{logger.run_id}/artifacts/"
        keys = s3.keys(prefix)
        assert keys, "nothing reached S3 after the fix"
        s3c = s3.client()
        texts += [s3c.get_object(Bucket=s3.BUCKET, Key=k)["Body"].read().decode("utf-8", "ignore") for k in keys]
        assert client.get_run(logger.run_id).info.status == "FINISHED"
        for text in texts:
            assert WRONG not in text and secret not in text
    finally:
        if server is not None:
            server.stop()
        s3.stop()


def test_s3_failures_are_retried():
    """Every S3 failure keeps the data in the spool and retries: connection, 5xx, throttling, credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from lightning_mlflow_cv._delivery.deliverer import describe_failure, is_retryable

    errors = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9/mlflow/x"),
        ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject"),
        ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"),
        ClientError({"Error": {"Code": "InvalidAccessKeyId"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"),
    ]
    assert all(is_retryable(e) for e in errors)
    assert "unreachable" in describe_failure(errors[0]) and "127.0.0.1:9" in describe_failure(errors[0])
    assert "refused the credentials (InvalidAccessKeyId)" in describe_failure(errors[3])
