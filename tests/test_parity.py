"""Differential tests: the same scenario through Lightning's ``MLFlowLogger`` and ``MLflowCVLogger``, each on its own
real SQLite store, comparing what the stores hold and what the loggers report.

``MLflowCVLogger`` is a drop-in for ``MLFlowLogger``: everything below must come out the same, except the intended
differences listed in :data:`INTENDED_DIFFERENCES` (each also asserted here, so none creeps in by accident).
"""

from __future__ import annotations

import inspect
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from conftest import needs_newer
from mlflow import MlflowClient
from tiny import TinyModel, ctrl_c, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._facts.keys import MAX_PARAM_VAL_LENGTH

#: What differs on purpose, and why. Everything else is compared for equality.
INTENDED_DIFFERENCES = {
    "writes": "log_metrics/params only enqueue; the store has them after flush()/finalize() (non-blocking writer, "
    "never losing data when the store is down). synchronous=True makes each call block until stored, as in Lightning.",
    "long params": "values over 250 characters are kept up to MLflow's own limit (6000 in MLflow 3, 500 in 2.4) "
    "instead of cut at 250; longer ones are cut there and kept whole in the params/full_values.json artifact.",
    "secrets": "params and tags whose key looks secret (password, token, ...), URLs with credentials and values shaped "
    "like credentials (private keys, cloud keys, GitHub/HF/Slack tokens, JWTs, ...) are redacted.",
    "changed param": "logging a param again with another value warns instead of raising MLflow's exception.",
    "extra tags": "hardware and git_commit tags are added (CV tag schema).",
    "invalid keys": "param/tag keys MLflow rejects lose the rejected characters (one warning) instead of raising; "
    "metric keys Lightning keeps but MLflow rejects ('a//b', '..', over 250 chars) are repaired instead of raising.",
    "save_dir with SQLite/HTTP": "save_dir (and so trainer.log_dir) is a local directory (the save_dir argument, else "
    "the Trainer's default_root_dir) instead of None; checkpoints land in the same place as Lightning's.",
    "default store": "with no tracking_uri, sqlite:///mlflow.db in the cwd (MLflow 3's default) instead of file:./mlruns.",
    "Ctrl+C": "a KeyboardInterrupt ends the run KILLED instead of FAILED.",
    "resume": "fit(ckpt_path=...) with a new logger continues the checkpoint's run instead of starting a new one.",
}

KEYS = ["[some_metric]", "a@b", "val:acc", "x y", "ok-1.5/rate"]  # all accepted by Lightning's logger


class Scenario(TinyModel):
    """TinyModel plus metric keys Lightning renames and a test loop."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for i, k in enumerate(KEYS):
            self.log(k, loss.detach() * (i + 1))
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", torch.nn.functional.cross_entropy(self.layer(x), y))


def _make(kind: str, uri: str, **kw: Any):
    if kind == "lightning":
        return MLFlowLogger(tracking_uri=uri, **kw)
    return MLflowCVLogger(tracking_uri=uri, **kw)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real, migrated, empty SQLite store; each test copies it (MLflow's migrations take seconds per store)."""
    path = tmp_path_factory.mktemp("template") / "store.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def stores(tmp_path: Path, empty_store: Path) -> dict[str, tuple[str, Path]]:
    """A fresh SQLite store and root directory for each logger: {"lightning" | "ours": (uri, root)}."""
    out = {}
    for kind in ("lightning", "ours"):
        root = tmp_path / kind
        root.mkdir()
        shutil.copy(empty_store, root / "store.db")
        out[kind] = (f"sqlite:///{root / 'store.db'}", root)
    return out


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out: list[str] = []
    for f in client.list_artifacts(run_id, path or None):
        out.extend(_artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return sorted(out)


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


@pytest.mark.slow
@pytest.mark.parametrize("log_model", [False, True, "all"])
def test_fit_and_test_store_the_same_run(tmp_path, stores, log_model):
    """Experiment and run naming, params (> 100), metric histories across fit and test, key renaming, context tags,
    artifact_location, checkpoint files and metadata (log_model), checkpoint location, statuses."""
    seen: dict[str, dict[str, Any]] = {}
    for kind, (uri, root) in stores.items():
        logger = _make(
            kind, uri, experiment_name="parity", run_name="run-a", tags={"team": "vision"}, log_model=log_model,
            artifact_location=str(root / "artifacts"),
        )
        logger.log_hyperparams({f"p{i:03d}": i * 0.5 for i in range(150)} | {"opt:lr": 0.1, "nested": {"a": 1}})
        pl.seed_everything(0)
        model = Scenario(lr=0.05)
        train, val = loaders()
        ckpt = ModelCheckpoint(monitor="val/loss", save_top_k=1, save_last=True)
        tr = trainer(logger, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt], default_root_dir=str(root))
        tr.fit(model, train, val)
        tr.test(model, val, verbose=False)
        client = MlflowClient(uri)
        run = client.get_run(logger.run_id)
        exp = client.get_experiment(run.info.experiment_id)
        files = _artifacts(client, logger.run_id)
        meta = {
            f: yaml.safe_load(Path(client.download_artifacts(logger.run_id, f, str(root / "dl"))).read_text())
            for f in files
            if f.endswith(("metadata.yaml", "aliases.txt"))
        }
        seen[kind] = {
            "experiment": exp.name,
            "artifact_location": exp.artifact_location.replace(str(root), "<root>"),
            "name/version": (logger.name, logger.version) == (exp.experiment_id, run.info.run_id),
            "run_name": run.info.run_name,
            "status": run.info.status,
            "params": run.data.params,
            "histories": _histories(client, logger.run_id),
            "tags": run.data.tags,
            "files": files,
            "meta": meta,
            "ckpt_dir": "/".join(
                {exp.experiment_id: "<exp>", run.info.run_id: "<run>"}.get(part, part)
                for part in ("<root>", *Path(ckpt.dirpath).relative_to(root).parts)
            ),
        }
    ours, theirs = seen["ours"], seen["lightning"]
    for field in ("experiment", "artifact_location", "name/version", "run_name", "status", "params", "ckpt_dir"):
        assert ours[field] == theirs[field], field
    assert ours["histories"] == theirs["histories"]  # every key, step and value, fit and test
    assert {"some_metric", "ab", "valacc", "x y", "ok-1.5/rate", "test/loss", "epoch"} <= set(ours["histories"])
    assert len(ours["params"]) == 150 + 2 + 3 and ours["params"]["opt:lr"] == "0.1" and ours["params"]["nested/a"] == "1"
    assert ours["artifact_location"] == "<root>/artifacts"
    assert ours["ckpt_dir"] == "<root>/<exp>/<run>/checkpoints"
    # context tags (mlflow.user, mlflow.source.*, git) and the user's tags are the same; ours add the CV tags
    extra = set(ours["tags"]) - set(theirs["tags"])
    assert extra == {"hardware", "git_commit"}, INTENDED_DIFFERENCES["extra tags"]
    assert {k: v for k, v in ours["tags"].items() if k not in extra} == theirs["tags"]
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "team"} <= set(theirs["tags"])
    # log_model: the same checkpoint files, metadata.yaml (all ModelCheckpoint settings) and aliases
    assert ours["files"] == theirs["files"]
    assert ours["meta"] == theirs["meta"]
    if log_model:
        assert any(f.endswith(".ckpt") for f in ours["files"])
        checkpoint_meta = next(m for f, m in ours["meta"].items() if f.endswith("metadata.yaml"))["Checkpoint"]
        assert {"monitor", "mode", "save_last", "save_top_k", "save_weights_only", "_every_n_train_steps"} <= set(
            checkpoint_meta
        )
    else:
        assert ours["files"] == []


def test_run_id_run_name_prefix_and_statuses(tmp_path, stores):
    """run_id= continues a given run; run_name names a new one; prefix joins with '-'; finalize statuses."""
    seen: dict[str, dict[str, Any]] = {}
    for kind, (uri, _) in stores.items():
        client = MlflowClient(uri)
        exp_id = client.create_experiment("given")
        given = client.create_run(exp_id, run_name="given-run").info.run_id
        a = _make(kind, uri, run_id=given, prefix="pre")
        a.log_metrics({"loss": 1.0, "val:acc": 0.5}, step=3)
        a.finalize("success")
        statuses = {}
        for status in ("success", "finished", "failed"):
            lg = _make(kind, uri, experiment_name="statuses", run_name=f"r-{status}")
            lg.log_metrics({"m": 1.0}, step=0)
            lg.finalize(status)
            statuses[status] = (client.get_run(lg.run_id).info.status, client.get_run(lg.run_id).info.run_name)
        run = client.get_run(given)
        seen[kind] = {
            "run_id": a.run_id == given,
            "experiment_id": a.experiment_id == exp_id,
            "runs": len(client.search_runs([exp_id])),
            "run_name": run.info.run_name,
            "metrics": run.data.metrics,
            "status": run.info.status,
            "statuses": statuses,
        }
    assert seen["ours"] == seen["lightning"]
    assert seen["ours"]["metrics"] == {"pre-loss": 1.0, "pre-valacc": 0.5}
    assert seen["ours"]["statuses"]["failed"] == ("FAILED", "r-failed")


def test_fluent_uri_and_no_stray_store(tmp_path, stores):
    """Both set MLflow's fluent tracking URI, so user code can reopen the run with `mlflow.start_run`."""
    for kind, (uri, _) in stores.items():
        mlflow.set_tracking_uri(None)
        logger = _make(kind, uri)
        run_id = logger.run_id
        assert mlflow.get_tracking_uri() == uri, kind
        with mlflow.start_run(run_id=run_id):
            mlflow.log_param("from_user_code", kind)
        logger.finalize("success")
        assert MlflowClient(uri).get_run(run_id).data.params["from_user_code"] == kind
    assert not (tmp_path / "mlflow.db").exists()
    # no file store either; MLflow 2.x does make ./mlruns as the SQLite stores' default artifact root, but empty
    assert not [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]


@pytest.mark.slow
def test_pickling_before_and_after_use(tmp_path, stores):
    """A Trainer (and so its logger) is pickled by ddp_spawn, Ray and other launchers, before or after the run
    exists; a copy logs into the same run."""
    for kind, (uri, _) in stores.items():
        fresh = pickle.loads(pickle.dumps(_make(kind, uri, experiment_name="pickled")))
        fresh.log_metrics({"m": 1.0}, step=0)
        fresh.finalize("success")
        used = _make(kind, uri, experiment_name="pickled")
        used.log_metrics({"m": 1.0}, step=0)
        copy = pickle.loads(pickle.dumps(used))
        assert copy.run_id == used.run_id
        copy.log_metrics({"m": 2.0}, step=1)
        copy.finalize("success")
        used.finalize("success")
        # a Trainer holding the logger (and our internal checkpoint callback) pickles too
        tr = trainer(used, max_epochs=1)
        train, val = loaders()
        tr.fit(TinyModel(), train, val)
        tr2 = pickle.loads(pickle.dumps(tr))
        # the run id that goes into checkpoints is read from the unpickled Trainer's own logger, not from a copy
        holders = [cb for cb in tr2.callbacks if cb.state_key == "MLflowCVLogger"]
        assert all(cb._logger is tr2.logger for cb in holders) and len(holders) == (kind == "ours")
        client = MlflowClient(uri)
        assert [m.value for m in client.get_metric_history(used.run_id, "m")] == [1.0, 2.0], kind
        assert client.get_run(used.run_id).info.status == "FINISHED"
        assert len(client.get_metric_history(fresh.run_id, "m")) == 1


@pytest.mark.slow
def test_save_dir_and_log_dir(tmp_path, monkeypatch, empty_store):
    """file: stores keep Lightning's semantics; with SQLite, save_dir/trainer.log_dir are a real directory
    (Lightning: None) and checkpoints land under it."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_uri = f"file:{tmp_path / 'mlruns'}"
    assert MLflowCVLogger(tracking_uri=file_uri).save_dir == MLFlowLogger(tracking_uri=file_uri).save_dir
    assert MLflowCVLogger(tracking_uri=file_uri, save_dir="elsewhere").save_dir == str(tmp_path / "mlruns")
    shutil.copy(empty_store, tmp_path / "store.db")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert MLFlowLogger(tracking_uri=uri).save_dir is None, INTENDED_DIFFERENCES["save_dir with SQLite/HTTP"]
    assert MLflowCVLogger(tracking_uri=uri).save_dir == str(tmp_path)  # the cwd until a Trainer uses it
    logger = MLflowCVLogger(tracking_uri=uri, save_dir=str(tmp_path / "local"))
    ckpt = ModelCheckpoint()
    tr = trainer(logger, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], default_root_dir=str(tmp_path / "r"))
    train, val = loaders()
    tr.fit(TinyModel(), train, val)
    assert tr.log_dir == logger.save_dir == str(tmp_path / "local")
    assert Path(ckpt.best_model_path).parent == tmp_path / "local" / logger.experiment_id / logger.run_id / "checkpoints"
    # without a save_dir argument: the Trainer's default_root_dir, where Lightning puts the checkpoints too
    logger = MLflowCVLogger(tracking_uri=uri)
    tr = trainer(logger, max_epochs=1, default_root_dir=str(tmp_path / "r"))
    tr.fit(TinyModel(), train, val)
    assert tr.log_dir == logger.save_dir == str(tmp_path / "r")


@pytest.mark.parametrize("kind", [
    pytest.param("lightning", marks=needs_newer(
        "lightning", "2.3", "synchronous" in inspect.signature(MLFlowLogger).parameters, "MLFlowLogger(synchronous=)")),
    "ours",
])
def test_synchronous_true_stores_before_log_metrics_returns(tmp_path, kind, empty_store):
    shutil.copy(empty_store, tmp_path / "store.db")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    kw = {"flush_interval_s": 3600} if kind == "ours" else {}
    logger = _make(kind, uri, synchronous=True, **kw)
    client = MlflowClient(uri)
    for step in range(3):
        logger.log_metrics({"m": float(step)}, step=step)
        assert len(client.get_metric_history(logger.run_id, "m")) == step + 1
    logger.log_hyperparams({"lr": 0.1})
    assert client.get_run(logger.run_id).data.params == {"lr": "0.1"}
    logger.finalize("success")


def test_intended_differences(tmp_path, stores):
    """Each difference listed in INTENDED_DIFFERENCES that a store can show, asserted on both loggers."""
    long_value = "v" * min(1000, MAX_PARAM_VAL_LENGTH)  # over Lightning's 250, within MLflow's limit (500 in 2.4)
    # non-blocking writes: nothing in the store until flush (Lightning: at once)
    uri, _ = stores["ours"]
    ours = MLflowCVLogger(tracking_uri=uri, flush_interval_s=3600)
    ours.log_metrics({"m": 1.0}, step=0)
    client = MlflowClient(uri)
    assert client.get_metric_history(ours.run_id, "m") == [], INTENDED_DIFFERENCES["writes"]
    ours.log_hyperparams({"long": long_value, "db_password": "hunter2", "@odd": 1})
    ours.log_hyperparams({"lr": 0.1})
    with pytest.warns(UserWarning, match=r"param 'lr' was already logged"):
        ours.log_hyperparams({"lr": 0.2})
    ours.finalize("success")
    params = client.get_run(ours.run_id).data.params
    assert params["long"] == long_value, INTENDED_DIFFERENCES["long params"]
    assert params["db_password"] == "***REDACTED***", INTENDED_DIFFERENCES["secrets"]
    assert params["odd"] == "1" and params["lr"] == "0.1", INTENDED_DIFFERENCES["invalid keys"]

    uri, _ = stores["lightning"]
    theirs = MLFlowLogger(tracking_uri=uri)
    theirs.log_metrics({"m": 1.0}, step=0)
    client = MlflowClient(uri)
    assert len(client.get_metric_history(theirs.run_id, "m")) == 1
    theirs.log_hyperparams({"long": long_value, "db_password": "hunter2"})
    params = client.get_run(theirs.run_id).data.params
    assert params["long"] == long_value[:250] and params["db_password"] == "hunter2"
    with pytest.raises(mlflow.exceptions.MlflowException):
        theirs.log_hyperparams({"@odd": 1})
    theirs.log_hyperparams({"lr": 0.1})
    with pytest.raises(mlflow.exceptions.MlflowException):
        theirs.log_hyperparams({"lr": 0.2})
    with pytest.raises(mlflow.exceptions.MlflowException):
        theirs.log_metrics({"a//b": 1.0}, step=0)
    theirs.finalize("success")

    # Ctrl+C: FAILED in Lightning, KILLED here
    statuses = {}
    for kind, (uri, _) in stores.items():
        logger = _make(kind, uri, experiment_name="interrupted")
        train, val = loaders()
        with ctrl_c():
            trainer(logger, max_epochs=1).fit(TinyModel(interrupt_at_step=1), train, val)
        statuses[kind] = MlflowClient(uri).get_run(logger.run_id).info.status
    assert statuses == {"lightning": "FAILED", "ours": "KILLED"}, INTENDED_DIFFERENCES["Ctrl+C"]
    assert json.dumps(INTENDED_DIFFERENCES)  # the list stays plain data (README mirrors it)
