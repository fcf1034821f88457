"""Faults against a real `mlflow server`: training is unaffected and nothing logged is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from faults import FaultProxy
from mlflow import MlflowClient
from tiny import N_METRICS, TinyModel, history_counts, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._delivery.journal import metric_points

pytestmark = [pytest.mark.server, pytest.mark.slow]
SCRIPTS = Path(__file__).parents[1] / "scripts"


class _Toggle(pl.Callback):
    def __init__(self, proxy: FaultProxy, at: dict[int, str]) -> None:
        self.proxy, self.at = proxy, at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step in self.at:
            self.proxy.mode = self.at[trainer.global_step]
            if self.proxy.mode == "error":  # keep the fault on until the writer has really hit it
                import time

                # the writer holds a partial request back for more points: log one and ask for delivery now
                trainer.logger.log_metrics({"fault/marker": 1.0}, step=trainer.global_step)
                trainer.logger.flush(timeout=30)
                deadline = time.monotonic() + 60
                while self.proxy.hits["error"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)


def test_server_answering_500_for_a_while_loses_nothing(mlflow_server, recwarn):
    with FaultProxy(mlflow_server.uri) as proxy:
        logger = MLflowCVLogger(tracking_uri=proxy.uri, experiment_name="e500", flush_interval_s=0.2)
        train, val = loaders()
        tr = trainer(logger, max_epochs=3, callbacks=[_Toggle(proxy, {4: "error", 30: "ok"})])
        tr.fit(TinyModel(), train, val)
        assert proxy.hits["error"] > 0  # the fault was really hit
    client = MlflowClient(mlflow_server.uri)
    counts = history_counts(client, logger.run_id)
    assert all(counts[f"train/m{k}"] == 48 for k in range(N_METRICS))
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    assert sum("cannot reach the MLflow tracking store" in str(w.message) for w in recwarn) == 1


def test_disk_full_spool_warns_once_and_training_continues(mlflow_server, tmp_path):
    """RLIMIT_FSIZE makes the spool's writes fail with EFBIG, like a full disk, in a child process."""
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "disk_full.py"), mlflow_server.uri, str(tmp_path / "spool"), str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cannot write the spool file") == 1
    assert "set `spool_dir=`" in proc.stderr
    res = json.loads(out.read_text())
    assert res["global_step"] == 48
    counts = history_counts(MlflowClient(mlflow_server.uri), res["run_id"])
    assert all(counts[f"train/m{k}"] == 48 for k in range(N_METRICS)), counts


def test_sigkill_mid_fit_then_resume_continues_the_run_and_replays_the_spool(mlflow_server, tmp_path):
    spool, ckpt = tmp_path / "spool", tmp_path / "ckpt"
    common = [sys.executable, str(SCRIPTS / "kill_resume.py"), mlflow_server.uri, str(spool), str(ckpt)]
    first = subprocess.run([*common, "first"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run_id = (tmp_path / "run_id.txt").read_text()
    pending = list(spool.glob(f"{run_id}.jsonl"))
    assert pending, "the killed fit left its undelivered points in the spool"
    before = [json.loads(x) for x in pending[0].read_text().splitlines()]
    spooled_steps = sorted({r["s"] for r in before if r["t"] == "m" and "train/m0" in dict(metric_points(r))})
    assert spooled_steps, "points logged before the kill were not in the spool"

    second = subprocess.run([*common, "resume"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "run_id.txt").read_text() == run_id  # the same run continues
    client = MlflowClient(mlflow_server.uri)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    hist = client.get_metric_history(run_id, "train/m0")
    points = [(m.step, m.timestamp, m.value) for m in hist]
    assert len(points) == len(set(points))  # no point stored twice
    steps = sorted({m.step for m in hist})
    assert steps == list(range(48))  # every step of the 3 epochs, including those only the spool had
    assert client.get_run(run_id).info.status == "FINISHED"


def _log_points(logger: MLflowCVLogger, steps: int, keys: int) -> None:
    for step in range(steps):
        logger.log_metrics({f"slow/m{k}": float(step * keys + k) for k in range(keys)}, step=step)


def test_slow_server_gets_metric_requests_in_parallel_and_the_status_last(mlflow_server):
    """A slow server (0.8 s per request here, clearly above the 0.5 s that opens the window) costs one round trip
    per 4 metric requests, not one per request, and the run is only marked FINISHED after every point it logged
    was stored."""
    steps, keys = 540, 9  # 4,860 points: at least 5 requests of <= 1,000, and 9 does not divide 1,000
    with FaultProxy(mlflow_server.uri) as proxy:
        logger = MLflowCVLogger(tracking_uri=proxy.uri, experiment_name="eslow", flush_interval_s=60)
        _ = logger.experiment  # create the run at full speed
        proxy.mode, proxy.delay_s = "slow", 0.8
        _log_points(logger, steps, keys)
        logger.finalize("success")
    assert proxy.max_in_flight >= 2, "metric requests were sent one at a time"
    batches = [(s, e) for m, path, s, e in proxy.log if path.endswith("/runs/log-batch")]
    updates = [(s, e) for m, path, s, e in proxy.log if path.endswith("/runs/update")]
    assert len(batches) >= 5
    overlapping = max(sum(1 for s2, e2 in batches if s2 < e and e2 > s) for s, e in batches)
    assert overlapping >= 2, f"metric requests were sent one at a time: {batches}"
    assert updates and min(s for s, _ in updates) >= max(e for _, e in batches), "status stored before the points"
    sent = sum(len(json.loads(body).get("metrics", [])) for path, body in proxy.bodies if path.endswith("/runs/log-batch"))
    assert sent == steps * keys, f"{sent} metric points sent for {steps * keys} logged: some were sent twice"
    client = MlflowClient(mlflow_server.uri)
    assert all(len(client.get_metric_history(logger.run_id, f"slow/m{k}")) == steps for k in range(keys))
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_one_failed_request_among_parallel_ones_is_resent_and_nothing_is_lost(mlflow_server):
    steps, keys = 600, 8
    failed: list[int] = []
    seen = [0]

    def second_batch_fails_once(method: str, path: str) -> bool:
        if not path.endswith("/runs/log-batch"):
            return False
        seen[0] += 1
        if seen[0] == 2 and not failed:
            failed.append(seen[0])
            return True
        return False

    with FaultProxy(mlflow_server.uri) as proxy:
        logger = MLflowCVLogger(tracking_uri=proxy.uri, experiment_name="epartial", flush_interval_s=60)
        _ = logger.experiment
        proxy.mode, proxy.delay_s = "slow", 0.8  # clearly above the 0.5 s that opens the window to 8 requests
        _log_points(logger, steps, keys)
        proxy.error_if = second_batch_fails_once
        logger.finalize("success")
    assert failed, "the fault was not hit"
    assert proxy.max_in_flight >= 2, "the failed request was never among parallel ones"
    client = MlflowClient(mlflow_server.uri)
    for k in range(keys):
        history = client.get_metric_history(logger.run_id, f"slow/m{k}")
        assert sorted(m.step for m in history) == list(range(steps)), f"slow/m{k}: lost or duplicated points"
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_held_server_responses_never_hold_training(mlflow_server):
    """`log_metrics` only appends to the spool: with every server response held, a fit of 48 steps completes
    while no point has reached the store; all of them arrive once the responses are released."""
    direct = MlflowClient(mlflow_server.uri)
    seen: dict[str, int] = {}

    class _CheckThenRelease(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:  # after the last step, before the logger finalizes
            seen["steps"] = trainer.global_step
            seen["stored"] = len(direct.get_metric_history(logger.run_id, "train/m0"))
            seen["held"] = proxy.hits["hold"]
            proxy.release()

    with FaultProxy(mlflow_server.uri) as proxy:
        proxy.hold_max_s = 30
        logger = MLflowCVLogger(
            tracking_uri=proxy.uri, experiment_name="held", flush_interval_s=0.1, request_timeout_s=120
        )
        _ = logger.experiment  # the run exists before the hold
        proxy.mode = "hold"
        train, val = loaders()
        tr = trainer(logger, max_epochs=3, callbacks=[_CheckThenRelease()])
        tr.fit(TinyModel(), train, val)
        assert proxy.hold_timeouts == 0, "the fit waited for a held response until the proxy gave up holding"
    assert seen["steps"] == 48 and seen["held"] >= 1  # the writer tried, and was held, during the fit
    assert seen["stored"] == 0, f"{seen['stored']} points reached the store while every response was held"
    counts = history_counts(direct, logger.run_id)
    assert all(counts[f"train/m{k}"] == 48 for k in range(N_METRICS)), counts
    assert direct.get_run(logger.run_id).info.status == "FINISHED"
