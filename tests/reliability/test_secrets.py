"""Planted secrets never reach the store, the spool, warnings or printed output."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import fake_secrets as fake
import pytest
from conftest import make_git_repo, refused_port
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._facts.redact import REDACTED
from lightning_mlflow_cv.callbacks.reproducibility import ReproducibilityCallback

URI_PW = "S3cret-in-URI-77"
HP_TOKEN = "hp-token-SECRET-55"


def _run_text(client: MlflowClient, run_id: str, dest: Path) -> str:
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    dest.mkdir(parents=True, exist_ok=True)  # MLflow 2.4 requires it to exist
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


class _SpoolSnapshot(Callback):
    """Copies the run's spool directory (journal and staged artifact files) at train end, before the logger
    delivers it and removes it, so the test can search what was on local disk."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def on_train_end(self, trainer, pl_module) -> None:
        logger = trainer.logger
        logger.flush()
        shutil.copytree(logger.spool_path.parent, self.dest)


class _NeutralNames(TinyModel):
    """Credentials under hyperparameter names that say nothing about them."""

    def __init__(
        self,
        storage: dict,
        hub: str,
        notify: str,
        header: str,
        session: str,
        repo_auth: str,
        dataset_sha256: str,
        run_ref: str,
        checksum: str,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()


def _all_text(client: MlflowClient, run_id: str, dest: Path, spool: Path) -> dict[str, str]:
    """Every param, tag, artifact file and spool file of a run, by where it was found."""
    run = client.get_run(run_id)
    found = {"params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags)}
    dest.mkdir(parents=True, exist_ok=True)  # MLflow 2.4 requires it to exist
    local = Path(client.download_artifacts(run_id, "", str(dest)))
    for root, tag in ((local, "artifact"), (spool, "spool")):
        for f in sorted(root.rglob("*")):
            if f.is_file():
                found[f"{tag}:{f.relative_to(root)}"] = f.read_bytes().decode("utf-8", "ignore")
    return found


def test_credentials_by_shape_never_reach_the_store_or_the_spool(tmp_path, tracking_uri, monkeypatch):
    """Issue 33's scenario: a fit launched with secret flags on its command line, credentials under neutral
    hyperparameter names and in a dirty git tree; every param, tag, artifact and spool file is searched."""
    argv_pw, argv_hf = fake.password(), fake.hf_token(seed=50)
    monkeypatch.setattr(sys, "argv", ["fit.py", "--password", argv_pw, "--hf-token", argv_hf, "--lr", "0.05"])
    sha = make_git_repo(tmp_path)
    diff_token, diff_key = fake.github_token(seed=51), fake.pem_private_key(seed=52)
    (tmp_path / "train.py").write_text(f"HEADERS = {{'X-Api': '{diff_token}'}}\nKEY = '''\n{diff_key}\n'''\n")
    aws_id, aws_secret = fake.aws_key_id(), fake.aws_secret_key()
    hparams = {
        "storage": {"bucket": "s3://team-data/digits", "key_id": aws_id, "key": aws_secret},
        "hub": fake.hf_token(),
        "notify": fake.slack_bot_token(),
        "header": "Authorization: Bearer " + fake.opaque_token(),
        "session": fake.jwt(),
        "repo_auth": fake.github_token(),
    }
    # not secrets: a dataset digest, a run id and a model checksum stay as they are (and the git commit, a tag)
    keep = {
        "dataset_sha256": hashlib.sha256(b"digits").hexdigest(),
        "run_ref": uuid.UUID(int=12345).hex,
        "checksum": "md5:" + hashlib.md5(b"weights").hexdigest(),
    }
    model = _NeutralNames(**hparams, **keep)
    logger = MLflowCVLogger(experiment_name="shapes", tracking_uri=tracking_uri, flush_interval_s=0.5)
    train, val = loaders()
    spool = tmp_path / "spool-copy"
    trainer(logger, max_epochs=1, callbacks=[ReproducibilityCallback(seed=1), _SpoolSnapshot(spool)]).fit(
        model, train, val
    )

    found = _all_text(MlflowClient(tracking_uri), logger.run_id, tmp_path / "dl", spool)
    assert {"artifact:environment/system.json", "artifact:environment/git_diff.patch"} <= set(found)
    assert any(k.startswith("spool:") and k.endswith(".jsonl") for k in found), sorted(found)
    secrets = {
        "argv --password": argv_pw,
        "argv --hf-token": argv_hf,
        "diff GitHub token": diff_token,
        "diff private key": fake.pem_body(seed=52).splitlines()[2],
        "AWS key id": aws_id,
        "AWS secret key": aws_secret,
        "HF token": hparams["hub"],
        "Slack token": hparams["notify"],
        "bearer header": fake.opaque_token(),
        "JWT": hparams["session"],
        "GitHub token": hparams["repo_auth"],
    }
    leaks = [f"{what} in {where}" for what, s in secrets.items() for where, text in found.items() if s in text]
    assert not leaks, "\n".join(leaks)
    params, tags = json.loads(found["params"]), json.loads(found["tags"])
    assert params["dataset_sha256"] == keep["dataset_sha256"] and params["run_ref"] == keep["run_ref"]
    assert params["checksum"] == keep["checksum"] and tags["git_commit"] == sha
    assert (
        params["storage/bucket"] == "s3://team-data/digits" and params["header"] == "Authorization: Bearer " + REDACTED
    )
    system = json.loads(found["artifact:environment/system.json"])
    assert system["argv"] == ["fit.py", "--password", REDACTED, "--hf-token", REDACTED, "--lr", "0.05"]
    assert "HEADERS" in found["artifact:environment/git_diff.patch"]


class _Holder:
    """An object whose text (what MLflow stores for a param or tag that is not a string) holds a credential."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __str__(self) -> str:
        return f"Holder(auth={self.secret!r})"


def test_log_text_and_non_string_params_and_tags_are_redacted_by_shape(tmp_path, tracking_uri):
    token, key = fake.hf_token(seed=60), fake.github_token(seed=61)
    logger = MLflowCVLogger(experiment_name="shapes", tracking_uri=tracking_uri)
    logger.log_text(f"pulled with {token}\n", "notes/run.txt")
    logger.log_hyperparams({"hub": _Holder(token), "lr": 0.1})
    logger.set_tags({"deploy": _Holder(key), "mlflow.note.content": f"# Run\nrepo `{key}`"})
    logger.finalize("success")
    found = _all_text(MlflowClient(tracking_uri), logger.run_id, tmp_path / "dl", tmp_path / "none")
    assert "artifact:notes/run.txt" in found, sorted(found)
    for where, text in found.items():
        assert token not in text and key not in text, where
    params, tags = json.loads(found["params"]), json.loads(found["tags"])
    assert params["lr"] == "0.1" and params["hub"] == f"Holder(auth='{REDACTED}')"
    assert tags["mlflow.note.content"] == f"# Run\nrepo `{REDACTED}`"
