"""optuna_sweep: one parent run, one nested child run per trial, best trial summarised on the parent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_real
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv.hpo import optuna_sweep, trial_logger

optuna = import_real("optuna", "optuna")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def _store_template(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite store, made once: creating one (schema migrations) takes seconds."""
    db = tmp_path_factory.mktemp("template") / "store.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(tmp_path, _store_template) -> str:
    """A real SQLite tracking store in tmp_path (a copy of the initialised template)."""
    shutil.copy(_store_template, tmp_path / "store.db")
    return f"sqlite:///{tmp_path / 'store.db'}"


def children_of(client: MlflowClient, parent_run_id: str, exp_id: str) -> dict[str, object]:
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: r for r in runs}


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes exactly one trial (by number) at its first report: deterministic pruning for the test."""

    def __init__(self, number: int) -> None:
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


@pytest.mark.slow
def test_lightning_sweep_tree_with_pruned_and_failed_trials(tracking_uri):
    PyTorchLightningPruningCallback = import_real("optuna_integration", "optuna").PyTorchLightningPruningCallback

    train, val = loaders(n=16)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 0.5, log=True)
        fail = trial.number == 3
        model = TinyModel(lr=lr, fail_at_step=0 if fail else None)
        t = trainer(
            MLflowCVLogger(flush_interval_s=0.2),  # default settings: logs into the trial's child run
            max_epochs=2,
            callbacks=[PyTorchLightningPruningCallback(trial, monitor="val/loss")],
        )
        t.fit(model, train, val)
        return t.callback_metrics["val/loss"].item()

    study = optuna_sweep(
        objective,
        n_trials=4,
        direction="minimize",
        experiment="hpo",
        tracking_uri=tracking_uri,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=PruneTrial(2),
        catch=(RuntimeError,),
        tags={"task": "classification"},
    )
    client = MlflowClient(tracking_uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    kids = children_of(client, parent_id, parent.info.experiment_id)
    assert sorted(kids) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    trials = {t.number: t for t in study.trials}
    for n in (0, 1):
        run = kids[f"trial-{n}"]
        assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(trials[n].value)
        assert run.data.params["lr"] == str(trials[n].params["lr"])  # logged by the model and by the sweep
        assert "train/m0" in run.data.metrics and "val/loss" in run.data.metrics  # the Lightning logger's data
        assert trials[n].user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["task"] == "classification"
    pruned = kids["trial-2"]
    assert trials[2].state == optuna.trial.TrialState.PRUNED
    assert pruned.info.status == "KILLED" and pruned.data.tags["trial_state"] == "PRUNED"
    assert "objective" not in pruned.data.metrics and "optuna/intermediate_value" in pruned.data.metrics
    assert "lr" in pruned.data.params
    failed = kids["trial-3"]
    assert trials[3].state == optuna.trial.TrialState.FAIL
    assert failed.info.status == "FAILED" and failed.data.tags["trial_state"] == "FAIL"
    assert "planted failure" in failed.data.tags["optuna.fail_reason"]

    assert parent.info.status == "FINISHED" and parent.data.tags["hpo_study"] == study.study_name
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["best/lr"] == pytest.approx(study.best_params["lr"])
    assert parent.data.tags["best/lr"] == str(study.best_params["lr"])
    assert parent.data.tags["best_trial_run_id"] == kids[f"trial-{study.best_trial.number}"].info.run_id
    assert parent.data.metrics["n_trials/pruned"] == 1 and parent.data.metrics["n_trials/fail"] == 1
    assert parent.data.params["direction"] == "minimize" and parent.data.params["pruner"] == "PruneTrial"
    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "figures")
    }
    assert {"best_params.json", "figures/optimization_history.png"} <= artifacts
    best = json.loads(Path(client.download_artifacts(parent_id, "best_params.json")).read_text())
    assert best["best_params"]["lr"] == study.best_params["lr"] and best["best_trial_number"] == study.best_trial.number


def test_trial_logger_and_invalid_return_value_marks_fail(tracking_uri):
    def objective(trial):
        x = trial.suggest_int("x", 0, 10)
        lg = trial_logger(trial, prefix="extra")
        lg.log_metrics({"x2": float(x * x)}, step=0)
        lg.finalize("success")
        return None if trial.number == 1 else float(x)

    study = optuna_sweep(objective, n_trials=3, direction="maximize", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    kids = children_of(client, parent_id, client.get_run(parent_id).info.experiment_id)
    assert len(kids) == 3
    assert kids["trial-0"].data.metrics["extra-x2"] == float(study.trials[0].params["x"]) ** 2
    assert kids["trial-1"].info.status == "FAILED" and kids["trial-1"].data.tags["trial_state"] == "FAIL"
    assert kids["trial-2"].data.params["x"] == str(study.trials[2].params["x"])
    assert client.get_run(parent_id).data.metrics["best_value"] == study.best_value


def test_rerun_with_same_storage_joins_the_same_parent(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def objective(trial):
        return trial.suggest_float("x", -1, 1) ** 2

    s1 = optuna_sweep(objective, 2, storage=storage, study_name="shared", tracking_uri=tracking_uri)
    s2 = optuna_sweep(objective, 2, storage=storage, study_name="shared", tracking_uri=tracking_uri)
    parent_id = s1.user_attrs["mlflow_parent_run_id"]
    assert s2.user_attrs["mlflow_parent_run_id"] == parent_id
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    assert len(children_of(client, parent_id, parent.info.experiment_id)) == 4
    assert parent.data.metrics["n_trials/complete"] == 4 and parent.info.status == "FINISHED"


def test_study_pointing_at_missing_parent_run_is_an_error(tmp_path, tracking_uri, _store_template):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna_sweep(lambda t: t.suggest_float("x", 0, 1), 1, storage=storage, study_name="s", tracking_uri=tracking_uri)
    other = shutil.copy(_store_template, tmp_path / "other.db")
    with pytest.raises(ValueError, match="points at MLflow parent run .* does not exist"):
        optuna_sweep(lambda t: 0.0, 1, storage=storage, study_name="s", tracking_uri=f"sqlite:///{other}")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"direction": "up"}, ValueError, r"`direction` must be one of \['minimize', 'maximize'\], got 'up'"),
        ({"n_trials": 0}, ValueError, r"`n_trials` must be a positive int .* got 0"),
        ({"n_trials": 2.5}, ValueError, r"`n_trials` must be a positive int .* got 2.5"),
        ({"n_trials": None}, ValueError, r"`n_trials=None` needs a `timeout`"),
        ({"timeout": -1}, ValueError, r"`timeout` must be a positive number of seconds or None, got -1"),
        ({"run_name": ""}, ValueError, r"`run_name` must be a non-empty string, got ''"),
        ({"metric_name": "bad!key"}, ValueError, r"`metric_name` must be a valid metric key as logged .* got 'bad!key'"),
        ({"objective": "train.py"}, TypeError, r"`objective` must be a callable `objective\(trial\) -> float`"),
        ({"storage": 42}, TypeError, r"`storage` must be None, an RDB URL .* got int"),
    ],
)
def test_arguments_are_checked(kwargs, error, match, tracking_uri):
    args = {"objective": lambda t: 0.0, "n_trials": 1, "tracking_uri": tracking_uri, **kwargs}
    with pytest.raises(error, match=match):
        optuna_sweep(**args)
    # raised before creating any run or experiment: the sweep writes to its own experiment (run_name's by
    # default), so look at every experiment of the store, not only the Default one
    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    assert [e.name for e in experiments] == ["Default"]
    assert client.search_runs([e.experiment_id for e in experiments]) == []


def test_trial_logger_outside_a_sweep_and_reserved_kwargs(tracking_uri):
    with pytest.raises(RuntimeError, match="no optuna_sweep trial is running"):
        trial_logger()

    def objective(trial):
        trial_logger(trial, run_id="abc")

    with pytest.raises(ValueError, match=r"\['run_id'\] are set by optuna_sweep"):
        optuna_sweep(objective, 1, tracking_uri=tracking_uri)


def test_missing_optuna_names_the_extra(monkeypatch, tracking_uri):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r'pip install "lightning-mlflow-cv\[optuna\]"'):
        optuna_sweep(lambda t: 0.0, 1, tracking_uri=tracking_uri)


@pytest.mark.slow
def test_two_workers_share_one_storage_and_one_parent_run(tmp_path, tracking_uri):
    _two_workers_one_parent(f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path, tracking_uri)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(600)
def test_two_workers_share_a_postgresql_study_and_one_parent_run(tmp_path, tracking_uri, postgres):
    """The README's multi-machine setup: the study on a real PostgreSQL (the team-server tests' cluster)."""
    postgres._as_nobody(
        "/usr/lib/postgresql/15/bin/createdb", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", "optuna"
    )
    storage = postgres.uri("optuna")
    assert storage.startswith("postgresql+psycopg2://")
    _two_workers_one_parent(storage, tmp_path, tracking_uri)
    study = optuna.load_study(study_name="dist", storage=storage)
    assert len(study.trials) == 4  # the trials live in PostgreSQL


def _two_workers_one_parent(storage: str, tmp_path: Path, tracking_uri: str) -> None:
    barrier = tmp_path / "barrier"  # both import first, then race for the study creation
    barrier.mkdir()
    procs, outs = [], []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i in range(2):
        out = tmp_path / f"worker{i}.json"
        outs.append(out)
        log = open(tmp_path / f"worker{i}.log", "wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "tests/scripts/hpo_worker.py"),
                    storage,
                    tracking_uri,
                    "dist",
                    "2",
                    str(barrier),
                    "2",
                    str(out),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
    assert all(p.returncode == 0 for p in procs), logs
    reports = [json.loads(o.read_text()) for o in outs]
    parents = {r["parent"] for r in reports}
    assert len(parents) == 1, logs
    assert [len(r["trials"]) for r in reports] == [2, 2]  # both workers ran trials of the one study
    assert sorted(reports[0]["trials"] + reports[1]["trials"]) == [0, 1, 2, 3]
    parent_id = parents.pop()
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    exp_id = parent.info.experiment_id
    top_level = client.search_runs([exp_id], filter_string="attributes.run_name = 'dist-sweep'")
    assert [r.info.run_id for r in top_level] == [parent_id]  # one tree, no second parent
    kids = children_of(client, parent_id, exp_id)
    assert sorted(kids) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    assert all(
        r.info.status == "FINISHED" and "objective" in r.data.metrics and "lr" in r.data.params for r in kids.values()
    )
    assert all("train/m0" in r.data.metrics for r in kids.values())
    study = optuna.load_study(study_name="dist", storage=storage)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["n_trials/complete"] == 4
    assert parent.info.status == "FINISHED"
    assert "optimization_history.png" in {a.path.split("/")[-1] for a in client.list_artifacts(parent_id, "figures")}


def test_study_made_by_plain_optuna_gets_a_parent_with_a_warning(tmp_path, tracking_uri):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="plain").optimize(lambda t: t.suggest_float("x", 0, 1), 1)
    with pytest.warns(RuntimeWarning, match="study 'plain' has no MLflow parent run"):
        study = optuna_sweep(
            lambda t: t.suggest_float("x", 0, 1), 1, storage=storage, study_name="plain", tracking_uri=tracking_uri
        )
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert len(children_of(client, parent.info.run_id, parent.info.experiment_id)) == 1  # the earlier trial had no run
    assert parent.data.metrics["n_trials/complete"] == 2 and "best_value" in parent.data.metrics
