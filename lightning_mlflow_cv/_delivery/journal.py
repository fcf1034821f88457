"""The journal: a durable, append-only queue between training and MLflow.

Everything :class:`~lightning_mlflow_cv.MLflowCVLogger` logs is appended, as one JSON line per call, to a
spool file on local disk (a write-ahead journal). The writer (:mod:`lightning_mlflow_cv._delivery.writer`) reads it from
its last acknowledged offset and sends it (:mod:`lightning_mlflow_cv._delivery.deliverer`); when MLflow cannot be reached
the data simply stays here, and ``lightning-mlflow-cv sync SPOOL`` (:mod:`lightning_mlflow_cv.spool_sync`) can
replay it later. Replaying is idempotent: identical metric points are stored once by MLflow's SQL stores, params
and tags are re-set to the same values, and artifacts are uploaded under fixed names.

Record kinds (key ``t``):

- ``run``: header, first line: ``tracking_uri`` (credentials removed), and either ``run_id`` or what is
  needed to create the run (``experiment_name``, ``run_name``, ``tags``, ``parent_run_id``).
- ``bind``: the run id created for a spool that started without one.
- ``m``: metrics ``d`` (key -> value) at ``s`` (step) and ``ts`` (ms timestamp).
- ``p`` / ``tag``: params / tags ``d``.
- ``a``: an artifact file ``src`` (kept inside the spool's files directory) for ``dst`` (artifact dir).
- ``status``: ``status`` and ``end`` (ms) for ``set_terminated`` or RUNNING on resume.
- ``input``: a dataset ``d`` (MLflow ``Dataset`` entity fields) used in context ``ctx``.

Offsets (``acked``, ``end``, what :meth:`Spool.read` returns) are byte offsets in the file while the journal is on
disk and line counts once it fell back to memory; :attr:`Spool.generation` changes when their meaning does.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import warnings
from collections import deque
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from lightning_mlflow_cv._compat.mlflow_api import warn_once
from lightning_mlflow_cv._delivery import locks

log = logging.getLogger(__name__)

#: One compact JSON encoder for every append (``json.dumps`` builds a new one per call with these separators).
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def metric_record(step: int, ts: int, keys_json: str, values: Collection[float]) -> str:
    """One journal line of metric points, as :meth:`Spool.commit` writes it: values packed, not formatted.

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
    n = len(values)
    packer = _PACKERS.get(n)
    if packer is None:
        packer = _PACKERS[n] = struct.Struct(f"<{n}d").pack
    return f'{{"t":"m","s":{step},"ts":{ts},"k":{keys_json},"v":"{packer(*values).hex()}"}}\n'


#: ``struct`` packers of n float64s, by n (the format string is parsed once per size).
_PACKERS: dict[int, Any] = {}


def metric_points(rec: dict[str, Any]) -> list[tuple[str, float]]:
    """The ``(key, value)`` pairs of a metric record (``"t": "m"``), packed or as a ``"d"`` mapping."""
    if "v" in rec:
        keys = rec["k"]
        return list(zip(keys, struct.unpack(f"<{len(keys)}d", bytes.fromhex(rec["v"])), strict=True))
    return list(rec["d"].items())


#: Metric records wait in memory at most this long (ms, from the first of them) before they are written, by the
#: next append or, in a pause, by the spool's commit timer (:meth:`Spool.append_metrics`) ...
COMMIT_MS = 100
#: ... which writes them this much earlier (ms), so that a busy training thread delaying the timer by a few GIL
#: switch intervals still keeps them within :data:`COMMIT_MS`.
COMMIT_MARGIN_MS = 25
#: ... or until this many are waiting (see :meth:`Spool.append_metrics`).
COMMIT_RECORDS = 256

#: Compact the journal when its delivered part grew past this size (what is not delivered yet moves to the front:
#: see :meth:`Spool._compact`).
COMPACT_BYTES = 32 * 1024 * 1024


def default_spool_dir() -> Path:
    """``$LIGHTNING_MLFLOW_CV_SPOOL_DIR`` or ``~/.cache/lightning_mlflow_cv/spool``."""
    env = os.environ.get("LIGHTNING_MLFLOW_CV_SPOOL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_mlflow_cv" / "spool"


class Spool:
    """Append-only JSON-lines journal with an acknowledged offset, on disk or (fallback) in memory.

    Params, tags, artifacts, statuses and the run header go to the OS with one ``write`` each, so a process
    killed with SIGKILL loses none of them (the page cache outlives the process). Metric records, which arrive
    every training step, are group-committed (:meth:`append_metrics`): they wait in memory until
    :data:`COMMIT_MS` after the first of them or :data:`COMMIT_RECORDS` of them, then go out in one ``write``,
    and anything else appended, read, flushed or closed writes them first, so the order in the file is the order
    of the calls. When nothing else is logged (validation, a slow loader, any pause), a timer thread writes them
    when they are due. A SIGKILL therefore loses at most the metric points of the last :data:`COMMIT_MS` of wall
    time (the logger commits when a checkpoint is saved, and a fit resumed from it logs the lost steps again); an
    exception, Ctrl+C or a normal exit loses nothing.

    When the file is shared with a writer process (:attr:`shared`), an append never waits for that process's
    compaction lock: lines that find it taken wait in memory for the next append or the timer.

    If the spool directory cannot be written (read-only, disk full), it warns once, naming the
    directory and the fix, and keeps records in memory: training continues and the data is still
    delivered while the process lives.
    """

    def __init__(self, directory: str | os.PathLike[str], key: str, compact: bool = True, hold: bool = True) -> None:
        self.directory = Path(directory)
        self._hold: Any = None  # shared lock: this spool is open in a live process (see _delivery.locks)
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
        self._metric_buf: deque[tuple[int, int, dict[str, float]]] = deque()  # see append_metrics
        self._metric_buf_t0 = 0
        self._key_sets: dict[tuple[str, ...], str] = {}  # keys of a metric record -> their JSON list
        #: Metric points per journal byte of what this process wrote (to tell a user how many points are left).
        self.points_per_byte = 0.0
        self._deferred: list[bytes] = []  # encoded lines waiting for the writer process's compaction lock
        self._kick = threading.Event()  # wakes the commit timer (see _commit_timer)
        self._timer: threading.Thread | None = None
        self._closed = False
        #: Bumped when offsets change meaning (switch to memory); acks from an older generation are ignored.
        self.generation = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if hold:
                self._hold = locks.hold(self.directory, key)
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

    def append_metrics(self, step: int, ts: int, values: dict[str, float]) -> None:
        """Queue one metric record (``values``: stored key -> float, not changed afterwards by the caller).

        The training thread's path, every logging step: a ``deque`` append and a clock comparison. The queued
        records are encoded and written together (:meth:`commit`) once the first of them is :data:`COMMIT_MS`
        old or :data:`COMMIT_RECORDS` are queued; inside a fit the training thread's caches are cold at every
        step, so encoding and writing many records at once costs it a fraction of doing it record by record.
        """
        buf = self._metric_buf
        if not buf:
            self._metric_buf_t0 = ts
            buf.append((step, ts, values))
            if self._timer is None:
                self._start_timer()
            self._kick.set()  # once per group of records: the timer writes them if nothing else does in time
            return
        buf.append((step, ts, values))
        if ts - self._metric_buf_t0 >= COMMIT_MS or len(buf) >= COMMIT_RECORDS:
            self.commit()

    def _start_timer(self) -> None:
        with self._lock:
            if self._timer is None and not self._closed:
                self._timer = threading.Thread(target=self._commit_timer, name="MLflowCVLogger-commit", daemon=True)
                self._timer.start()

    def _commit_timer(self) -> None:
        """Write queued metric records once the first of them is due, when no append came to do it (a pause)."""
        buf = self._metric_buf
        while not self._closed:
            self._kick.wait(1.0)
            self._kick.clear()
            while (buf or self._deferred) and not self._closed:
                try:
                    first = buf[0][1] / 1000.0 if buf else 0.0
                except IndexError:  # written by another thread meanwhile
                    continue
                delay = first + (COMMIT_MS - COMMIT_MARGIN_MS) / 1000.0 - time.time()
                if delay > 0:
                    time.sleep(min(delay, COMMIT_MS / 1000.0))
                    continue
                self.commit()
                if self._deferred:
                    time.sleep(0.01)  # the compaction lock is taken: try again shortly
                    with self._lock:
                        self._append_raw([])

    def commit(self) -> None:
        """Write the queued metric records (one ``write``; never raises, as :meth:`append`)."""
        buf = self._metric_buf
        if not buf:
            return
        with self._lock:  # records leave the queue and reach the file in one critical section: order kept
            key_sets = self._key_sets
            lines = []
            points = 0
            while buf:
                try:
                    step, ts, values = buf.popleft()
                except IndexError:  # pragma: no cover - emptied by another thread between the check and the pop
                    break
                names = tuple(values)
                keys_json = key_sets.get(names)
                if keys_json is None:
                    keys_json = key_sets[names] = _ENCODE(list(names))
                lines.append(metric_record(step, ts, keys_json, values.values()))
                points += len(names)
            if lines:
                self.points_per_byte = points / max(len(lines[-1]) * len(lines), 1)
                self._append_raw(lines)

    def append_lines(self, lines: list[str]) -> None:
        """Append already-encoded journal lines (each ending in a newline); never raises, as :meth:`append`."""
        with self._lock:
            self.commit()
            self._append_raw(lines)

    def _append_raw(self, lines: list[str]) -> None:
        with self._lock:
            if self._memory is not None:
                if self._deferred:
                    lines = _lines(b"".join(self._deferred)) + list(lines)
                    self._deferred = []
                self._memory.extend(lines)
                self._end += len(lines)
                return
            data = "".join(lines).encode("utf-8")
            if self._deferred:
                data = b"".join(self._deferred) + data
            if not data:
                return
            try:
                if self.shared:
                    fd = self._fh.fileno()
                    try:  # the writer process may be compacting the file: never wait for it (it may be stopped)
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        self._deferred = [data]
                        self._kick.set()
                        return
                    try:
                        self._write(data)
                    finally:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    self._write(data)
                self._deferred = []
                self._end += len(data)
            except OSError as err:
                self._deferred = []
                new = _lines(data)
                self._to_memory(err).extend(new)
                self._end += len(new)

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
            message = (
                f"MLflowCVLogger: could not copy {src} into the spool directory {self.directory} ({err}); "
                "the artifact is uploaded from its original path, so keep that file until the run is synced."
            )
            warn_once(message, message, RuntimeWarning)
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
            self.commit()
            if self._deferred:
                self._append_raw([])
            if self._fh is not None and self._memory is None:
                try:
                    self._fh.flush()
                except OSError as err:
                    self._to_memory(err)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def end(self) -> int:
        self.commit()
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
        """Mark everything before ``offset`` delivered.

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
                _write_int(self.ack_path, self.acked)
            except OSError as err:
                self._to_memory(err)

    @property
    def compaction_due(self) -> bool:
        """Whether the delivered part of the journal on disk passed :data:`COMPACT_BYTES` (and this spool may
        compact it)."""
        return self._memory is None and self.compact and self.acked > COMPACT_BYTES

    def compact_if_due(self) -> None:
        """Compact the journal (:meth:`_compact`) once :attr:`compaction_due`. The deliverer calls it between
        requests, with none in flight: records read and sent but not acknowledged yet would otherwise be read
        again at their new offsets and sent twice."""
        with self._lock:
            if not self.compaction_due:
                return
            try:
                self._compact()
            except OSError as err:
                self._to_memory(err)

    def _compact(self) -> None:
        """Drop the delivered part of a large journal, under an exclusive lock (a writer process's appends do not
        wait for it: see :attr:`shared`).

        What is not delivered yet moves to just after the header, in place, so a fit that logs without pause (the
        writer never finds the journal fully delivered) keeps it near :data:`COMPACT_BYTES`. Only while that part
        is smaller than the delivered one: the copy then never overwrites what it copies, and a process killed at
        any point loses nothing. Killed while copying, the acknowledged offset still points at the original
        records; killed after the offset moved to the copy but before the file was cut, the records after the copy
        (delivered ones and the originals) are read again: replays are idempotent. Otherwise the next
        acknowledgement tries again.
        """
        fd = self._fh.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            head = "".join(self._header).encode("utf-8")
            tail = size - self.acked
            if len(head) + tail > self.acked:
                return
            with open(self.path, "r+b") as fh:  # not the append-mode handle: writes at chosen offsets
                fh.seek(0)
                fh.write(head)
                src = self.acked
                while src < size:
                    fh.seek(src)
                    chunk = fh.read(min(_CHUNK, size - src))
                    if not chunk:
                        break
                    fh.seek(len(head) + src - self.acked)
                    fh.write(chunk)
                    src += len(chunk)
                fh.flush()
            self.acked = len(head)
            _write_int(self.ack_path, self.acked)
            os.ftruncate(fd, len(head) + tail)
            self._end = len(head) + tail
            self.generation += 1  # offsets read before the rewrite are now meaningless
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def refresh_ack(self) -> None:
        """Re-read the ack offset another process (the writer process) advanced, or reset by compacting the
        journal."""
        if self._memory is None:
            with self._lock:
                self.acked = _read_int(self.ack_path)

    def adopt(self) -> None:
        """Take delivery over from a writer process that is gone: its acknowledged offset, and a file it may have
        left truncated by a compaction cut short (then everything is read again: replays are idempotent)."""
        if self._memory is not None:
            return
        with self._lock:
            self.acked = _read_int(self.ack_path)
            try:
                size = os.path.getsize(self.path)
            except OSError:
                return
            if self.acked > size:
                self.acked = 0
                self._end = size
            self.generation += 1

    @property
    def pending(self) -> int:
        """Bytes of journal (UTF-8 JSON lines with their newlines) not yet delivered, on disk and in memory alike."""
        self.commit()
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
        self._stop_timer()
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
        self._stop_timer()
        with self._lock:
            self.flush()
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._release()

    def _stop_timer(self) -> None:
        self._closed = True
        self._kick.set()

    def _release(self, unlink: bool = False) -> None:
        locks.release(self._hold, locks.lock_path(self.directory, self.key) if unlink else None)
        self._hold = None

    # -- internals -------------------------------------------------------------------------------
    def _iter_lines(self, offset: int, header_only: bool = False) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(offset)
            for line in fh:
                if header_only and not (line.startswith('{"t":"run"') or line.startswith('{"t":"bind"')):
                    continue
                yield line

    def _to_memory(self, err: OSError) -> list[str]:
        """Switch to in-memory mode (once, with a warning) and return the in-memory line list."""
        if self._memory is not None:
            return self._memory
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
        return lines


def _lines(data: bytes) -> list[str]:
    """Encoded journal lines back to the list of lines (each with its newline) the in-memory journal holds."""
    return [line + "\n" for line in data.decode("utf-8").split("\n")[:-1]]


_CHUNK = 1 << 20


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
