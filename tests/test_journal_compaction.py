"""The journal stays near its compaction threshold on a fit that never pauses, and a compaction cut short loses
nothing (the spool's size bound of a week-long fit: benchmarks/README_long_fit.md)."""

from __future__ import annotations

import os

import pytest

from lightning_mlflow_cv._delivery import journal as _journal
from lightning_mlflow_cv._delivery.journal import Spool

COMPACT = 20_000
LAG = 40  # records the writer is behind when it acknowledges: it never finds the journal fully delivered


def _steps(spool: Spool, offset: int) -> list[int]:
    return [rec["s"] for rec, _ in spool.read(offset, max_records=10**6) if rec["t"] == "m"]


def _header_run(spool: Spool) -> None:
    spool.append({"t": "run", "tracking_uri": "sqlite:///x.db", "experiment_name": "e"})


def test_a_journal_never_fully_delivered_is_still_compacted(tmp_path, monkeypatch):
    """Every ack leaves LAG records undelivered (steady logging: the writer is always a little behind). Before,
    compaction waited for a fully delivered journal: 0 compactions here, the file grew with every point. Now the
    delivered part is dropped and the rest moves to the front."""
    monkeypatch.setattr(_journal, "COMPACT_BYTES", COMPACT)
    spool = Spool(tmp_path, "run")
    _header_run(spool)
    biggest, compactions = 0, 0
    for step in range(8_000):
        spool.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step), "acc": 0.5})
        if step % 25 == 0:
            spool.commit()
            recs = spool.read(spool.acked, max_records=10**6)
            before = spool.generation
            if len(recs) > LAG:
                spool.ack(recs[-LAG - 1][1], spool.generation)
            compactions += spool.generation != before
            biggest = max(biggest, spool.path.stat().st_size)
            assert _steps(spool, spool.acked)[-1] == step  # nothing undelivered is dropped
    spool.commit()
    assert compactions > 5
    assert biggest <= 2 * COMPACT, f"the journal reached {biggest} bytes, threshold {COMPACT}"
    left = _steps(spool, spool.acked)
    assert left == list(range(8_000 - len(left), 8_000)) and len(left) >= LAG
    assert spool.header()["experiment_name"] == "e"
    spool.close()


def test_a_compaction_cut_short_loses_nothing(tmp_path, monkeypatch):
    """The process dies right after the journal was truncated (before its new content was written): the next
    open of the spool (a ``sync``, or the training process adopting a dead writer's spool) rebuilds it, and every
    record not yet delivered is read again."""
    monkeypatch.setattr(_journal, "COMPACT_BYTES", COMPACT)
    spool = Spool(tmp_path, "run", hold=False)
    _header_run(spool)
    for step in range(2_000):
        spool.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    spool.commit()
    recs = spool.read(spool.acked, max_records=10**6)
    undelivered = [rec["s"] for rec, _ in recs[-300:]]

    class Killed(BaseException):
        pass

    truncate = os.ftruncate

    def die_after_truncating(fd: int, length: int) -> None:
        truncate(fd, length)
        raise Killed

    monkeypatch.setattr(os, "ftruncate", die_after_truncating)
    with pytest.raises(Killed):
        spool.ack(recs[-301][1], spool.generation)
    monkeypatch.setattr(os, "ftruncate", truncate)
    assert spool.path.stat().st_size == 0  # the journal itself is empty now

    again = Spool(tmp_path, "run", hold=False)
    assert again.header()["experiment_name"] == "e"
    assert _steps(again, again.acked)[-300:] == undelivered
    assert not again.compacting_path.exists()


def test_the_training_process_finishes_a_dead_writers_compaction_before_it_appends(tmp_path, monkeypatch):
    """The writer process dies while compacting the journal the training process appends to: the next append
    finds the half-rewritten journal, finishes it, then appends, so neither the backlog nor the new points are
    lost (before it appended to the truncated file and a later recovery would have dropped its records)."""
    monkeypatch.setattr(_journal, "COMPACT_BYTES", COMPACT)
    parent = Spool(tmp_path, "run", hold=False)
    parent.shared = True
    _header_run(parent)
    for step in range(2_000):
        parent.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    parent.commit()
    child = Spool(tmp_path, "run", hold=False)  # the writer process's view of the same file
    recs = child.read(0, max_records=10**6)

    class Killed(BaseException):
        pass

    truncate = os.ftruncate

    def die_after_truncating(fd: int, length: int) -> None:
        truncate(fd, length)
        raise Killed

    monkeypatch.setattr(os, "ftruncate", die_after_truncating)
    with pytest.raises(Killed):
        child.ack(recs[-301][1], child.generation)
    monkeypatch.setattr(os, "ftruncate", truncate)

    for step in range(2_000, 2_100):
        parent.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    parent.commit()
    reader = Spool(tmp_path, "run", hold=False)
    assert _steps(reader, reader.acked)[-400:] == list(range(1_700, 2_100))
    assert reader.header()["experiment_name"] == "e"
