"""Delivery: spool records planned into MLflow requests and sent.

:func:`_plan` coalesces journal records (:mod:`lightning_mlflow_cv._delivery.journal`) into ``log_batch`` requests within
MLflow's per-request limits, each with the offset to acknowledge once it is stored. :class:`Deliverer` sends them
(metric requests through a small window of concurrent requests to a slow HTTP server), classifies failures
(:func:`is_retryable`: retry, or keep and report what MLflow rejects as invalid) and acknowledges as it goes. The
writer thread (:mod:`lightning_mlflow_cv._delivery.writer`), auto-delivery of old spools (:mod:`lightning_mlflow_cv._delivery.autosync`)
and ``sync`` (:mod:`lightning_mlflow_cv.spool_sync`) all deliver through it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

# MLflow's own per-request limits, read here rather than through ``_facts.keys`` (which loads the task registry, and so
# torch): the writer process imports this module and nothing heavier than MLflow's client.
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._delivery import forkguard as _forkguard
from lightning_mlflow_cv._delivery import http as _http
from lightning_mlflow_cv._delivery import journal as _journal
from lightning_mlflow_cv._delivery.journal import Spool, metric_points
from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv._facts.runs import create_run, set_run_status

#: Metric-only requests in flight at once to an HTTP tracking server. Metric points are independent (MLflow
#: orders a history by step and timestamp, not arrival), so a slow or distant server is paid one round trip
#: per this many requests rather than per request. SQL and file stores get 1: their cost is the client's CPU.
HTTP_CONCURRENCY = 8

#: A metric request that took this long opens the window to :data:`HTTP_CONCURRENCY`; a faster one closes it to 1
#: (a nearby server gains nothing from parallel requests, and a burst of them only competes with training for CPU).
SLOW_REQUEST_S = 0.5

#: While the store is fast, a partial metric request is held until its oldest point has waited ``flush_interval_s``
#: or this many times the time a metric request takes, whichever is longer (MLflow's autolog keeps the same
#: 10:1 ratio of training time to logging time): full 1,000-point requests go out as soon as they are ready, so a
#: fit logging faster than 1,000 points per interval sends ``ceil(points / 1000)`` metric requests plus the final
#: drain. :meth:`~lightning_mlflow_cv._delivery.writer.Writer.flush`, ``finalize`` and ``sync`` send everything at once.
FLUSH_COST_RATIO = 10.0

#: The longest a partial request is held however slow the store is (unless ``flush_interval_s`` is longer).
MAX_HOLD_S = 10.0


def concurrency_for(tracking_uri: str | None) -> int:
    """How many metric requests :class:`Deliverer` keeps in flight for this store."""
    scheme = (tracking_uri or "").split(":", 1)[0].lower()
    return HTTP_CONCURRENCY if scheme in ("http", "https") else 1


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux threads are schedulable tasks): when training keeps every
    core busy, the kernel prefers the training threads, and MLflow's per-point work fills idle time instead.
    Measured on 2 saturated cores in benchmarks/README.md; LIGHTNING_MLFLOW_CV_WRITER_NICE (default 10) is added
    to the thread's current nice value (capped at 19), so a job already started under ``nice`` keeps its writer
    below it; 0 disables it."""
    nice = int(os.environ.get("LIGHTNING_MLFLOW_CV_WRITER_NICE", "10") or 0)
    if nice > 0 and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            tid = threading.get_native_id()  # relative to the thread's current nice value, as `nice -n` is
            os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
        except OSError:
            pass


_NON_RETRYABLE = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"}

#: What an overloaded store says, whatever status code carries it (an MLflow server answers a connection pool
#: timeout with HTTP 400 BAD_REQUEST): retried, never taken for a rejection of the points.
TRANSIENT = re.compile(
    r"QueuePool limit|connection timed out|database is locked|database table is locked|too many (clients|connections)"
    r"|remaining connection slots|could not connect|connection (refused|reset|aborted)|server closed the connection"
    r"|timed? ?out|deadlock|could not serialize|lock wait timeout|temporarily unavailable|try again|too many requests"
    r"|service unavailable|bad gateway|gateway time|OperationalError|DisconnectionError|InterfaceError",
    re.IGNORECASE,
)


def is_retryable(err: BaseException) -> bool:
    """Server down, overloaded (pool exhausted, database locked), timeout, 5xx, 429, auth errors: retry, whatever
    status code carries it. Only a request MLflow rejects as invalid (a bad value of a point or key) is not.

    Example::

        >>> from mlflow.exceptions import MlflowException
        >>> from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE
        >>> is_retryable(MlflowException("QueuePool limit of size 5 overflow 10 reached", error_code=BAD_REQUEST))
        True
        >>> is_retryable(MlflowException("Invalid value 'x' for parameter 'step'", error_code=INVALID_PARAMETER_VALUE))
        False
    """
    code = getattr(err, "error_code", None)
    if code not in _NON_RETRYABLE:
        return True
    return bool(TRANSIENT.search(str(err)))


#: Error codes of a store that answered but could not take the request now.
_BUSY_CODES = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"}
_UNREACHABLE = re.compile(
    r"connection refused|max retries exceeded|failed to establish|name or service not known|no route to host"
    r"|network is unreachable|unable to open database file|nodename nor servname",
    re.IGNORECASE,
)


def is_overload(err: BaseException) -> bool:
    """True when the store answered but is overloaded or failing for now (pool exhausted, database locked, 429,
    5xx): a flush then waits for it as for a slow store, instead of giving up as for an unreachable one.

    Example::

        >>> from mlflow.exceptions import MlflowException
        >>> from mlflow.protos.databricks_pb2 import BAD_REQUEST
        >>> is_overload(MlflowException("QueuePool limit of size 1 overflow 1 reached", error_code=BAD_REQUEST))
        True
        >>> is_overload(MlflowException("API request failed: Max retries exceeded (Connection refused)"))
        False
    """
    text = str(err)
    if _UNREACHABLE.search(text):
        return False
    status = getattr(err, "get_http_status_code", lambda: None)()
    if isinstance(status, int) and (status == 429 or status >= 500):
        return True
    return getattr(err, "error_code", None) in _BUSY_CODES or bool(TRANSIENT.search(text))


def describe_failure(err: BaseException) -> str:
    """A short reason for a tracking failure, with the fix for credential problems (never the secret)."""
    from lightning_mlflow_cv._delivery.artifact_errors import describe

    s3 = describe(err)
    if s3 is not None:
        return s3
    code = getattr(err, "error_code", None)
    text = redact_text(str(err))
    if code == "UNAUTHENTICATED" or " 401 " in text:
        return (
            "the tracking server refused the credentials (HTTP 401). Fix: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to valid credentials"
        )
    if code == "PERMISSION_DENIED" or " 403 " in text:
        return (
            "the tracking server denied permission (HTTP 403). Fix: ask an admin for EDIT permission on the experiment"
        )
    return f"{type(err).__name__}: {text[:300]}"


class Deliverer:
    """Sends spool records to MLflow in batches within MLflow's limits, acking as it goes.

    With ``concurrency`` > 1, metric-only requests are sent from helper threads (with the caller's fail-fast
    setting), up to that many at a time while the store is slow (the last one took :data:`SLOW_REQUEST_S` or
    more), one at a time otherwise; anything else (params, tags, artifacts, status) waits for them and goes
    alone, so a status is never stored before the points logged ahead of it. Offsets are acked only up to the
    first request not yet stored; after a failure the rest are re-sent once every request in flight has
    finished, and a point stored before is then stored once (MLflow's SQL stores skip an identical point when
    it is not being inserted concurrently).
    """

    def __init__(self, client: Any, spool: Spool, run_id: str | None, concurrency: int = 1) -> None:
        self.client = client
        self.spool = spool
        self.run_id = run_id
        self.rejected = 0
        self.concurrency = max(int(concurrency), 1)
        self.last_request_s = 0.0  # duration of the last metric request sent through the window
        self.request_s = 0.0  # moving average of how long a metric request takes (sets how long a partial one waits)
        #: Set by a :meth:`deliver` that held back a partial request: when (``time.monotonic()``) it becomes due.
        self.held_due: float | None = None
        #: Requests sent (each ``log_batch``, artifact, input and status call), for tests and the benchmark.
        self.requests = 0
        self._pool: Any = None

    def window(self) -> int:
        """Metric requests allowed in flight now: ``concurrency`` while the store is slow, else 1."""
        return self.concurrency if self.last_request_s >= SLOW_REQUEST_S else 1

    def hold_budget(self, hold_s: float) -> float:
        """Seconds the oldest point of a partial request may wait: ``hold_s``, stretched to
        :data:`FLUSH_COST_RATIO` times a metric request's duration while requests are slow (at most
        :data:`MAX_HOLD_S`, or ``hold_s`` when that is longer)."""
        return max(hold_s, min(FLUSH_COST_RATIO * self.request_s, MAX_HOLD_S))

    def _hold(self, request: dict[str, Any], hold_s: float) -> bool:
        """Whether to keep a trailing partial metric request back for more points (sets :attr:`held_due`)."""
        metrics = request["metrics"] if _metrics_only(request) else None
        if not metrics or request.get("split") or len(metrics) >= MAX_METRICS_PER_BATCH:
            return False
        if self.spool.acked > _journal.COMPACT_BYTES:
            return False  # a delivered part this large is compacted between requests: send, then compact
        budget = self.hold_budget(hold_s)
        age = min(max(time.time() - min(m.timestamp for m in metrics) / 1000.0, 0.0), budget)
        if age >= budget:
            return False
        self.held_due = time.monotonic() + budget - age
        return True

    def _timed(self, run_id: str, request: dict[str, Any]) -> None:
        """Send one request; a metric request's duration feeds :attr:`last_request_s` and :attr:`request_s`."""
        start = time.monotonic()
        with _forkguard.store_call():
            self._send(run_id, request)
        if _metrics_only(request) and request["metrics"]:
            took = time.monotonic() - start
            self.last_request_s = took
            self.request_s = took if self.request_s == 0.0 else 0.7 * self.request_s + 0.3 * took

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def ensure_run(self) -> str:
        if self.run_id:
            return self.run_id
        header = self.spool.header()
        if header.get("run_id"):
            self.run_id = header["run_id"]
            return self.run_id
        with _forkguard.store_call():
            self.run_id = create_run(self.client, header)
        self.spool.append({"t": "bind", "run_id": self.run_id})
        return self.run_id

    def deliver(
        self, offset: int, ack: bool = True, max_records: int = 5000, drain: bool = True, hold_s: float = 0.0
    ) -> int:
        """Deliver records after ``offset``; returns the new offset. Raises on a retryable failure.

        With ``drain`` (``flush``, ``finalize``, ``sync``) everything is sent. Without it (the writer's
        background attempts) a trailing metric-only request that is not full is held back for more points until
        its oldest point has waited :meth:`hold_budget` (``hold_s`` while the store is fast); :attr:`held_due`
        then says when, and the offset returned is where the held request starts.

        Metric-only requests go out through a sliding window of :meth:`window` requests: while some are in
        flight, newly logged points are read and sent as soon as they fill a request (a partial request waits
        for a free window unless something follows it, e.g. the final status). Everything else waits for the
        window to empty and goes alone.
        """
        in_flight: collections.deque[tuple[Any, int]] = collections.deque()
        generation = self.spool.generation
        self.held_due = None
        try:
            while True:
                if not in_flight:
                    if ack:
                        self.spool.compact_if_due()  # nothing in flight: nothing read is sent twice
                    generation = self.spool.generation
                    if ack:
                        offset = self.spool.acked  # re-sync: offsets restart if the spool moved or was compacted
                elif self.spool.generation != generation:  # moved to memory meanwhile: settle, then re-read
                    self._settle(in_flight, ack, generation, wait_all=True)
                    continue
                elif ack and self.spool.compaction_due:  # let the window empty, so that the journal is compacted
                    self._settle(in_flight, ack, generation, wait_all=True)
                    continue
                batch = self.spool.read(offset, max_records=max_records)
                if not batch:
                    if not in_flight:
                        return offset
                    self._settle(in_flight, ack, generation, timeout=0.25)
                    continue
                run_id = self.ensure_run()
                plans = list(_plan(batch))
                held = False
                self.held_due = None
                for i, (request, end) in enumerate(plans):
                    last = i == len(plans) - 1
                    if last and not drain and self._hold(request, hold_s):
                        held = True  # wait for more points: a full request later instead of a small one now
                        break
                    if self.concurrency > 1 and _metrics_only(request):
                        partial = len(request["metrics"]) < MAX_METRICS_PER_BATCH and not request.get("split")
                        if in_flight and last and partial:
                            break  # let it fill while the window is busy (it starts at a record boundary)
                        while len(in_flight) >= self.window():
                            self._settle(in_flight, ack, generation)
                        in_flight.append((self._submit(run_id, request), end))
                    else:
                        self._settle(in_flight, ack, generation, wait_all=True)
                        self._timed(run_id, request)
                        if ack:
                            self.spool.ack(end, generation)
                    offset = end
                else:
                    continue
                if held:
                    if not in_flight:
                        return offset
                    self._settle(in_flight, ack, generation, wait_all=True)
                    continue  # points logged meanwhile may have filled the held request
                self._settle(in_flight, ack, generation, timeout=0.25)
        finally:
            for future, _ in in_flight:  # after a failure: let the others finish, ack nothing more
                with contextlib.suppress(BaseException):
                    future.result()

    def _submit(self, run_id: str, request: dict[str, Any]) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.concurrency, "MLflowCVLogger-send", initializer=lower_priority)
        timeout = _http.current_timeout()

        def send() -> None:
            with _http.fail_fast(timeout):
                self._timed(run_id, request)

        return self._pool.submit(send)

    def _settle(
        self,
        in_flight: collections.deque[tuple[Any, int]],
        ack: bool,
        generation: int,
        timeout: float | None = None,
        wait_all: bool = False,
    ) -> None:
        """Wait for the oldest request in flight (all of them with ``wait_all``; at most ``timeout`` seconds
        with a timeout) and ack it. A failure propagates; the caller's ``finally`` waits for the rest."""
        from concurrent.futures import wait

        while in_flight:
            future, end = in_flight[0]
            if timeout is not None and not wait([future], timeout=timeout).done:
                return
            in_flight.popleft()
            future.result()
            if ack:
                self.spool.ack(end, generation)
            if not wait_all:
                return

    def _send(self, run_id: str, request: dict[str, Any]) -> None:
        kind = request["kind"]
        if kind != "noop":
            self.requests += 1
        try:
            if kind == "batch":
                self.client.log_batch(
                    run_id, metrics=request["metrics"], params=request["params"], tags=request["tags"]
                )
            elif kind == "artifact":
                if os.path.exists(request["src"]):
                    _compat.log_artifact(self.client, run_id, request["src"], request["dst"] or None)
                else:
                    message = (
                        f"MLflowCVLogger: artifact file {request['src']} no longer exists and cannot be uploaded "
                        f"to run {run_id} (artifact dir {request['dst']!r}). Keep spooled files until `sync` finished."
                    )
                    _compat.warn_once(message, message, RuntimeWarning)
            elif kind == "input":
                from mlflow.entities import Dataset, DatasetInput, InputTag
                from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

                tags = [InputTag(MLFLOW_DATASET_CONTEXT, request["context"])] if request.get("context") else []
                self.client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**request["dataset"]), tags)])
            elif kind == "noop":
                return
            elif kind == "status":
                set_run_status(self.client, run_id, request["status"], request.get("end"))
        except Exception as err:  # noqa: BLE001 - classify, then re-raise or record
            if is_retryable(err):
                raise
            self._reject(run_id, request, err)

    def _reject(self, run_id: str, request: dict[str, Any], err: BaseException) -> None:
        """MLflow refused the request as invalid: retry the halves (down to single items), keep and report the rest."""
        items = (
            [(f, x) for f in ("metrics", "params", "tags") for x in request[f]] if request["kind"] == "batch" else []
        )
        if len(items) > 1:  # bisect: one bad item among 1,000 costs ~20 requests, not 1,000
            for half in (items[: len(items) // 2], items[len(items) // 2 :]):
                part: dict[str, Any] = {"kind": "batch", "metrics": [], "params": [], "tags": []}
                for field, item in half:
                    part[field].append(item)
                self._send(run_id, part)
            return
        self.rejected += 1
        what = _describe(request)
        path = self.spool.directory / f"{self.spool.key}.rejected.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"request": what, "error": str(err)[:2000]}) + "\n")
            where = f"; kept in {path}"
        except OSError:
            where = ""
        warnings.warn(
            f"MLflowCVLogger: MLflow rejected {what} for run {run_id}: {str(err)[:300]}{where}. "
            "Fix: use a new key (params cannot change within a run) or start a new run.",
            RuntimeWarning,
            stacklevel=2,
        )


def _metrics_only(request: dict[str, Any]) -> bool:
    return request["kind"] == "batch" and not request["params"] and not request["tags"]


def _describe(request: dict[str, Any]) -> str:
    if request["kind"] == "batch":
        items = [f"metric {m.key}={m.value}" for m in request["metrics"]]
        items += [f"param {p.key}={p.value[:200]!r}" for p in request["params"]]
        items += [f"tag {t.key}={t.value[:200]!r}" for t in request["tags"]]
        return ", ".join(items)
    return json.dumps({k: v for k, v in request.items() if k != "kind"})


def _plan(batch: list[tuple[dict[str, Any], int]]) -> Iterator[tuple[dict[str, Any], int]]:
    """Coalesce records into requests (within MLflow's per-request limits), each with its ack offset.

    A metric record goes whole into one request unless it alone exceeds a request (then the continuation
    requests are marked ``split``): the ack offset of a request is then exactly what it carries, so reading
    again from it never re-sends a point.
    """
    from mlflow.entities import Metric, Param, RunTag

    cur: dict[str, Any] = {"kind": "batch", "metrics": [], "params": [], "tags": []}
    cur_end = 0

    def full(extra_metrics: int, extra_pt: int) -> bool:
        pt = len(cur["params"]) + len(cur["tags"])
        return (
            len(cur["metrics"]) + extra_metrics > MAX_METRICS_PER_BATCH
            or pt + extra_pt > MAX_PARAMS_TAGS_PER_BATCH
            or len(cur["metrics"]) + pt + extra_metrics + extra_pt > MAX_METRICS_PER_BATCH
        )

    def nonempty() -> bool:
        return bool(cur["metrics"] or cur["params"] or cur["tags"])

    for rec, end in batch:
        t = rec.get("t")
        if t == "m":
            items = [Metric(k, v, rec["ts"], rec["s"]) for k, v in metric_points(rec)]
            if nonempty() and full(len(items), 0):
                yield cur, cur_end  # keep a record whole: a request then ends exactly at its ack offset
                cur = {"kind": "batch", "metrics": [], "params": [], "tags": []}
            while items:
                if full(1, 0):  # only a record larger than a whole request is split
                    yield cur, cur_end
                    cur = {"kind": "batch", "metrics": [], "params": [], "tags": [], "split": True}
                room = MAX_METRICS_PER_BATCH - len(cur["metrics"]) - len(cur["params"]) - len(cur["tags"])
                cur["metrics"].extend(items[:room])
                items = items[room:]
            cur_end = end
        elif t in ("p", "tag"):
            field = "params" if t == "p" else "tags"
            cls = Param if t == "p" else RunTag
            entries = [cls(k, v) for k, v in rec["d"].items()]
            while entries:
                if full(0, 1):
                    yield cur, cur_end
                    cur = {"kind": "batch", "metrics": [], "params": [], "tags": []}
                room = MAX_PARAMS_TAGS_PER_BATCH - len(cur["params"]) - len(cur["tags"])
                cur[field].extend(entries[:room])
                entries = entries[room:]
            cur_end = end
        elif t in ("a", "status", "input"):
            if nonempty():
                yield cur, cur_end
                cur = {"kind": "batch", "metrics": [], "params": [], "tags": []}
            if t == "input":
                yield {"kind": "input", "dataset": rec["d"], "context": rec.get("ctx")}, end
            elif t == "a":
                yield {"kind": "artifact", "src": rec["src"], "dst": rec.get("dst")}, end
            else:
                yield {"kind": "status", "status": rec["status"], "end": rec.get("end")}, end
            cur_end = end
        else:  # run / bind headers: nothing to send
            cur_end = end
            if not nonempty():
                yield {"kind": "noop"}, end
    if nonempty():
        yield cur, cur_end
