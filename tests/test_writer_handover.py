"""The default writer on a machine with a core to spare: a thread first, a child process once the thread's store
work has cost what starting the child does (``Writer.handover``), with nothing lost or sent twice on the way."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger, _writer, _writer_choice
from lightning_mlflow_cv._writer_proc import ProcessWriter

KEYS = [f"train/k{i}" for i in range(8)]


@pytest.fixture
def spare_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine has a core to spare (as on a GPU node), whatever this one has."""
    monkeypatch.setattr(_writer_choice, "choose_writer", lambda machine: ("process", "a core to spare (test)"))


def _log(logger: MLflowCVLogger, steps: range) -> None:
    for step in steps:
        logger.log_metrics({k: float(step) for k in KEYS}, step=step)


def _assert_delivered_once(tracking_uri: str, run_id: str, steps: int) -> None:
    client = MlflowClient(tracking_uri)
    for key in (KEYS[0], KEYS[-1]):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(steps)), f"{key}: {len(history)} points"
        assert all(m.value == float(m.step) for m in history)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_thread_hands_over_to_a_process_and_delivers_everything_once(tracking_uri, spool_dir, spare_core, monkeypatch):
    """Past the budget the thread starts the writer process and ends; points logged before, during and after
    the handover all reach the store once, in order, and the status comes last."""
    monkeypatch.setattr(_writer, "HANDOVER_CPU_S", 0.0)  # the first delivery is enough
    logger = MLflowCVLogger(tracking_uri=tracking_uri, spool_dir=str(spool_dir), flush_interval_s=0.1)
    _log(logger, range(0, 500))
    thread = logger._writer
    assert isinstance(thread, _writer.Writer) and logger.writer_choice.startswith("thread, then process")
    assert logger.flush(30)  # the first attempt delivers, then hands over
    thread.join(10)
    assert not thread.is_alive() and isinstance(logger._writer, ProcessWriter), logger.writer_choice
    assert logger.writer_choice.endswith("(handed over)")
    _log(logger, range(500, 1500))
    assert logger.flush(30)
    _log(logger, range(1500, 2000))
    logger.finalize("success")
    _assert_delivered_once(tracking_uri, logger.run_id, 2000)
    assert not Path(logger.spool_path or spool_dir / "x").exists()  # delivered: the spool is gone


def test_a_caller_holding_the_thread_after_the_handover_reaches_the_process(
    tracking_uri, spool_dir, spare_core, monkeypatch
):
    """Callers that took the writer before the handover (a flush from another thread, the exit hook) still get a
    true answer: flush, wake, stop and run_id go to the process that took over."""
    monkeypatch.setattr(_writer, "HANDOVER_CPU_S", 0.0)
    logger = MLflowCVLogger(tracking_uri=tracking_uri, spool_dir=str(spool_dir), flush_interval_s=0.1)
    _log(logger, range(0, 300))
    thread = logger._writer
    results: list[bool] = []
    flushers = [threading.Thread(target=lambda: results.append(thread.flush(30))) for _ in range(4)]
    for t in flushers:
        t.start()
    for t in flushers:
        t.join(60)
    assert results == [True] * 4
    thread.join(10)  # the handover happens once no flush is waiting
    assert isinstance(logger._writer, ProcessWriter)
    _log(logger, range(300, 900))
    thread.wake()
    assert thread.flush(30), "the old handle's flush must wait for the process that took over"
    assert thread.run_id == logger.run_id
    logger._spool.append({"t": "status", "status": "FINISHED", "end": 0})
    assert thread.stop(30)  # stops the process too
    assert not logger._writer.is_alive()
    logger._writer = None
    logger._spool = None
    _assert_delivered_once(tracking_uri, logger.run_id, 900)


def test_a_short_fit_never_starts_the_process(tracking_uri, spool_dir, spare_core):
    """Under the budget the thread delivers everything itself: no child process's start-up is paid."""
    logger = MLflowCVLogger(tracking_uri=tracking_uri, spool_dir=str(spool_dir), flush_interval_s=0.1)
    _log(logger, range(0, 200))
    assert logger.flush(30)
    writer = logger._writer
    logger.finalize("success")
    assert isinstance(writer, _writer.Writer) and writer._successor is None
    _assert_delivered_once(tracking_uri, logger.run_id, 200)


def test_no_handover_when_the_thread_is_asked_for(tracking_uri, spool_dir, spare_core, monkeypatch):
    """`writer="thread"` is kept however long the fit."""
    monkeypatch.setattr(_writer, "HANDOVER_CPU_S", 0.0)
    logger = MLflowCVLogger(tracking_uri=tracking_uri, spool_dir=str(spool_dir), flush_interval_s=0.1, writer="thread")
    _log(logger, range(0, 300))
    assert logger.flush(30)
    _log(logger, range(300, 600))
    assert logger.flush(30)
    assert isinstance(logger._writer, _writer.Writer) and logger._writer.is_alive()
    logger.finalize("success")
    _assert_delivered_once(tracking_uri, logger.run_id, 600)
