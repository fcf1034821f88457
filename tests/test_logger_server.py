"""MLflowCVLogger against a real `mlflow server` subprocess: outages lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
from conftest import MlflowServer, console_script, refused_port
from faults import FaultProxy
from mlflow import MlflowClient
from tiny import N_METRICS, TinyModel, history_counts, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger

pytestmark = [pytest.mark.slow]


class _Outage(pl.Callback):
    """Stops the server at one training step and starts it again at a later one."""

    def __init__(self, server: MlflowServer, stop_at: int, start_at: int) -> None:
        self.server, self.stop_at, self.start_at = server, stop_at, start_at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.stop_at:
            self.server.stop()
        elif trainer.global_step == self.start_at:
            self.server.start()


@pytest.mark.server
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_server_stopped_mid_fit_then_restarted_every_point_arrives(mlflow_server, recwarn, writer):
    logger = MLflowCVLogger(
        tracking_uri=mlflow_server.uri, experiment_name="outage", flush_interval_s=0.2, request_timeout_s=2,
        writer=writer,
    )
    train, val = loaders()
    tr = trainer(logger, max_epochs=3, callbacks=[_Outage(mlflow_server, stop_at=8, start_at=40)])
    tr.fit(TinyModel(), train, val)
    assert tr.global_step == 48
    client = MlflowClient(mlflow_server.uri)
    counts = history_counts(client, logger.run_id)
    assert all(counts[f"train/m{k}"] == 48 for k in range(N_METRICS)), counts
    assert counts["val/loss"] == 3
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    outage = [w for w in recwarn if "cannot reach the MLflow tracking store" in str(w.message)]
    assert len(outage) == 1  # one clear warning, not one per request
    assert "lightning-mlflow-cv sync" in str(outage[0].message)


class _Crash(pl.Callback):
    """At one step the server dies mid-request, as in a crash or an OOM kill: it is frozen (SIGSTOP) until a
    request from the logger is on its way to it through the proxy, then SIGKILLed (no graceful shutdown: the
    request is never answered, the connection drops). It is started again at a later step."""

    def __init__(self, server: MlflowServer, proxy: FaultProxy, kill_at: int, start_at: int) -> None:
        self.server, self.proxy, self.kill_at, self.start_at = server, proxy, kill_at, start_at
        self.in_flight_at_kill = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.kill_at:
            pgid = self.server.proc.pid
            os.killpg(pgid, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while self.proxy.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.in_flight_at_kill = self.proxy.in_flight
            os.killpg(pgid, signal.SIGKILL)
            self.server.proc.wait(timeout=30)
            self.server.proc = None
        elif trainer.global_step == self.start_at:
            self.server.start()


@pytest.mark.server
def test_server_killed_mid_request_then_restarted_every_point_arrives(mlflow_server, recwarn):
    with FaultProxy(mlflow_server.uri) as proxy:
        logger = MLflowCVLogger(
            tracking_uri=proxy.uri, experiment_name="crash", flush_interval_s=0.2, request_timeout_s=2
        )
        crash = _Crash(mlflow_server, proxy, kill_at=8, start_at=40)
        train, val = loaders()
        tr = trainer(logger, max_epochs=3, callbacks=[crash])
        tr.fit(TinyModel(), train, val)
        assert crash.in_flight_at_kill >= 1 and proxy.hits["dropped"] >= 1  # a request really died with it
    assert tr.global_step == 48
    client = MlflowClient(mlflow_server.uri)
    for k in range(N_METRICS):
        points = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(logger.run_id, f"train/m{k}")]
        assert sorted(s for s, _, _ in points) == list(range(48)), f"train/m{k}: lost or doubled points"
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    outage = [w for w in recwarn if "cannot reach the MLflow tracking store" in str(w.message)]
    assert len(outage) == 1 and "lightning-mlflow-cv sync" in str(outage[0].message)


def _contents(client: MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)
    return {
        "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "metrics": {
            k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in run.data.metrics
        },
        "status": run.info.status,
        "run_name": run.info.run_name,
    }


@pytest.mark.server
def test_unreachable_for_the_whole_fit_then_sync_gives_the_same_run(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MLFLOW_CV_AUTOSYNC", "0")  # the manual `sync` is under test (auto: test_autosync.py)

    def fit(logger: MLflowCVLogger) -> None:
        pl.seed_everything(7)
        train, val = loaders()
        trainer(logger, max_epochs=2).fit(TinyModel(), train, val)

    with refused_port() as port:  # held (refusing) for the whole offline fit; the server takes it afterwards
        server = MlflowServer(tmp_path, port=port)
        uri = server.uri
        offline = MLflowCVLogger(tracking_uri=uri, experiment_name="offline", run_name="r", request_timeout_s=1)
        with pytest.warns(RuntimeWarning, match=r"cannot create the MLflow run .*Training continues offline"):
            fit(offline)
    assert offline.offline and offline.run_id.startswith("offline-")
    spool = offline.last_spool_path
    assert spool is not None and spool.exists()
    assert str(spool) in capfd.readouterr().err  # the path is printed with the sync command

    server.start()
    try:
        online = MLflowCVLogger(tracking_uri=uri, experiment_name="offline", run_name="r")
        fit(online)
        cmd = [*console_script(), "sync", str(spool)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
        synced_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
        client = MlflowClient(uri)
        synced, clean = _contents(client, synced_id), _contents(client, online.run_id)
        assert synced_id != online.run_id
        assert synced["metrics"].keys() == clean["metrics"].keys()
        for k in clean["metrics"]:
            assert [s for s, _ in synced["metrics"][k]] == [s for s, _ in clean["metrics"][k]], k
            assert [v for _, v in synced["metrics"][k]] == pytest.approx([v for _, v in clean["metrics"][k]]), k
        assert synced["params"] == clean["params"] and synced["tags"] == clean["tags"]
        # MLflow's context tags were resolved in the training process and carried in the spool header, not taken
        # from the `sync` process (whose mlflow.source.name would be the console script)
        synced_tags, clean_tags = client.get_run(synced_id).data.tags, client.get_run(online.run_id).data.tags
        assert synced_tags["mlflow.source.name"] == clean_tags["mlflow.source.name"] == sys.argv[0]
        assert synced_tags["mlflow.user"] and synced_tags["mlflow.source.type"] == "LOCAL"
        assert synced["status"] == clean["status"] == "FINISHED" and synced["run_name"] == "r"

        # replaying twice adds nothing (and creates no second run)
        subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
        assert _contents(client, synced_id) == synced
        exp = client.get_experiment_by_name("offline")
        assert len(client.search_runs([exp.experiment_id])) == 2
    finally:
        server.stop()


def test_sync_rejects_a_missing_file(tmp_path):
    cmd = [*console_script(), "sync", str(tmp_path / "nope.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "does not exist or is not a .jsonl spool" in out.stderr
