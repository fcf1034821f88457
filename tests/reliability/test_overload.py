"""Overload is retried, never rejected: a real `mlflow server` on PostgreSQL driven out of its connection pool.

MLflow's server answers a request that waited ``pool_timeout`` (30 s, SQLAlchemy's default) for a pooled connection
with HTTP 400 BAD_REQUEST "QueuePool limit of size N overflow M reached". Read as a rejection, that status made the
logger bisect the batch down to single points and write what was still refused to ``.rejected.jsonl``, where it
is never stored. Here the server gets a pool of 1 + 1 connections, another session holds an exclusive lock on the
``metrics`` table for 65 s (the two requests that got connections wait on it; the rest time out in the pool), and
six clients log at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MlflowServer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "default_path.py"
CLIENTS = 6
POINTS = 2  # one small request each: the old bisection reached single points after two pool timeouts
LOCK_S = 65.0


@pytest.mark.slow
@pytest.mark.server
def test_an_exhausted_connection_pool_is_retried_and_no_point_is_rejected_or_lost(tmp_path, postgres):
    import psycopg2

    root = tmp_path / "server"
    root.mkdir()
    env = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "1", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "1"}
    with MlflowServer(root, backend_uri=postgres.uri(), env=env) as server:
        clients = []
        for i in range(CLIENTS):
            err = open(tmp_path / f"client{i}.err", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "overload", server.uri, str(POINTS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                env={**__import__("os").environ, "LIGHTNING_MLFLOW_CV_SPOOL_DIR": str(tmp_path / f"spool{i}")},
            )
            clients.append((proc, err))
        infos = [json.loads(proc.stdout.readline()) for proc, _ in clients]  # runs created before the lock
        lock = psycopg2.connect(postgres.uri().replace("postgresql+psycopg2", "postgresql"))
        cur = lock.cursor()
        cur.execute("LOCK TABLE metrics IN ACCESS EXCLUSIVE MODE")
        for proc, _ in clients:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        time.sleep(LOCK_S)
        lock.rollback()
        lock.close()
        results = []
        for proc, err in clients:
            results.append(json.loads(proc.stdout.readline() or "{}"))
            proc.wait(300)
            err.close()
        stderr = "".join((tmp_path / f"client{i}.err").read_text() for i in range(CLIENTS))
        assert "QueuePool limit" in stderr, "the server was never driven out of its pool: the test proves nothing"
        rejected = sorted(str(p) for p in tmp_path.glob("spool*/*.rejected.jsonl"))
        assert not rejected, f"points rejected: {rejected}: {Path(rejected[0]).read_text()[:500]}"
        assert all(r.get("done") and r.get("spool_left") is None for r in results), results
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        for info in infos:
            run = client.get_run(info["run_id"])
            assert run.info.status == "FINISHED"
            assert len(client.get_metric_history(info["run_id"], "loss")) == POINTS
