"""The writer process (``writer="process"``) delivers a journal with MLflow's client alone: no torch in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv._journal import Spool
from lightning_mlflow_cv._writer_proc import ProcessWriter


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the child's memory map from /proc")
def test_the_writer_process_delivers_without_loading_torch(tracking_uri, tmp_path):
    """torch is most of a Python process's memory (~650 MB RSS here against ~170 MB for MLflow's client): the child
    that only sends MLflow requests must not load it, directly or through the package's task registry."""
    spool = Spool(tmp_path / "sp", "proc")
    spool.append({"t": "run", "tracking_uri": tracking_uri, "experiment_name": "proc", "tags": {}})
    spool.append(*({"t": "m", "s": s, "ts": 1_700_000_000_000 + s, "d": {"loss": 1.0 / (s + 1)}} for s in range(50)))
    writer = ProcessWriter(spool, None, tracking_uri, flush_interval_s=0.2, request_timeout_s=10.0)
    writer.start()
    try:
        assert writer.flush(60.0)
        assert writer._proc is not None
        maps = Path(f"/proc/{writer._proc.pid}/maps").read_text()
    finally:
        writer.stop(30.0)
        spool.close()
    assert "/torch/" not in maps, "the writer process loaded torch"
    assert len(MlflowClient(tracking_uri).get_metric_history(writer.run_id, "loss")) == 50
