"""The writer process (``writer="process"``): forked from the training process on Linux, a fresh interpreter with
MLflow's client alone (no torch) elsewhere. Either way it delivers the journal and leaves the parent's state alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv._delivery import writer_proc as _writer_proc
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._delivery.writer_proc import ProcessWriter

needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the child's /proc entries")


def _spool(tmp_path: Path, tracking_uri: str, steps: int = 50, key: str = "proc") -> Spool:
    spool = Spool(tmp_path / "sp", key)
    spool.append({"t": "run", "tracking_uri": tracking_uri, "experiment_name": "proc", "tags": {}})
    spool.append(*({"t": "m", "s": s, "ts": 1_700_000_000_000 + s, "d": {"loss": 1.0 / (s + 1)}} for s in range(steps)))
    return spool


@contextmanager
def _started(spool: Spool, uri: str) -> Iterator[ProcessWriter]:
    """A started writer process for ``spool``, stopped (and the spool closed) at the end."""
    writer = ProcessWriter(spool, None, uri, flush_interval_s=0.2, request_timeout_s=10.0)
    writer.start()
    try:
        yield writer
    finally:
        writer.stop(30.0)
        spool.close()


def _private_mb(pid: int) -> float:
    """Memory only this process holds (written copy-on-write pages and its own allocations), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


@needs_proc
def test_the_fresh_interpreter_writer_delivers_without_loading_torch(tracking_uri, tmp_path, monkeypatch):
    """Where the writer is not forked (macOS, Windows, a failed fork), torch is most of a fresh process's memory
    (~650 MB RSS here against ~170 MB for MLflow's client): the child that only sends MLflow requests must not load
    it, directly or through the package's task registry."""
    monkeypatch.setattr(_writer_proc, "FORK", False)
    with _started(_spool(tmp_path, tracking_uri), tracking_uri) as writer:
        assert writer.flush(60.0)
        assert writer._proc is not None
        maps = Path(f"/proc/{writer._proc.pid}/maps").read_text()
    assert "/torch/" not in maps, "the writer process loaded torch"
    assert len(MlflowClient(tracking_uri).get_metric_history(writer.run_id, "loss")) == 50


@needs_proc
@pytest.mark.skipif(not _writer_proc.FORK, reason="the writer is forked on Linux only")
def test_the_forked_writer_shares_the_training_process_memory(tracking_uri, tmp_path):
    """On Linux the writer is a fork of the training process (no second interpreter importing MLflow and checking
    the store's schema), and what it holds of its own when it starts is a fraction of a fresh interpreter's
    ~170 MB (pages the training process rewrites later are the child's too: benchmarks/README.md, 2026-12-01, commit cbf18a7)."""
    import torch  # the parent's memory is a training process's

    assert torch.ones(1).item() == 1.0
    with _started(_spool(tmp_path, tracking_uri), tracking_uri) as writer:
        assert writer.flush(60.0)
        assert writer._proc is not None
        pid = writer._proc.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        private = _private_mb(pid)
    assert cmdline == Path("/proc/self/cmdline").read_bytes(), "the writer is a fresh interpreter, not a fork"
    assert private < 60, f"the forked writer holds {private:.0f} MB of its own"
    assert len(MlflowClient(tracking_uri).get_metric_history(writer.run_id, "loss")) == 50
    assert writer._proc.returncode == 0


def test_ctrl_c_is_for_the_training_process_the_writer_keeps_delivering(tracking_uri, tmp_path):
    """Ctrl+C reaches every process of the terminal's group. The writer ignores it: the training process decides
    when to stop it, after the last points are delivered."""
    spool = _spool(tmp_path, tracking_uri, steps=10)
    with _started(spool, tracking_uri) as writer:
        assert writer.flush(60.0)
        assert writer._proc is not None
        os.kill(writer._proc.pid, signal.SIGINT)
        spool.append(*({"t": "m", "s": s, "ts": 1_700_000_000_000 + s, "d": {"loss": 0.5}} for s in range(10, 20)))
        assert writer.flush(60.0), "the writer died of Ctrl+C"
    assert len(MlflowClient(tracking_uri).get_metric_history(writer.run_id, "loss")) == 20


def test_a_writer_left_by_its_parent_does_not_end_the_parents_run(tracking_uri, tmp_path):
    """When the training process goes away without stopping it, the writer delivers what is on disk and exits
    without running the training process's exit handlers (MLflow's ends the active run as FINISHED)."""
    mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.start_run(experiment_id=MlflowClient(tracking_uri).create_experiment("left"))
    try:
        spool = _spool(tmp_path, tracking_uri, steps=10)
        writer = ProcessWriter(spool, None, tracking_uri, flush_interval_s=0.2, request_timeout_s=10.0)
        writer.start()
        assert writer._proc is not None and writer._proc.stdin is not None
        writer._proc.stdin.close()  # what the child sees when its parent dies
        assert writer._proc.wait(60.0) == 0
        spool.close()
        deadline = time.monotonic() + 10
        while writer.run_id is None and time.monotonic() < deadline:  # the reader thread reads "bound" last
            time.sleep(0.05)
        client = MlflowClient(tracking_uri)
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
        assert len(client.get_metric_history(writer.run_id, "loss")) == 10
    finally:
        mlflow.end_run()


@pytest.mark.skipif(not _writer_proc.FORK, reason="the writer is forked on Linux only")
def test_the_forked_writer_and_training_use_a_postgresql_store_at_once(postgres, tmp_path):
    """The forked writer inherits the SQL store MLflow opened in the training process, connections included. It
    must use its own: both processes talking over one connection mix up the protocol, and closing the parent's
    ends the server session the training process still uses."""
    uri = postgres.uri()
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("pg"))  # the pool now holds an open connection
    spool = _spool(tmp_path, uri, steps=3000, key="pg")
    writer = ProcessWriter(spool, None, uri, flush_interval_s=0.05, request_timeout_s=30.0)
    errors: list[BaseException] = []
    done = threading.Event()

    def training_side() -> None:
        n = 0
        while not done.is_set() or n < 20:
            try:
                client.log_metric(run.info.run_id, "parent", float(n), step=n)
                assert client.get_run(run.info.run_id).info.run_id == run.info.run_id
            except BaseException as err:  # noqa: BLE001 - collected for the assertion below
                errors.append(err)
                return
            n += 1

    writer.start()
    side = threading.Thread(target=training_side)
    side.start()
    try:
        assert writer.flush(120.0)
    finally:
        done.set()
        side.join(60)
        assert writer.stop(60.0)
        spool.close()
    assert not errors, f"the training process's store broke while the writer delivered: {errors[0]!r}"
    time.sleep(0.2)
    client.log_metric(run.info.run_id, "parent", -1.0, step=10_000)  # its connection still works after the child
    assert len(client.get_metric_history(writer.run_id, "loss")) == 3000


@needs_proc
@pytest.mark.skipif(not _writer_proc.FORK, reason="the writer is forked on Linux only")
def test_the_forked_writer_does_not_hold_the_training_processs_gpu(tracking_uri, tmp_path, monkeypatch):
    """A forked child inherits every open descriptor. Those of a GPU device (/dev/nvidia*, ...) would keep the
    device's memory allocated after the training process died, until the writer's last delivery: it closes them.
    (No GPU here: a file stands in for the device.)"""
    device = tmp_path / "fake-nvidia0"
    monkeypatch.setattr(_writer_proc, "DEVICE_PREFIXES", (str(tmp_path / "fake-nvidia"),))
    with device.open("w") as held, _started(_spool(tmp_path, tracking_uri, steps=5), tracking_uri) as writer:
        assert writer.flush(60.0)
        assert writer._proc is not None
        fd_dir = Path(f"/proc/{writer._proc.pid}/fd")
        links = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
        assert str(device) in {os.readlink(f"/proc/self/fd/{held.fileno()}")}
    assert str(device) not in links, "the writer kept the training process's device open"
    assert str(tracking_uri.removeprefix("sqlite:///")) in links or any(str(tmp_path) in link for link in links)


def test_a_store_unreachable_when_the_writer_starts_is_handled_by_the_writer(tmp_path):
    """A store that cannot be opened when the writer starts (offline start) is the writer's to retry: the child keeps
    answering the training process and keeps the points, instead of failing before it reads its first command."""
    (tmp_path / "a-file").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'store.db'}"  # can never be created
    spool = _spool(tmp_path, uri, steps=5)
    writer = ProcessWriter(spool, None, uri, flush_interval_s=0.2, request_timeout_s=5.0)
    writer.start()
    try:
        reply = writer._wait(writer._send("flush", timeout=2.0), 30.0)
        assert reply is not None, "the writer process did not answer"
        assert reply["ok"] is False
        assert writer.is_alive()
    finally:
        writer.stop(5.0)
        spool.close()
    assert Spool(tmp_path / "sp", "proc").pending > 0, "the points were not kept"


@needs_proc
def test_a_detached_writer_is_reaped_once_it_has_delivered(tracking_uri, tmp_path):
    """When the spool moves to memory (a disk failure) the child is detached: it delivers what is on disk and exits
    while a thread writer takes the rest. Its exit is collected, not left as a zombie until training ends."""
    spool = _spool(tmp_path, tracking_uri, steps=20)
    writer = ProcessWriter(spool, None, tracking_uri, flush_interval_s=0.2, request_timeout_s=10.0)
    writer.start()
    assert writer.flush(60.0) and writer._proc is not None
    pid = writer._proc.pid
    writer.detach()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    spool.close()
    assert not Path(f"/proc/{pid}").exists(), "the detached writer process was not reaped"
