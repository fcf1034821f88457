"""What the spool's counters count: ``Spool.pending`` in bytes wherever the journal lives, ``sync``'s records."""

from __future__ import annotations

import warnings

from mlflow import MlflowClient

from lightning_mlflow_cv._delivery.deliverer import Deliverer
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv.spool_sync import sync


def _fill(spool: Spool, tracking_uri: str, n: int = 20) -> None:
    spool.append({"t": "run", "tracking_uri": tracking_uri, "experiment_name": "counts", "tags": {}})
    for step in range(n):
        spool.append({"t": "m", "s": step, "ts": 1_700_000_000_000 + step, "d": {"loss": 1.0 / (step + 1), "é": 1.0}})


def test_pending_counts_bytes_on_disk_and_in_memory_alike(tracking_uri, tmp_path):
    on_disk = Spool(tmp_path / "sp", "disk")
    (tmp_path / "file").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one warning about the unwritable directory
        in_memory = Spool(tmp_path / "file" / "sp", "mem")  # a file as parent: the journal stays in memory
    assert on_disk.on_disk and not in_memory.on_disk
    for spool in (on_disk, in_memory):
        _fill(spool, tracking_uri)
    size = on_disk.path.stat().st_size
    assert on_disk.pending == in_memory.pending == size > 0

    deliverer = Deliverer(MlflowClient(tracking_uri), in_memory, None)
    deliverer.deliver(0)
    assert in_memory.pending == 0


def test_sync_reports_records_and_bytes(tracking_uri, tmp_path):
    spool = Spool(tmp_path / "sp", "offline-1")
    _fill(spool, tracking_uri, n=20)
    spool.close()
    path = tmp_path / "sp" / "offline-1.jsonl"
    out = sync(path, tracking_uri)
    # 20 points, the run header and the run binding sync appended when it created the run
    assert out["records"] == 22 and out["bytes"] == path.stat().st_size
    history = MlflowClient(tracking_uri).get_metric_history(out["run_id"], "loss")
    assert len(history) == 20
