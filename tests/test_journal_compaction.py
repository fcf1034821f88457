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
                spool.compact_if_due()
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


class Killed(BaseException):
    """The process dies here."""


def _kill_at(monkeypatch, where: str) -> None:
    """Make the compaction die before the ack offset moves to the copy (``ack``) or after it moved but before the
    file was cut (``truncate``)."""
    if where == "ack":
        monkeypatch.setattr(_journal, "_write_int", lambda path, value: (_ for _ in ()).throw(Killed()))
    else:
        monkeypatch.setattr(os, "ftruncate", lambda fd, length: (_ for _ in ()).throw(Killed()))


@pytest.mark.parametrize("where", ["ack", "truncate"])
def test_a_compaction_cut_short_loses_nothing(tmp_path, monkeypatch, where):
    """The process dies part-way through a compaction: the next open of the spool (a ``sync``, or the training
    process adopting a dead writer's spool) reads every record not yet delivered (some delivered ones again:
    replays are idempotent)."""
    monkeypatch.setattr(_journal, "COMPACT_BYTES", COMPACT)
    spool = Spool(tmp_path, "run", hold=False)
    _header_run(spool)
    for step in range(2_000):
        spool.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    spool.commit()
    recs = spool.read(spool.acked, max_records=10**6)
    spool.ack(recs[-301][1], spool.generation)
    with monkeypatch.context() as m:
        _kill_at(m, where)
        with pytest.raises(Killed):
            spool.compact_if_due()

    again = Spool(tmp_path, "run", hold=False)
    assert again.header()["experiment_name"] == "e"
    steps = _steps(again, again.acked)
    assert set(range(1_700, 2_000)) <= set(steps) and steps[-300:] == list(range(1_700, 2_000))


@pytest.mark.parametrize("where", ["ack", "truncate"])
def test_appends_after_a_writer_died_while_compacting_are_kept(tmp_path, monkeypatch, where):
    """The writer process dies while compacting the journal the training process appends to: what the training
    process appends afterwards follows the backlog, and nothing of either is lost."""
    monkeypatch.setattr(_journal, "COMPACT_BYTES", COMPACT)
    parent = Spool(tmp_path, "run", hold=False)
    parent.shared = True
    _header_run(parent)
    for step in range(2_000):
        parent.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    parent.commit()
    child = Spool(tmp_path, "run", hold=False)  # the writer process's view of the same file
    recs = child.read(0, max_records=10**6)
    child.ack(recs[-301][1], child.generation)
    with monkeypatch.context() as m:
        _kill_at(m, where)
        with pytest.raises(Killed):
            child.compact_if_due()

    for step in range(2_000, 2_100):
        parent.append_metrics(step, 1_700_000_000_000 + step, {"loss": float(step)})
    parent.commit()
    reader = Spool(tmp_path, "run", hold=False)
    steps = _steps(reader, reader.acked)
    assert set(range(1_700, 2_100)) <= set(steps) and steps[-400:] == list(range(1_700, 2_100))
    assert reader.header()["experiment_name"] == "e"
