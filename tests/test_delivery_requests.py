"""Requests on the wire: full ``log_batch`` requests, sent only as often as needed (counted through a proxy)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import MlflowServer
from faults import FaultProxy
from mlflow import MlflowClient
from tiny import N_METRICS, TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = Path(tmp_path_factory.mktemp("server"))
    srv = MlflowServer(root)
    srv.start()
    yield srv
    srv.stop()


def _batches(proxy: FaultProxy) -> list[int]:
    """Metric points in each log-batch request that went through the proxy."""
    return [len(json.loads(body).get("metrics", [])) for path, body in proxy.bodies if path.endswith("/runs/log-batch")]


def _status_after_points(proxy: FaultProxy) -> bool:
    batches = [e for _, path, _, e in proxy.log if path.endswith("/runs/log-batch")]
    updates = [s for _, path, s, _ in proxy.log if path.endswith("/runs/update")]
    return bool(updates) and min(updates) >= max(batches)


def test_fast_server_gets_full_requests_only(server):
    """A fit of 750 steps x 8 metrics (+ Lightning's `epoch`) against a fast server: ceil(points / 1000) metric
    requests plus the last partial one, not one per writer wake-up. (The flush interval is long here so that the
    count does not depend on how fast this machine trains: a partial request also goes once its oldest point has
    waited the flush interval, see the slow-server test.)"""
    with FaultProxy(server.uri) as proxy:
        logger = MLflowCVLogger(tracking_uri=proxy.uri, experiment_name="fast", flush_interval_s=60)
        train, _ = loaders(n=3000, batch_size=4)
        tr = trainer(logger, max_epochs=1)
        tr.fit(TinyModel(), train)
        assert tr.global_step == 750
    batches = _batches(proxy)
    points = sum(batches)
    assert points >= 750 * N_METRICS
    assert len(batches) <= math.ceil(points / 1000) + 3, f"{len(batches)} requests for {points} points: {batches}"
    client = MlflowClient(server.uri)
    assert all(len(client.get_metric_history(logger.run_id, f"train/m{k}")) == 750 for k in range(N_METRICS))
    assert _status_after_points(proxy)
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_slow_server_holds_partial_requests_longer(server):
    """Requests take 0.4 s: a partial request then waits up to 10x that for more points (as MLflow's autolog
    keeps logging under a tenth of the time) rather than the 0.3 s flush interval; everything still arrives,
    status last."""
    steps, keys = 150, 8
    with FaultProxy(server.uri) as proxy:
        logger = MLflowCVLogger(tracking_uri=proxy.uri, experiment_name="slow", flush_interval_s=0.3)
        _ = logger.experiment  # create the run at full speed
        proxy.mode, proxy.delay_s = "slow", 0.4
        for step in range(steps):  # about 3 s of logging, 400 points per second
            logger.log_metrics({f"slow/m{k}": float(step * keys + k) for k in range(keys)}, step=step)
            time.sleep(0.02)
        logger.finalize("success")
    batches = _batches(proxy)
    points = sum(batches)
    assert points == steps * keys  # nothing sent twice
    assert len(batches) <= math.ceil(points / 1000) + 3, f"{len(batches)} requests for {points} points: {batches}"
    client = MlflowClient(server.uri)
    assert all(len(client.get_metric_history(logger.run_id, f"slow/m{k}")) == steps for k in range(keys))
    assert _status_after_points(proxy)
    assert client.get_run(logger.run_id).info.status == "FINISHED"
