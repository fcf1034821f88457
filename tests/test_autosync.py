"""Spools left behind deliver themselves when the next logger starts against the same store (real server)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import REPO, free_port
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._delivery import autosync as _autosync
from lightning_mlflow_cv._delivery import locks
from lightning_mlflow_cv._delivery.journal import Spool, metric_points
from lightning_mlflow_cv._facts.runs import same_store


class _StopServerAt(pl.Callback):
    def __init__(self, server, step: int) -> None:
        self.server, self.step = server, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.server.stop()


def _spooled_points(path: Path) -> dict[str, list[tuple[int, int, float]]]:
    """Every metric point a spool file holds: key -> sorted (step, timestamp, value)."""
    out: dict[str, list[tuple[int, int, float]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["t"] == "m":
            for k, v in metric_points(rec):
                out.setdefault(k, []).append((rec["s"], rec["ts"], v))
    return {k: sorted(v) for k, v in out.items()}


def _stored_points(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, int, float]]]:
    run = client.get_run(run_id)
    return {
        k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics
    }


@pytest.mark.server
@pytest.mark.slow
def test_fit_ended_while_server_down_is_delivered_by_the_next_logger(mlflow_server, tmp_path, caplog, recwarn):
    uri = mlflow_server.uri
    client = MlflowClient(uri)
    doomed = client.create_run(client.create_experiment("doomed")).info.run_id
    train, val = loaders()

    # A1: starts online, the server dies at step 8 and stays down until the fit has ended
    a1 = MLflowCVLogger(tracking_uri=uri, experiment_name="left", request_timeout_s=1, finalize_timeout_s=2)
    trainer(a1, max_epochs=2, callbacks=[_StopServerAt(mlflow_server, 8)]).fit(TinyModel(), train, val)
    # A2: the whole fit offline (its run does not exist yet)
    a2 = MLflowCVLogger(tracking_uri=uri, experiment_name="left", run_name="offline-fit", request_timeout_s=1, finalize_timeout_s=2)
    trainer(a2, max_epochs=1).fit(TinyModel(), train, val)
    # a spool of a run that gets deleted, and one of another store
    gone = MLflowCVLogger(tracking_uri=uri, run_id=doomed, request_timeout_s=1, finalize_timeout_s=1)
    gone.log_metrics({"x": 1.0}, step=0)
    gone.finalize()
    other = MLflowCVLogger(tracking_uri=f"http://127.0.0.1:{free_port()}", request_timeout_s=1, finalize_timeout_s=1)
    other.log_metrics({"x": 1.0}, step=0)
    other.finalize()
    spools = {n: lg.last_spool_path for n, lg in (("a1", a1), ("a2", a2), ("gone", gone), ("other", other))}
    assert all(p is not None and p.is_file() for p in spools.values()), spools
    expected = {n: _spooled_points(spools[n]) for n in ("a1", "a2")}
    assert len(expected["a1"]["train/m0"]) == 32 and len(expected["a2"]["train/m0"]) == 16

    mlflow_server.start()
    client.delete_run(doomed)
    caplog.set_level(logging.WARNING, logger="lightning_mlflow_cv._delivery.autosync")
    recwarn.clear()
    b = MLflowCVLogger(tracking_uri=uri, experiment_name="next", request_timeout_s=5)
    trainer(b, max_epochs=1).fit(TinyModel(), train, val)
    report = _autosync.join(120)[-1]

    delivered = {Path(d.spool): d for d in report.delivered}
    assert set(delivered) == {spools["a1"], spools["a2"]}, report
    assert delivered[spools["a1"]].run_id == a1.run_id
    a2_run = delivered[spools["a2"]].run_id
    assert client.get_run(a2_run).info.run_name == "offline-fit"
    for name, run_id in (("a1", a1.run_id), ("a2", a2_run)):
        assert _stored_points(client, run_id) == expected[name], name  # every point, once
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not spools[name].exists()
    # the deleted run's spool and the other store's spool are left alone; only the deleted run warns
    assert spools["gone"].is_file() and spools["other"].is_file()
    assert report.deleted_run == [spools["gone"].stem] and report.other_store == [spools["other"].stem]
    warned = [str(w.message) for w in recwarn if "left behind" in str(w.message)]
    assert len(warned) == 1 and doomed in warned[0] and "mlflow runs restore" in warned[0], warned
    assert client.get_metric_history(doomed, "x") == []
    # one line names what was delivered
    notes = [r.getMessage() for r in caplog.records if "left behind by earlier fits" in r.getMessage()]
    assert len(notes) == 1 and a1.run_id in notes[0] and a2_run in notes[0], notes
    assert client.get_run(b.run_id).info.status == "FINISHED"


_SCAN = """
import json, sys, time
from pathlib import Path
from lightning_mlflow_cv._delivery import autosync as _autosync
import mlflow.store.tracking.rest_store  # noqa: F401 - imported before the start line
directory, uri, go, ready = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
r = _autosync.scan(directory, uri)
print(json.dumps({"delivered": [d.spool for d in r.delivered], "busy": r.busy}))
"""


@pytest.mark.server
@pytest.mark.slow
def test_two_processes_deliver_each_spool_once_and_leave_live_spools_alone(mlflow_server, tmp_path, spool_dir):
    uri = mlflow_server.uri
    mlflow_server.stop()
    keys = []
    for i in range(3):  # three fits that ended while the store was down (runs not created yet)
        lg = MLflowCVLogger(tracking_uri=uri, experiment_name="race", run_name=f"r{i}", request_timeout_s=1, finalize_timeout_s=1)
        for step in range(300):
            lg.log_metrics({f"m{k}": float(step * 10 + k) for k in range(8)}, step=step)
        lg.finalize()
        keys.append(lg.last_spool_path.stem)
        time.sleep(0.01)  # distinct mtimes: both processes walk the spools in the same order
    live = Spool(spool_dir, "still-training")  # a spool held open by a live fit
    live.append({"t": "run", "tracking_uri": uri, "experiment_name": "race", "run_name": "live"})
    live.append({"t": "m", "s": 0, "ts": 1, "d": {"m0": 1.0}})
    mlflow_server.start()

    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _SCAN, str(spool_dir), uri, str(go), str(r)], stdout=subprocess.PIPE, text=True, env=env)
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start scanning at once
    outs = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    delivered = [Path(s).stem for o in outs for s in o["delivered"]]
    assert sorted(delivered) == sorted(keys), outs  # each spool by exactly one process
    assert all("still-training" in o["busy"] for o in outs)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["r0", "r1", "r2"]  # one run per spool, none for the live one
    for r in runs:
        for k in range(8):
            hist = client.get_metric_history(r.info.run_id, f"m{k}")
            assert sorted(m.step for m in hist) == list(range(300)), (r.info.run_name, k)
        assert r.info.status == "FINISHED"
    assert live.pending > 0 and live.path.is_file()
    live.close()


@pytest.mark.parametrize(
    ("spooled", "mine", "same"),
    [
        ("http://127.0.0.1:5000", "http://user:pw@127.0.0.1:5000/", True),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001", False),
        ("sqlite:////tmp/a/mlflow.db", "sqlite:////tmp/a/mlflow.db", True),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db", False),  # relative: another store in each directory
        ("file:./mlruns", "file:./mlruns", False),
        (None, "http://127.0.0.1:5000", False),
    ],
)
def test_same_store(spooled, mine, same):
    assert _autosync.spooled_for(spooled, mine) is same


@pytest.mark.parametrize(
    ("spooled", "mine", "same"),
    [
        ("HTTP://Tracking.Example:5000", "http://tracking.example:5000", True),
        ("postgresql+psycopg2://db:5432/mlflow", "postgresql://u:p@db:5432/mlflow", True),
        ("sqlite:////tmp/a/./b/../mlflow.db", "sqlite:////tmp/a/mlflow.db", True),
        ("sqlite:////tmp/a/mlflow.db", "sqlite:///mlflow.db", False),  # this process's relative path is its cwd's
        ("sqlite:////tmp/a/mlflow.db", "sqlite:////tmp/b/mlflow.db", False),
    ],
)
def test_a_spool_names_its_store_by_the_run_plumbing_rule(spooled, mine, same):
    """One rule for "the same store" (issue 29): the spool's header is compared as the logger compares a pipeline
    stage's store, normalised (case, driver, credentials, `.` and `..`); only a relative header never matches."""
    assert _autosync.spooled_for(spooled, mine) is same
    assert same_store(spooled, mine) is same


def test_a_left_behind_spool_spelled_another_way_is_delivered_and_another_store_is_left(tracking_uri, spool_dir):
    assert tracking_uri.startswith("sqlite:////")
    db = Path(tracking_uri[len("sqlite:///") :])
    spelled = f"sqlite:///{db.parent}/./{db.name}"
    for key, uri in (("spelled", spelled), ("elsewhere", f"sqlite:///{db.parent}/other/{db.name}")):
        left = Spool(spool_dir, key)
        left.append(
            {"t": "run", "tracking_uri": uri, "experiment_name": "sq", "run_name": key},
            {"t": "m", "s": 0, "ts": 1000, "d": {"a": 1.0}},
            {"t": "status", "status": "FINISHED", "end": 2000},
        )
        left.close()
    report = _autosync.scan(spool_dir, tracking_uri)
    assert [Path(d.spool).stem for d in report.delivered] == ["spelled"] and report.other_store == ["elsewhere"]
    run = MlflowClient(tracking_uri).get_run(report.delivered[0].run_id)
    assert run.info.run_name == "spelled" and run.info.status == "FINISHED"


def test_locks_live_holders_block_delivery_and_a_missing_directory_does_not_wait(tmp_path):
    a, b = locks.hold(tmp_path, "k"), locks.hold(tmp_path, "k")  # logger and its writer process
    assert a is not None and b is not None
    with locks.claim(tmp_path, "k") as lock:
        assert lock is None  # open in a live process: left alone
    locks.release(a)
    with locks.claim(tmp_path, "k") as lock:
        assert lock is None
    locks.release(b)
    with locks.claim(tmp_path, "k") as lock:
        assert lock is not None
        with locks.claim(tmp_path, "k") as second:
            assert second is None  # one deliverer at a time
    start = time.monotonic()
    assert locks.hold(tmp_path / "missing", "k") is None and time.monotonic() - start < 1


def test_sqlite_store_left_behind_spool_and_the_opt_out(tracking_uri, spool_dir, monkeypatch):
    left = Spool(spool_dir, "left-behind")  # what a fit killed before it could deliver leaves on disk
    left.append(
        {"t": "run", "tracking_uri": tracking_uri, "experiment_name": "sq", "run_name": "left"},
        {"t": "m", "s": 0, "ts": 1000, "d": {"a": 1.0}},
        {"t": "m", "s": 1, "ts": 2000, "d": {"a": 2.0}},
        {"t": "status", "status": "FAILED", "end": 3000},
    )
    left.close()
    monkeypatch.setenv(_autosync.ENV, "0")
    off = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="sq")
    off.log_metrics({"b": 1.0}, step=0)
    off.finalize()
    assert _autosync.join(60) == [] and left.path.is_file()  # opted out: left for `sync`
    monkeypatch.delenv(_autosync.ENV)
    on = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="sq")
    on.log_metrics({"b": 1.0}, step=0)
    [report] = _autosync.join(60)
    on.finalize()
    [delivered] = report.delivered
    client = MlflowClient(tracking_uri)
    run = client.get_run(delivered.run_id)
    assert run.info.run_name == "left" and run.info.status == "FAILED"
    assert [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, "a")] == [(0, 1000, 1.0), (1, 2000, 2.0)]
    assert not left.path.exists() and not (spool_dir / "left-behind.lock").exists()
