"""The durable queue between training and MLflow.

Everything :class:`~lightning_mlflow_cv.MLflowCVLogger` logs is appended, as one JSON line per call, to a
spool file on local disk (a write-ahead journal). A background :class:`Writer` thread reads the journal
from its last acknowledged offset, coalesces records into ``log_batch`` requests within MLflow's limits,
sends them, and advances the offset. When MLflow cannot be reached the data simply stays in the journal,
the writer backs off and retries, and ``lightning-mlflow-cv sync SPOOL`` can replay it later. Replaying
is idempotent: identical metric points are stored once by MLflow's SQL stores, params and tags are
re-set to the same values, and artifacts are uploaded under fixed names.

Record kinds (key ``t``):

- ``run``: header, first line: ``tracking_uri`` (credentials removed), and either ``run_id`` or what is
  needed to create the run (``experiment_name``, ``run_name``, ``tags``, ``parent_run_id``).
- ``bind``: the run id created for a spool that started without one.
- ``m``: metrics ``d`` (key -> value) at ``s`` (step) and ``ts`` (ms timestamp).
- ``p`` / ``tag``: params / tags ``d``.
- ``a``: an artifact file ``src`` (kept inside the spool's files directory) for ``dst`` (artifact dir).
- ``status``: ``status`` and ``end`` (ms) for ``set_terminated`` or RUNNING on resume.
- ``input``: a dataset ``d`` (MLflow ``Dataset`` entity fields) used in context ``ctx``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_mlflow_cv import _compat, _http
from lightning_mlflow_cv._keys import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from lightning_mlflow_cv._redact import redact_text

log = logging.getLogger(__name__)

#: One compact JSON encoder for every append (``json.dumps`` builds a new one per call with these separators).
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode

def metric_record(step: int, ts: int, keys_json: str, values: list[float]) -> str:
    """One journal line of metric points, as the training thread writes it: values packed, not formatted.

    Formatting a float as decimal text (what ``json.dumps`` does) costs about a microsecond per value, most of
    what logging a step cost the training thread; packing the float64s and writing them as hex costs a few
    hundredths of that. ``keys_json`` is the JSON list of the keys, which the logger encodes once per key set.
    :func:`metric_points` reads it (and the older ``"d"`` form) back.

    Example::

        >>> import json
        >>> line = metric_record(3, 1700000000000, '["loss","acc"]', [0.5, 1.0])
        >>> metric_points(json.loads(line))
        [('loss', 0.5), ('acc', 1.0)]
    """
    packed = struct.pack(f"<{len(values)}d", *values).hex()
    return f'{{"t":"m","s":{step},"ts":{ts},"k":{keys_json},"v":"{packed}"}}\n'


def metric_points(rec: dict[str, Any]) -> list[tuple[str, float]]:
    """The ``(key, value)`` pairs of a metric record (``"t": "m"``), packed or as a ``"d"`` mapping."""
    if "v" in rec:
        keys = rec["k"]
        return list(zip(keys, struct.unpack(f"<{len(keys)}d", bytes.fromhex(rec["v"])), strict=True))
    return list(rec["d"].items())


#: Compact the journal when everything is delivered and it grew past this size.
COMPACT_BYTES = 32 * 1024 * 1024

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
#: drain. :meth:`Writer.flush`, ``finalize`` and ``sync`` send everything at once.
FLUSH_COST_RATIO = 10.0

#: The longest a partial request is held however slow the store is (unless ``flush_interval_s`` is longer).
MAX_HOLD_S = 10.0

#: Failed attempts in a row after which a flush (and so ``finalize``) stops waiting for a store that was
#: reachable when the flush began; the backoff between them is 0.5 s, then 1 s.
FLUSH_TRIES = 3


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


def default_spool_dir() -> Path:
    """``$LIGHTNING_MLFLOW_CV_SPOOL_DIR`` or ``~/.cache/lightning_mlflow_cv/spool``."""
    env = os.environ.get("LIGHTNING_MLFLOW_CV_SPOOL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_mlflow_cv" / "spool"


class Spool:
    """Append-only JSON-lines journal with an acknowledged offset, on disk or (fallback) in memory.

    The file is line-buffered: each append is one ``write`` to the OS, so a process killed with SIGKILL
    loses nothing it had logged (the page cache outlives the process).

    If the spool directory cannot be written (read-only, disk full), it warns once, naming the
    directory and the fix, and keeps records in memory: training continues and the data is still
    delivered while the process lives.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, compact: bool = True, hold: bool = True) -> None:
        self.directory = Path(directory)
        self._hold: Any = None  # shared lock: this spool is open in a live process (see _autosync)
        self.compact = compact  # only the process that appends may compact
        self.key = key
        self.path = self.directory / f"{key}.jsonl"
        self.ack_path = self.directory / f"{key}.ack"
        self.files_dir = self.directory / f"{key}.files"
        self._lock = threading.RLock()
        self._fh: Any = None
        self._memory: list[str] | None = None
        self._memory_base = 0
        self._end = 0
        self._header: list[str] = []
        self.acked = 0
        #: True while another process (a child-process writer) may compact the file: appends then take a file lock.
        #: A thread writer compacts under :attr:`_lock`, which appends hold anyway, so they skip two system calls.
        self.shared = False
        #: Bumped when offsets change meaning (switch to memory); acks from an older generation are ignored.
        self.generation = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if hold:
                from lightning_mlflow_cv import _autosync

                self._hold = _autosync.hold(self.directory, key)
            if self.path.exists():
                self._end = self.path.stat().st_size
                self.acked = _read_int(self.ack_path)
                self._header = [line for line in self._iter_lines(0, header_only=True)]
            # unbuffered binary: an append is one encode and one write(2), nothing held in a Python buffer
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run
        except OSError as err:
            self._to_memory(err)

    # -- writing ---------------------------------------------------------------------------------
    @property
    def on_disk(self) -> bool:
        """False once the spool fell back to memory."""
        return self._memory is None

    def append(self, *records: dict[str, Any]) -> None:
        """Append records (never raises: a disk error switches to memory with one warning)."""
        lines = [_ENCODE(r) + "\n" for r in records]
        with self._lock:
            for r, line in zip(records, lines, strict=True):
                if r.get("t") in ("run", "bind"):
                    self._header.append(line)
            self.append_lines(lines)

    def append_lines(self, lines: list[str]) -> None:
        """Append already-encoded journal lines (each ending in a newline); never raises, as :meth:`append`."""
        data = "".join(lines).encode("utf-8")
        with self._lock:
            if self._memory is not None:
                self._memory.extend(lines)
                self._end += len(lines)
                return
            try:
                if self.shared:
                    fd = self._fh.fileno()
                    fcntl.flock(fd, fcntl.LOCK_EX)  # the writer process may be compacting the file
                    try:
                        self._write(data)
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    self._write(data)
                self._end += len(data)
            except OSError as err:
                self._to_memory(err)
                self._memory.extend(lines)  # type: ignore[union-attr]
                self._end += len(lines)

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` (a raw file may write less than asked)."""
        view = memoryview(data)
        while view:
            n = self._fh.write(view)
            if n is None:  # pragma: no cover - non-blocking files only
                raise OSError("spool write would block")
            view = view[n:]

    def stage_file(self, src: str | os.PathLike[str], name: str | None = None) -> str:
        """Keep a copy of ``src`` inside the spool so later deletion by the caller loses nothing."""
        src = Path(src)
        try:
            base = self.files_dir if self._memory is None else Path(_tempdir())
            dst_dir = base / f"{time.time_ns()}"
            dst_dir.mkdir(parents=True, exist_ok=True)
            dst = dst_dir / (name or src.name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            return str(dst)
        except OSError as err:
            _warn_once(
                f"MLflowCVLogger: could not copy {src} into the spool directory {self.directory} ({err}); "
                "the artifact is uploaded from its original path, so keep that file until the run is synced.",
            )
            return str(src)

    def new_file_path(self, name: str) -> Path:
        """A fresh path inside the spool for a file the logger renders itself (images, JSON)."""
        base = self.files_dir if self._memory is None else Path(_tempdir())
        d = base / f"{time.time_ns()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            d = Path(_tempdir()) / f"{time.time_ns()}"
            d.mkdir(parents=True, exist_ok=True)
        return d / name

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None and self._memory is None:
                try:
                    self._fh.flush()
                except OSError as err:
                    self._to_memory(err)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def end(self) -> int:
        return self._end

    def read(self, offset: int, max_records: int = 5000) -> list[tuple[dict[str, Any], int]]:
        """Records after ``offset`` with the offset just past each one."""
        self.flush()
        out: list[tuple[dict[str, Any], int]] = []
        with self._lock:
            if self._memory is not None:
                start = max(offset - self._memory_base, 0)
                for i, line in enumerate(self._memory[start : start + max_records]):
                    out.append((json.loads(line), self._memory_base + start + i + 1))
                return out
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            pos = offset
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # a partial line from a crash: ignore it
                pos += len(raw)
                try:
                    out.append((json.loads(raw), pos))
                except json.JSONDecodeError:
                    log.warning("MLflowCVLogger: skipping a corrupt line in %s at byte %d", self.path, pos)
                if len(out) >= max_records:
                    break
        return out

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record from the start (for ``sync``)."""
        offset = 0
        while True:
            batch = self.read(offset)
            if not batch:
                return
            for rec, offset in batch:  # noqa: B007 - offset carried to the next read
                yield rec

    def header(self) -> dict[str, Any]:
        """The ``run`` record merged with any later ``bind``."""
        out: dict[str, Any] = {}
        for line in self._header:
            rec = json.loads(line)
            if rec["t"] == "run":
                out.update(rec)
            elif rec["t"] == "bind":
                out["run_id"] = rec["run_id"]
        return out

    def ack(self, offset: int, generation: int | None = None) -> None:
        """Mark everything before ``offset`` delivered; compact a large, fully delivered journal.

        ``generation`` is the :attr:`generation` the offset was read in; a stale one is ignored (the records
        are then sent again, which is idempotent).
        """
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            self.acked = max(self.acked, offset)
            if self._memory is not None:
                drop = self.acked - self._memory_base
                if drop > 0:
                    del self._memory[:drop]
                    self._memory_base = self.acked
                return
            try:
                if self.compact and self.acked > COMPACT_BYTES:
                    self._compact()
                _write_int(self.ack_path, self.acked)
            except OSError as err:
                self._to_memory(err)

    def _compact(self) -> None:
        """Truncate a fully delivered journal to its header, under an exclusive lock (appends wait on it)."""
        fd = self._fh.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if self.acked < os.fstat(fd).st_size:
                return  # something arrived since: compact next time
            os.ftruncate(fd, 0)
            self._write("".join(self._header).encode("utf-8"))
            self._end = self.acked = os.fstat(fd).st_size
            self.generation += 1  # offsets read before the truncation are now meaningless
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def refresh_ack(self) -> None:
        """Re-read the ack offset another process (the writer process) advanced."""
        if self._memory is None:
            with self._lock:
                self.acked = max(self.acked, _read_int(self.ack_path))

    @property
    def pending(self) -> int:
        """Bytes of journal (UTF-8 JSON lines with their newlines) not yet delivered, on disk and in memory alike."""
        if self._memory is None:
            try:
                return os.path.getsize(self.path) - self.acked
            except OSError:
                return self._end - self.acked
        with self._lock:  # in memory offsets count lines: measure the undelivered ones
            start = max(self.acked - self._memory_base, 0)
            return sum(len(line.encode("utf-8")) for line in self._memory[start:])

    def remove(self) -> None:
        """Delete the journal and its files (after everything was delivered)."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            for p in (self.path, self.ack_path):
                try:
                    p.unlink()
                except OSError:
                    pass
            shutil.rmtree(self.files_dir, ignore_errors=True)
            self._release(unlink=True)

    def close(self) -> None:
        with self._lock:
            self.flush()
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._release()

    def _release(self, unlink: bool = False) -> None:
        from lightning_mlflow_cv import _autosync

        _autosync.release(self._hold, _autosync.lock_path(self.directory, self.key) if unlink else None)
        self._hold = None

    # -- internals -------------------------------------------------------------------------------
    def _iter_lines(self, offset: int, header_only: bool = False) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(offset)
            for line in fh:
                if header_only and not (line.startswith('{"t":"run"') or line.startswith('{"t":"bind"')):
                    continue
                yield line

    def _to_memory(self, err: OSError) -> None:
        if self._memory is not None:
            return
        warnings.warn(
            f"MLflowCVLogger: cannot write the spool file {self.path} ({err}). Training continues and "
            "logged data is kept in memory until delivered, but it will not survive a crash. "
            "Fix: free disk space or set `spool_dir=` (or LIGHTNING_MLFLOW_CV_SPOOL_DIR) to a writable directory.",
            RuntimeWarning,
            stacklevel=2,
        )
        lines: list[str] = []
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
            try:  # keep what already reached the disk and is not delivered yet
                with open(self.path, encoding="utf-8") as fh:
                    fh.seek(self.acked)
                    lines = [line for line in fh if line.endswith("\n")]
            except OSError:
                lines = []
        self._memory = lines
        self._memory_base = 0
        self.acked = 0
        self._end = len(lines)
        self.generation += 1


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_int(path: Path, value: int) -> None:
    tmp = path.with_suffix(".ack.tmp")
    tmp.write_text(str(value))
    os.replace(tmp, path)


_tmp: str | None = None


def _tempdir() -> str:
    global _tmp
    if _tmp is None:
        import tempfile

        _tmp = tempfile.mkdtemp(prefix="lmc-spool-")
    return _tmp


_warned: set[str] = set()


def _warn_once(msg: str, category: type[Warning] = RuntimeWarning) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, category, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# delivery
# ------------------------------------------------------------------------------------------------
_NON_RETRYABLE = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"}


def is_retryable(err: BaseException) -> bool:
    """Server down, timeout, 5xx, 429, auth errors: retry. A request MLflow rejects as invalid: don't."""
    code = getattr(err, "error_code", None)
    return code not in _NON_RETRYABLE


def describe_failure(err: BaseException) -> str:
    """A short reason for a tracking failure, with the fix for credential problems (never the secret)."""
    from lightning_mlflow_cv._artifact_errors import describe

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
        return "the tracking server denied permission (HTTP 403). Fix: ask an admin for EDIT permission on the experiment"
    return f"{type(err).__name__}: {text[:300]}"


def safe_uri(uri: str) -> str:
    """The tracking URI without credentials, as kept in the spool header."""
    return redact_text(uri)


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
        if self.spool.acked > COMPACT_BYTES:
            return False  # a delivered journal this large is compacted once nothing is pending: send it
        budget = self.hold_budget(hold_s)
        age = min(max(time.time() - min(m.timestamp for m in metrics) / 1000.0, 0.0), budget)
        if age >= budget:
            return False
        self.held_due = time.monotonic() + budget - age
        return True

    def _timed(self, run_id: str, request: dict[str, Any]) -> None:
        """Send one request; a metric request's duration feeds :attr:`last_request_s` and :attr:`request_s`."""
        start = time.monotonic()
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
        self.run_id = create_run(self.client, header)
        self.spool.append({"t": "bind", "run_id": self.run_id})
        return self.run_id

    def deliver(self, offset: int, ack: bool = True, max_records: int = 5000, drain: bool = True, hold_s: float = 0.0) -> int:
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
                    generation = self.spool.generation
                    if ack:
                        offset = self.spool.acked  # re-sync: offsets restart if the spool moved to memory
                elif self.spool.generation != generation:  # moved to memory meanwhile: settle, then re-read
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
                self.client.log_batch(run_id, metrics=request["metrics"], params=request["params"], tags=request["tags"])
            elif kind == "artifact":
                if os.path.exists(request["src"]):
                    _compat.log_artifact(self.client, run_id, request["src"], request["dst"] or None)
                else:
                    _warn_once(
                        f"MLflowCVLogger: artifact file {request['src']} no longer exists and cannot be uploaded "
                        f"to run {run_id} (artifact dir {request['dst']!r}). Keep spooled files until `sync` finished."
                    )
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
        items = [(f, x) for f in ("metrics", "params", "tags") for x in request[f]] if request["kind"] == "batch" else []
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


def set_run_status(client: Any, run_id: str, status: str, end_time: int | None = None) -> None:
    """Set the run status through the store, not ``MlflowClient.set_terminated``: the latter prints the run
    URL to stdout, credentials included when the tracking URI carries ``user:pass@``."""
    from mlflow.entities import RunStatus

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is None:  # pragma: no cover - other MLflow versions
        client.set_terminated(run_id, status, end_time=end_time)
        return
    if status == "RUNNING":
        end_time = None
    else:
        end_time = end_time or int(time.time() * 1000)
    store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)


def _describe(request: dict[str, Any]) -> str:
    if request["kind"] == "batch":
        items = [f"metric {m.key}={m.value}" for m in request["metrics"]]
        items += [f"param {p.key}={p.value[:200]!r}" for p in request["params"]]
        items += [f"tag {t.key}={t.value[:200]!r}" for t in request["tags"]]
        return ", ".join(items)
    return json.dumps({k: v for k, v in request.items() if k != "kind"})


def create_run(client: Any, header: dict[str, Any]) -> str:
    """Create the run a spool header describes (experiment created when missing)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    exp_id = header.get("experiment_id")
    if exp_id is None:
        name = header.get("experiment_name") or "Default"
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            try:
                exp_id = client.create_experiment(name, artifact_location=header.get("artifact_location"))
            except Exception as err:  # another process created it between the lookup and here
                exp = client.get_experiment_by_name(name) if getattr(err, "error_code", None) == "RESOURCE_ALREADY_EXISTS" else None
                if exp is None or exp.lifecycle_stage == "deleted":
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
    tags = dict(header.get("tags") or {})
    if header.get("run_name"):
        tags[MLFLOW_RUN_NAME] = header["run_name"]
    if header.get("parent_run_id"):
        tags[MLFLOW_PARENT_RUN_ID] = header["parent_run_id"]
    run = client.create_run(experiment_id=exp_id, tags=tags, run_name=header.get("run_name"))
    return run.info.run_id


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
            items = [cls(k, v) for k, v in rec["d"].items()]
            while items:
                if full(0, 1):
                    yield cur, cur_end
                    cur = {"kind": "batch", "metrics": [], "params": [], "tags": []}
                room = MAX_PARAMS_TAGS_PER_BATCH - len(cur["params"]) - len(cur["tags"])
                cur[field].extend(items[:room])
                items = items[room:]
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


class Writer(threading.Thread):
    """Background thread: deliver what the spool holds in full requests, and a partial one only when it is due.

    It wakes when the logger has a full request's worth of new points (``wake``), when a partial request held
    back for more points becomes due (its oldest point waited ``flush_interval_s``, longer while the store is
    slow: :meth:`Deliverer.hold_budget`), at least every ``flush_interval_s``, and on :meth:`flush` / :meth:`stop`,
    which send everything.

    On a retryable failure it warns once, naming the spool path and the ``sync`` command, and retries
    with exponential backoff (capped at ``max_backoff_s``); the data stays in the spool meanwhile.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        spool: Spool,
        run_id: str | None,
        tracking_uri: str,
        flush_interval_s: float = 2.0,
        request_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
        on_bound: Callable[[str], None] | None = None,
        already_warned: bool = False,
        on_warning: Callable[[str], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="MLflowCVLogger-writer", daemon=True)
        self._on_warning = on_warning
        self._on_recovered = on_recovered
        self._client_factory = client_factory
        self.spool = spool
        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_interval_s = flush_interval_s
        self.request_timeout_s = request_timeout_s
        self.max_backoff_s = max_backoff_s
        self._on_bound = on_bound
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self._idle = threading.Condition()
        self._attempts = 0  # completed delivery attempts
        self._draining = 0  # flushes waiting: attempts send everything, partial requests included
        self._failures = 0
        self._next_try = 0.0
        self.last_error: BaseException | None = None
        self.degraded = already_warned  # the caller already told the user the store is unreachable
        self._deliverer: Deliverer | None = None

    # -- API used by the logger -----------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Ask for an immediate attempt and wait until everything is delivered or ``timeout`` passes.

        Returns True when the spool is fully delivered. It does not wait out an outage: when the store was
        already unreachable it returns after the first failed attempt, and when it fails during this flush
        (a transient 5xx, a dropped connection) after :data:`FLUSH_TRIES` attempts in a row have failed.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            self._draining += 1
            try:
                start = self._attempts
                tries = 1 if self.degraded else FLUSH_TRIES
                self._next_try = 0.0
                self._wake.set()
                while time.monotonic() < deadline and self.is_alive():
                    if self.spool.pending <= 0 and self._attempts > start:
                        return True
                    if self._attempts > start and self.degraded and self._failures >= tries:
                        return False
                    self._idle.wait(min(0.05, max(deadline - time.monotonic(), 0)))
            finally:
                self._draining -= 1
        return self.spool.pending <= 0

    def stop(self, timeout: float) -> bool:
        """Final flush, then stop the thread. Returns True when everything was delivered."""
        ok = self.flush(timeout)
        self._stop_event.set()
        self._wake.set()
        self.join(timeout=max(self.request_timeout_s, 1.0))
        return ok

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- thread ----------------------------------------------------------------------------------
    def run(self) -> None:
        lower_priority()
        while not self._stop_event.is_set():
            wait = self.flush_interval_s
            due = self._deliverer.held_due if self._deliverer is not None else None
            if due is not None:  # a partial request waits for more points until then
                wait = max(due - time.monotonic(), 0.0)
            if self.degraded:
                wait = max(min(self._next_try - time.monotonic(), self.flush_interval_s), 0.0)
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop_event.is_set():
                break
            if self.degraded and time.monotonic() < self._next_try:
                continue
            self._attempt()
        if self._deliverer is not None:
            self._deliverer.close()

    def _attempt(self) -> None:
        try:
            if self._deliverer is None:
                self._deliverer = Deliverer(
                    self._client_factory(), self.spool, self._run_id, concurrency_for(self.tracking_uri)
                )
            drain = self._draining > 0 or self._stop_event.is_set()
            with _http.fail_fast(self.request_timeout_s):
                self._deliverer.deliver(self.spool.acked, drain=drain, hold_s=self.flush_interval_s)
            if self._deliverer.run_id != self._run_id:
                self._run_id = self._deliverer.run_id
                if self._on_bound is not None and self._run_id:
                    self._on_bound(self._run_id)
            if self.degraded:
                log.warning("MLflowCVLogger: tracking store reachable again; spooled data delivered.")
                if self._on_recovered is not None:
                    self._on_recovered()
            self.degraded = False
            self._failures = 0
        except Exception as err:  # noqa: BLE001 - any failure is retried, data stays in the spool
            self.last_error = err
            self._failures += 1
            backoff = min(0.5 * 2 ** (self._failures - 1), self.max_backoff_s)
            self._next_try = time.monotonic() + backoff
            if not self.degraded:
                self.degraded = True
                where = self.spool.path if self.spool.on_disk else "memory (spool directory not writable)"
                message = (
                    f"MLflowCVLogger: cannot reach the MLflow tracking store {safe_uri(self.tracking_uri)} "
                    f"({describe_failure(err)}). Training continues; logged data is kept in {where} "
                    "and retried with backoff. If the run ends before the store is back, deliver it with: "
                    f"lightning-mlflow-cv sync {self.spool.path}"
                )
                if self._on_warning is not None:
                    self._on_warning(message)
                else:
                    warnings.warn(message, RuntimeWarning, stacklevel=1)
            log.debug("MLflowCVLogger: delivery failed (%s); next try in %.1fs", err, backoff)
        finally:
            with self._idle:
                self._attempts += 1
                self._idle.notify_all()


def sync(spool_path: str | os.PathLike[str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Replay a spool file into its run (creating the run if the fit never reached the store).

    Idempotent: replaying twice adds nothing. Uses MLflow's normal retries. Returns a summary: the run, the
    number of journal records replayed (``records``: lines, the run header and binding included) and their size
    (``bytes``), the store (credentials masked) and how many points MLflow rejected (kept in
    ``<spool>.rejected.jsonl``).

    Example::

        >>> sync("~/.cache/lightning_mlflow_cv/spool/offline-123.jsonl")  # doctest: +SKIP
        {'run_id': '...', 'records': 1200, 'bytes': 96712, 'tracking_uri': 'http://mlflow:5000', 'rejected': 0}
    """
    from mlflow import MlflowClient

    path = Path(spool_path).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise FileNotFoundError(
            f"sync: spool file {str(path)!r} does not exist or is not a .jsonl spool. "
            "Pass the path printed by MLflowCVLogger's warning (e.g. ~/.cache/lightning_mlflow_cv/spool/<run>.jsonl)."
        )
    spool = Spool(path.parent, path.stem)
    header = spool.header()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header.get("tracking_uri")
    if not uri:
        raise ValueError(f"sync: no tracking URI in {path} and none given. Pass --tracking-uri or set MLFLOW_TRACKING_URI.")
    deliverer = Deliverer(MlflowClient(uri), spool, header.get("run_id"), concurrency_for(uri))
    try:
        end = deliverer.deliver(0, ack=False)
    finally:
        deliverer.close()
    spool.ack(end)
    spool.close()
    with open(path, "rb") as fh:  # every line up to the delivered offset is a complete record
        records = fh.read(end).count(b"\n")
    return {
        "run_id": deliverer.run_id,
        "records": records,
        "bytes": end,
        "tracking_uri": safe_uri(uri),
        "rejected": deliverer.rejected,
    }
