"""The team setup: `mlflow server` on PostgreSQL with proxied artifacts and basic auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MlflowServer
from mlflow import MlflowClient
from tiny import N_METRICS, TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._delivery.journal import metric_points

pytestmark = [pytest.mark.server, pytest.mark.slow]
ADMIN, PASSWORD = "admin", "Team-s3cret-Pw-42"


@pytest.fixture
def team_server(tmp_path, postgres, monkeypatch):
    root = tmp_path / "team"
    root.mkdir()
    ini = root / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "test-only-flask-key")
    server = MlflowServer(root, backend_uri=postgres.uri(), extra=["--app-name", "basic-auth"])
    server.start(timeout=120)
    try:
        yield server
    finally:
        server.stop()


def _all_text(client: MlflowClient, run_id: str, dest: Path) -> str:
    """Every param, tag and artifact text of a run, concatenated."""
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    local = Path(client.download_artifacts(run_id, "", str(dest)))
    for f in local.rglob("*"):
        if f.is_file():
            parts.append(f.read_bytes().decode("utf-8", "ignore"))
    return "\n".join(parts)


def test_team_server_train_register_and_wrong_credentials(team_server, tmp_path, monkeypatch, capfd, recwarn):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    train, val = loaders()

    # 1. train with credentials from the environment
    logger = MLflowCVLogger(tracking_uri=team_server.uri, experiment_name="team", tags={"task": "classification"})
    tr = trainer(logger, max_epochs=1)
    tr.fit(TinyModel(), train, val)
    client = MlflowClient(team_server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(logger.run_id, "train/m0")) == 16
    # artifacts go through the server's proxy (mlflow-artifacts:/), not to a path this process can see
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")

    # 2. register a model version from the run
    weights = tmp_path / "model.pt"
    import torch

    torch.save(TinyModel().state_dict(), weights)
    logger.log_artifact(weights, "model")
    logger.finalize("success")
    client.create_registered_model("team-tiny")
    mv = client.create_model_version("team-tiny", f"runs:/{logger.run_id}/model", run_id=logger.run_id)
    client.set_registered_model_alias("team-tiny", "champion", mv.version)
    assert client.get_model_version_by_alias("team-tiny", "champion").run_id == logger.run_id

    # 3. wrong credentials: one clear warning, training finishes, metrics kept in the spool
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "definitely-wrong")
    recwarn.clear()
    bad = MLflowCVLogger(tracking_uri=team_server.uri, experiment_name="team", request_timeout_s=5)
    tr = trainer(bad, max_epochs=1)
    tr.fit(TinyModel(), train, val)
    assert tr.global_step == 16 and bad.offline
    auth = [str(w.message) for w in recwarn if "refused the credentials" in str(w.message)]
    assert len(auth) == 1 and "MLFLOW_TRACKING_PASSWORD" in auth[0]
    spool = bad.last_spool_path
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    keys = [k for r in lines if r["t"] == "m" for k, _ in metric_points(r)]
    assert sum(k.startswith("train/m") for k in keys) == 16 * N_METRICS  # every step's 8 metrics
    assert keys.count("val/loss") == 1

    # 4. the password never appears in output, warnings, the spool, or the good run's params/tags/artifacts
    out = capfd.readouterr()
    texts = [out.out, out.err, *(str(w.message) for w in recwarn)]
    texts += [p.read_text(errors="ignore") for p in spool.parent.rglob("*") if p.is_file()]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    texts.append(_all_text(client, logger.run_id, tmp_path / "dl"))
    for secret in (PASSWORD, "definitely-wrong"):
        assert not any(secret in t for t in texts), secret

    # 5. with the credentials fixed, `sync` delivers the spooled run
    exe = str(Path(sys.executable).with_name("lightning-mlflow-cv"))
    res = subprocess.run([exe, "sync", str(spool)], capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert res.returncode == 0, res.stderr[-2000:]
    synced = json.loads(res.stdout.strip().splitlines()[-1])["run_id"]
    assert len(client.get_metric_history(synced, "train/m7")) == 16
