"""Planted secrets never reach the store, the spool, warnings or printed output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import refused_port
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger

URI_PW = "S3cret-in-URI-77"
HP_TOKEN = "hp-token-SECRET-55"


def _run_text(client: MlflowClient, run_id: str, dest: Path) -> str:
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for f in Path(client.download_artifacts(run_id, "", str(dest))).rglob("*"):
        if f.is_file():
            parts.append(f.read_bytes().decode("utf-8", "ignore"))
    return "\n".join(parts)


@pytest.mark.server
def test_credentials_in_uri_and_secret_hparams_never_stored(mlflow_server, tmp_path, capfd, recwarn):
    uri = mlflow_server.uri.replace("http://", f"http://alice:{URI_PW}@")
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="secrets")
    logger.log_hyperparams({"data": {"url": f"s3://bob:{URI_PW}@bucket/x", "api_key": HP_TOKEN}, "lr": 0.1})
    logger.log_dict({"db": {"password": HP_TOKEN}}, "cfg/config.json")
    train, val = loaders()
    trainer(logger, max_epochs=1).fit(TinyModel(), train, val)
    client = MlflowClient(mlflow_server.uri)
    stored = _run_text(client, logger.run_id, tmp_path / "dl")
    assert "lr" in stored and "***REDACTED***" in stored
    out = capfd.readouterr()
    for text in (stored, out.out, out.err, *(str(w.message) for w in recwarn)):
        assert URI_PW not in text and HP_TOKEN not in text


@pytest.mark.slow  # waits out the logger's finalize timeout
def test_unreachable_uri_with_credentials_keeps_them_out_of_spool_and_warnings(tmp_path, capfd, recwarn):
    with refused_port() as port:
        uri = f"http://alice:{URI_PW}@127.0.0.1:{port}"
        logger = MLflowCVLogger(tracking_uri=uri, experiment_name="secrets", request_timeout_s=1)
        logger.log_hyperparams({"token": HP_TOKEN, "lr": 0.1})
        logger.log_metrics({"x": 1.0}, step=0)
        logger.finalize("success")
    spool = logger.last_spool_path
    assert spool is not None and spool.exists()
    texts = [p.read_text(errors="ignore") for p in spool.parent.rglob("*") if p.is_file()]
    out = capfd.readouterr()
    texts += [out.out, out.err, *(str(w.message) for w in recwarn)]
    assert any("127.0.0.1" in t for t in texts)  # the URI is there, without its credentials
    for text in texts:
        assert URI_PW not in text and HP_TOKEN not in text
