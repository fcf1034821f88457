"""Spools left behind deliver themselves.

A fit that ends while its tracking store is down leaves its data in a spool file (``<key>.jsonl``) for
``lightning-mlflow-cv sync``. When the next :class:`~lightning_mlflow_cv.MLflowCVLogger` starts against the same
store with the same spool directory (any process), :func:`start` delivers those older spools in a background
thread at low CPU priority, with the same code as ``sync`` (:class:`~lightning_mlflow_cv._delivery.deliverer.Deliverer`, from
the spool's acknowledged offset, so replaying is idempotent), removes each one that is fully delivered, and logs
one line naming what it delivered.

Ownership is coordinated with ``flock`` on ``<key>.lock`` beside the spool
(:mod:`lightning_mlflow_cv._delivery.locks`): every process that has a spool open holds a *shared* lock on it,
and auto-delivery takes an *exclusive* lock without waiting (:func:`~lightning_mlflow_cv._delivery.locks.claim`),
so a spool still open in a live process, or being delivered by another process, is left alone.

Left alone as well: spools of another store (silently: they deliver when a logger of that store starts), and
spools whose run was deleted (with one warning naming the spool and the fix). ``LIGHTNING_MLFLOW_CV_AUTOSYNC=0``
turns auto-delivery off.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_mlflow_cv._delivery.locks import claim, lock_path, release
from lightning_mlflow_cv._facts.runs import is_relative_store, same_store

log = logging.getLogger(__name__)

#: Environment variable: ``0`` / ``false`` / ``no`` / ``off`` disables auto-delivery.
ENV = "LIGHTNING_MLFLOW_CV_AUTOSYNC"

_threads: dict[tuple[str, str], threading.Thread] = {}
_threads_lock = threading.Lock()
_reports: list[Report] = []
_warned: set[str] = set()


def enabled() -> bool:
    """False when ``$LIGHTNING_MLFLOW_CV_AUTOSYNC`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# ------------------------------------------------------------------------------------------------
# delivery
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Delivered:
    spool: str
    run_id: str
    size: int  # bytes of the spool delivered
    status: str | None


@dataclasses.dataclass
class Report:
    """What one scan did: delivered spools, and the keys it left alone and why."""

    delivered: list[Delivered] = dataclasses.field(default_factory=list)
    busy: list[str] = dataclasses.field(default_factory=list)
    other_store: list[str] = dataclasses.field(default_factory=list)
    deleted_run: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)


def spooled_for(spooled_uri: str | None, uri: str) -> bool:
    """Whether a spool header's (credential-free) URI names the store ``uri``, by the one rule of
    :func:`~lightning_mlflow_cv._facts.runs.same_store`.

    A relative local path in the header (``sqlite:///mlflow.db``, ``file:./mlruns``) was relative to the directory
    of the process that wrote it, so it never matches.
    """
    if not spooled_uri or is_relative_store(spooled_uri):
        return False
    return same_store(spooled_uri, uri)


def candidates(directory: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Spool files in ``directory`` (oldest first), without ``skip`` keys and ``*.rejected.jsonl`` reports."""
    skipped = set(skip)
    try:
        paths = [
            p for p in directory.glob("*.jsonl") if p.stem not in skipped and not p.name.endswith(".rejected.jsonl")
        ]
    except OSError:
        return []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(paths, key=mtime)


def _first_record(path: Path) -> dict[str, Any]:
    """The spool's first record (its ``run`` header), or ``{}``."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            rec = json.loads(fh.readline() or "{}")
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) and rec.get("t") == "run" else {}


def scan(
    directory: str | os.PathLike[str],
    tracking_uri: str,
    skip: Iterable[str] = (),
    request_timeout_s: float = 10.0,
) -> Report:
    """Deliver every spool in ``directory`` that was left behind for ``tracking_uri`` and is not open elsewhere.

    Stops at the first failure to reach the store (the rest waits for the next logger or ``sync``). Logs one line
    naming the runs it delivered. Returns a :class:`Report`.
    """
    from lightning_mlflow_cv._delivery.deliverer import is_retryable
    from lightning_mlflow_cv._facts.redact import redact_text

    report = Report()
    client = None
    for path in candidates(Path(directory), skip):
        key = path.stem
        if not spooled_for(_first_record(path).get("tracking_uri"), tracking_uri):
            report.other_store.append(key)  # left for a logger of that store, silently
            continue
        with claim(path.parent, key) as lock:
            if lock is None:
                report.busy.append(key)
                continue
            if not path.is_file():
                continue  # delivered and removed by another process since the listing
            try:
                if client is None:
                    from mlflow import MlflowClient

                    from lightning_mlflow_cv._delivery import forkguard as _forkguard

                    with _forkguard.store_call():
                        client = MlflowClient(tracking_uri)
                outcome = _deliver_one(client, path, tracking_uri, request_timeout_s)
            except Exception as err:  # noqa: BLE001 - never disturb training
                if is_retryable(err):
                    log.info("MLflowCVLogger: auto-delivery of %s stopped, store unreachable (%s)", path, err)
                    report.failed.append(key)
                    break
                _warn(
                    str(path),
                    f"MLflowCVLogger: could not deliver the spool {path} left behind by an earlier fit "
                    f"({type(err).__name__}: {redact_text(str(err))[:300]}). It is left in place; inspect it and deliver it with "
                    f"`lightning-mlflow-cv sync {path}`, or delete {path.with_suffix('')}.* if it is not needed.",
                )
                report.failed.append(key)
                continue
            if isinstance(outcome, Delivered):
                report.delivered.append(outcome)
                release(lock, unlink=lock_path(path.parent, key))
            elif outcome == "other":
                report.other_store.append(key)
            elif outcome == "deleted":
                report.deleted_run.append(key)
    if report.delivered:
        from lightning_mlflow_cv._facts.redact import safe_uri

        runs = ", ".join(
            f"run {d.run_id} ({d.size} bytes{', ' + d.status if d.status else ''})" for d in report.delivered
        )
        log.warning(
            "MLflowCVLogger: delivered %d spool(s) left behind by earlier fits to %s: %s",
            len(report.delivered),
            safe_uri(tracking_uri),
            runs,
        )
    return report


def _deliver_one(client: Any, path: Path, tracking_uri: str, request_timeout_s: float) -> Delivered | str:
    from lightning_mlflow_cv._delivery import http as _http
    from lightning_mlflow_cv._delivery.deliverer import Deliverer, concurrency_for, is_retryable
    from lightning_mlflow_cv._delivery.journal import Spool

    spool = Spool(path.parent, path.stem, compact=False, hold=False)
    try:
        header = spool.header()
        if not spooled_for(header.get("tracking_uri"), tracking_uri):
            return "other"
        run_id = header.get("run_id")
        with _http.fail_fast(request_timeout_s):
            if run_id:
                try:
                    from lightning_mlflow_cv._delivery import forkguard as _forkguard

                    with _forkguard.store_call():
                        run = client.get_run(run_id)
                    deleted = run.info.lifecycle_stage == "deleted"
                except Exception as err:  # noqa: BLE001
                    if is_retryable(err):
                        raise
                    deleted = True  # RESOURCE_DOES_NOT_EXIST: deleted and purged
                if deleted:
                    _warn(
                        str(path),
                        f"MLflowCVLogger: the spool {path} left behind by an earlier fit belongs to run {run_id}, "
                        "which was deleted from the store; it is not delivered. Fix: restore the run "
                        f"(`mlflow runs restore --run-id {run_id}`) to have it delivered, or delete "
                        f"{path.with_suffix('')}.* if the data is not needed.",
                    )
                    return "deleted"
            start = spool.acked
            status = None
            for rec in spool.records():
                if rec.get("t") == "status":
                    status = rec["status"]
            deliverer = Deliverer(client, spool, run_id, concurrency_for(tracking_uri))
            try:
                end = deliverer.deliver(start, ack=True)
            finally:
                deliverer.close()
        spool.ack(end)
        delivered = Delivered(str(path), str(deliverer.run_id), end - start, status)
        spool.remove()
        return delivered
    finally:
        spool.close()


def _warn(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def start(
    directory: str | os.PathLike[str], tracking_uri: str, skip: Iterable[str] = (), request_timeout_s: float = 10.0
) -> threading.Thread | None:
    """Start (at most one per spool directory and store in this process) a background :func:`scan`."""
    if not enabled():
        return None
    from lightning_mlflow_cv._facts.redact import safe_uri

    directory = Path(directory)
    if not any(True for _ in candidates(directory, skip)):
        return None
    key = (str(directory.resolve()), safe_uri(tracking_uri))
    skip = tuple(skip)

    def run() -> None:
        from lightning_mlflow_cv._delivery.deliverer import lower_priority

        lower_priority()
        try:
            report = scan(directory, tracking_uri, skip, request_timeout_s)
            with _threads_lock:
                _reports.append(report)
        except Exception as err:  # noqa: BLE001 - a background helper never disturbs training
            log.info("MLflowCVLogger: auto-delivery of left-behind spools failed: %s", err)

    with _threads_lock:
        running = _threads.get(key)
        if running is not None and running.is_alive():
            return None
        thread = threading.Thread(target=run, name="MLflowCVLogger-autosync", daemon=True)
        _threads[key] = thread
        thread.start()
    return thread


def join(timeout: float = 60.0) -> list[Report]:
    """Wait for this process's auto-delivery threads (for tests and scripts); returns (and forgets) their reports."""
    deadline = time.monotonic() + timeout
    with _threads_lock:
        threads = list(_threads.values())
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    with _threads_lock:
        out = list(_reports)
        del _reports[: len(out)]
    return out
