"""ray_sweep: a real local Ray cluster, a real `mlflow server`, ASHA; one parent run, one child run per trial."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import MlflowServer, import_real

ray = import_real("ray", "ray")
tune = import_real("ray.tune", "ray")

from lightning_mlflow_cv.hpo import ray_sweep  # noqa: E402
from lightning_mlflow_cv._sweeps.ray_sweep import check_store_reachable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_EPOCHS = 3
#: Trial order (Tune's grid order): two good trials, one that dies mid-fit, two bad ones, one that raises.
CASES = ["good", "good", "die", "bad", "bad", "raise"]


def trainable(config):
    """One trial: TinyModel on 16 samples; 'bad' adds a penalty to val/loss, 'die' kills its worker process."""
    import lightning.pytorch as pl
    import torch
    from tiny import TinyModel, loaders, trainer

    from lightning_mlflow_cv import MLflowCVLogger
    from lightning_mlflow_cv.callbacks import RayTuneReportCallback

    case = config["case"]

    class Model(TinyModel):
        def training_step(self, batch, batch_idx):
            if case == "die" and self.current_epoch == 1:
                os._exit(3)  # the worker process dies mid-trial, after one report
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.layer(x), y)
            self.log("val/loss", loss + (5.0 if case == "bad" else 0.0))

    pl.seed_everything(0)
    train, val = loaders(n=16)
    model = Model(lr=config["lr"], fail_at_step=0 if case == "raise" else None)
    t = trainer(MLflowCVLogger(flush_interval_s=0.2), max_epochs=MAX_EPOCHS, callbacks=[RayTuneReportCallback()])
    t.fit(model, train, val)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module: Ray start-up takes seconds."""
    spool = tmp_path_factory.mktemp("ray-spool")
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "LIGHTNING_MLFLOW_CV_SPOOL_DIR": str(spool),
        "GIT_COMMIT_SHA": "0123456789abcdef0123456789abcdef01234567",
    }
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-server")
    s = MlflowServer(root)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sweep(ray_cluster, server, tmp_path_factory):
    from ray.tune.schedulers import ASHAScheduler

    out = ray_sweep(
        trainable,
        {"case": tune.grid_search(CASES), "lr": 0.1},
        metric="val/loss",
        mode="min",
        scheduler=ASHAScheduler(time_attr="training_iteration", max_t=MAX_EPOCHS, grace_period=1, reduction_factor=2),
        run_name="ray-asha",
        tracking_uri=server.uri,
        tags={"task": "classification"},
        storage_path=str(tmp_path_factory.mktemp("ray-results")),
        max_concurrent_trials=2,
    )
    return out, MlflowClient(server.uri)


def _children(client, sweep) -> dict[str, object]:
    runs = client.search_runs([sweep.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(900)  # the module's one sweep runs in this test's setup: 6 worker processes start
def test_asha_sweep_tree_states_and_parent_summary(sweep):
    sw, client = sweep
    kids = _children(client, sw)
    assert sorted(kids) == [f"trial-{i}" for i in range(len(CASES))]
    assert {r.data.tags["ray.trial_id"]: r.info.run_id for r in kids.values()} == sw.trial_runs
    for i, case in enumerate(CASES):
        assert kids[f"trial-{i}"].data.tags["task"] == "classification"
        assert kids[f"trial-{i}"].data.params["case"] == case  # the trial's config, logged by the sweep
    expected = {
        "good": ("FINISHED", "COMPLETE"),
        "die": ("FAILED", "FAIL"),
        "bad": ("KILLED", "STOPPED"),
        "raise": ("FAILED", "FAIL"),
    }
    got = {n: (r.info.status, r.data.tags["trial_state"]) for n, r in kids.items()}
    assert got == {f"trial-{i}": expected[c] for i, c in enumerate(CASES)}, got
    # nothing left RUNNING anywhere in the experiment, one run per trial plus the parent
    every = client.search_runs([sw.experiment_id])
    assert [r.info.status for r in every].count("RUNNING") == 0 and len(every) == len(CASES) + 1
    # each validation epoch's val/loss once per run: the stopped trials once (ASHA's first rung)
    for i, case in enumerate(CASES):
        run = kids[f"trial-{i}"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert len(steps) == len(set(steps)), (case, steps)
        assert len(steps) == {"good": MAX_EPOCHS, "bad": 1, "die": 1, "raise": 0}[case], (case, steps)
        if case != "raise":
            assert run.data.metrics["objective"] == pytest.approx(run.data.metrics["val/loss"])
            assert "train/m0" in run.data.metrics  # the Lightning logger's data, from the worker
    parent = client.get_run(sw.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["scheduler"] == "AsyncHyperBandScheduler"
    m = parent.data.metrics
    assert (m["n_trials/complete"], m["n_trials/stopped"], m["n_trials/fail"]) == (2, 2, 2)
    good = [kids["trial-0"], kids["trial-1"]]
    assert m["best_value"] == pytest.approx(min(r.data.metrics["val/loss"] for r in good))
    assert parent.data.tags["best_trial_run_id"] in {r.info.run_id for r in good}
    assert parent.data.tags["best/case"] == "good" and m["best/lr"] == pytest.approx(0.1)
    assert sw.best_config == {"case": "good", "lr": 0.1} and sw.best_value == pytest.approx(m["best_value"])
    files = {a.path for a in client.list_artifacts(sw.parent_run_id)} | {
        a.path for a in client.list_artifacts(sw.parent_run_id, "figures")
    }
    assert {"best_params.json", "figures/optimization_history.png"} <= files
    best = json.loads(Path(client.download_artifacts(sw.parent_run_id, "best_params.json")).read_text())
    assert best["best_params"] == {"case": "good", "lr": 0.1} and best["metric"] == "val/loss"


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(900)
def test_worker_process_that_dies_fails_its_run_and_the_sweep_completes(sweep):
    sw, client = sweep
    died = _children(client, sw)["trial-2"]
    assert died.info.status == "FAILED" and died.data.tags["trial_state"] == "FAIL"
    assert "died" in died.data.tags["ray.fail_reason"].lower()  # Ray's actor-death error
    assert died.data.metrics["val/loss"] > 0  # what it logged before dying was delivered
    assert len(sw.results) == len(CASES) and sum(r.error is not None for r in sw.results) == 2
    raised = _children(client, sw)["trial-5"]
    assert "planted failure" in raised.data.tags["ray.fail_reason"]


@pytest.mark.slow
def test_local_sqlite_store_with_remote_nodes_fails_fast(ray_cluster):
    nodes = ray.nodes()
    ip = ray.util.get_node_ip_address()
    check_store_reachable("sqlite:////tmp/x/mlflow.db", nodes, ip)  # one machine: fine
    remote = [*nodes, {**nodes[0], "NodeManagerAddress": "10.1.2.3", "Alive": True}]
    check_store_reachable("http://mlflow.internal:5000", remote, ip)  # a server: fine
    with pytest.raises(ValueError, match=r"`tracking_uri` 'sqlite:////tmp/x/mlflow.db' is a file on this machine .*10\.1\.2\.3.* Fix: run a tracking server"):
        check_store_reachable("sqlite:////tmp/x/mlflow.db", remote, ip)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "up"}, ValueError, r"`mode` must be one of \['min', 'max'\], got 'up'"),
        ({"metric": ""}, ValueError, r"`metric` must be the reported metric"),
        ({"num_samples": 0}, ValueError, r"`num_samples` must be a positive int .* got 0"),
        ({"trainable": "train.py"}, TypeError, r"`trainable` must be a function"),
        ({"param_space": [1]}, TypeError, r"`param_space` must be a dict"),
        ({"metric_name": "bad!"}, ValueError, r"`metric_name` must be a valid metric key"),
    ],
)
def test_arguments_are_checked_before_anything_starts(kwargs, error, match, tmp_path):
    store = tmp_path / "never.db"
    args = {"trainable": trainable, "param_space": {}, "metric": "val/loss", "tracking_uri": f"sqlite:///{store}"}
    with pytest.raises(error, match=match):
        ray_sweep(**{**args, **kwargs})
    assert not store.exists()  # raised before touching the store (or starting Ray)
