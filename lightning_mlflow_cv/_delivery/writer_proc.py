"""The background writer in its own process.

MLflow's per-point work (building entities, protobuf/JSON for REST, SQLAlchemy inserts for SQL stores) is pure
Python. In a thread it competes with the training loop for the GIL; in a child process it only uses CPU the
training process leaves idle. The child tails the same spool file (the journal is already a cross-process
queue: ``sync`` reads it too), delivers it with the same :class:`~lightning_mlflow_cv._delivery.writer.Writer` logic and
writes the ack file.

On Linux the child is forked from the training process, as DataLoader workers are: it inherits the imported MLflow
client and the store MLflow opened for the run (given connections of its own), so it starts in milliseconds
instead of the ~2-3 CPU s a fresh interpreter spends importing MLflow and checking the store's schema (measured in
``benchmarks/README.md``). Memory is shared copy-on-write; the child only touches what delivery needs. Elsewhere,
or when the fork fails, it is a fresh interpreter running :func:`main`. Either way it talks to the parent over
two pipes, one JSON object per line:

- parent -> child: ``{"op": "wake"}``, ``{"op": "flush", "seq": n, "timeout": s}``, ``{"op": "stop", "seq": n, "timeout": s}``
- child -> parent: ``{"event": "ready"}`` (the store is open), ``{"event": "beat", "attempts": n, "acked": n}``
  (every :data:`BEAT_S`), ``{"event": "warning", "message": ...}``, ``{"event": "bound", "run_id": ...}``,
  ``{"event": "flushed" | "stopped", "seq": n, "ok": bool, "acked": int, "degraded": bool, "overloaded": bool,
  "run_id": ...}``

The child is never trusted blindly (DESIGN: training never waits on tracking). A child forked beside a thread that
was using the store can inherit a lock held by that thread (SQLite's process-wide mutex) and hang at its first
connection: it must open the store and say ``ready`` within :data:`FORK_READY_S` (:data:`SPAWN_READY_S` for a fresh
interpreter). A child that stops beating for :data:`STALL_S` (stopped by SIGSTOP, a debugger, a paused container)
or whose writer makes no progress while data waits is declared failed too. A failed child is killed and
:attr:`ProcessWriter.failure` says why; the logger then replaces it with the thread writer, which delivers from the
spool's last acknowledged point. The command pipe is non-blocking: a wake-up that does not fit is dropped (the child
polls anyway), a command that does not fit fails the child; the training thread never waits on it.

The child ignores SIGINT and SIGTERM (a scheduler cancelling a job signals the whole process group): the training
process stops it after the last delivery. If the parent dies (even by SIGKILL), the child sees EOF on stdin,
makes a last delivery attempt of what is on disk, and exits: nothing already spooled waits for a resume.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from lightning_mlflow_cv._delivery import forkguard as _forkguard
from lightning_mlflow_cv._delivery import journal as _journal
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._delivery.writer import Progress, Writer

_EOF_DRAIN_S = 30.0

#: Seconds a forked child has to open the store and say ``ready`` (it takes ~0.05 s; a hang is a lock inherited
#: through ``fork``) ...
FORK_READY_S = 3.0
#: ... and a fresh interpreter (importing MLflow takes 2-3 CPU s).
SPAWN_READY_S = 60.0
#: When the fit waits on a forked child (``flush``, the last delivery) that has not said ``ready`` this long after
#: the fork, it is given up at once instead of at :data:`FORK_READY_S`: a short fit does not wait out the bound.
FORK_WAITED_READY_S = 0.5
#: The child says it is alive this often ...
BEAT_S = 0.5
#: ... and is declared stopped or hung when nothing came from it for this long.
STALL_S = 5.0

#: Start the writer by forking the training process (Linux). Elsewhere a fresh interpreter: macOS's system
#: frameworks are not fork-safe, and Windows has no fork.
FORK = sys.platform.startswith("linux")


def _messages(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a pipe, one a line; a line that is not JSON (a stray print) is skipped."""
    for line in lines:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        yield msg


class ProcessWriter:
    """Parent-side handle with the :class:`~lightning_mlflow_cv._delivery.writer.Writer` interface."""

    def __init__(
        self,
        spool: Spool,
        run_id: str | None,
        tracking_uri: str,
        flush_interval_s: float,
        request_timeout_s: float,
        on_bound: Callable[[str], None] | None = None,
        already_warned: bool = False,
    ) -> None:
        self.spool = spool
        spool.shared = True  # the child compacts the file: appends lock it
        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self.request_timeout_s = request_timeout_s
        self._flush_interval_s = flush_interval_s
        self.degraded = already_warned
        self.overloaded = False
        self._on_bound = on_bound
        self._cfg = {
            "dir": str(spool.directory),
            "key": spool.key,
            "uri": tracking_uri,
            "run_id": run_id,
            "flush_interval_s": flush_interval_s,
            "request_timeout_s": request_timeout_s,
            "already_warned": already_warned,
            "compact_bytes": _journal.COMPACT_BYTES,
        }
        self._proc: subprocess.Popen[str] | _Forked | None = None
        self._cv = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._seq = 0
        self._dead = False
        self._send_lock = threading.Lock()
        self._alive = False
        self._next_poll = 0.0
        self._fd = -1  # the command pipe's (non-blocking) write end
        self._failure: str | None = None
        self._stopping = False
        self._ready = False
        self._ready_bound = FORK_READY_S
        self._started = self._last_beat = self._last_progress = time.monotonic()
        self._attempts = -1
        self._acked = -1

    @property
    def failure(self) -> str | None:
        """Why the child was given up (``None`` while it works or after a clean stop): the logger replaces it."""
        if self._failure is None and not self._stopping and self._proc is not None and self._proc.poll() is not None:
            return f"exited unexpectedly (exit status {self._proc.returncode})"
        return self._failure

    def start(self) -> None:
        self._started = self._last_beat = self._last_progress = time.monotonic()
        self._proc = _fork(self._cfg) if FORK else None
        if self._proc is None:
            self._ready_bound = SPAWN_READY_S  # not Linux, or the fork failed (out of memory or processes)
            pkg_parent = str(Path(__file__).resolve().parents[1])
            env = os.environ.copy()
            env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from lightning_mlflow_cv._delivery.writer_proc import main; main()",
                    json.dumps(self._cfg),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
                env=env,
            )
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)  # the training thread never waits on a child that stopped reading
        threading.Thread(target=self._read, name="MLflowCVLogger-writer-reader", daemon=True).start()
        threading.Thread(target=self._watch, name="MLflowCVLogger-writer-watchdog", daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for msg in _messages(self._proc.stdout):
            ev = msg.get("event")
            if ev == "beat":
                now = time.monotonic()
                self._last_beat = now
                if msg["attempts"] != self._attempts or msg["acked"] != self._acked:
                    self._attempts, self._acked, self._last_progress = msg["attempts"], msg["acked"], now
            elif ev == "unfit":
                self._fail(msg["reason"])
            elif ev == "ready":
                self._ready = True
                self._last_beat = self._last_progress = time.monotonic()
            elif ev == "warning":
                self.degraded = True
                warnings.warn(msg["message"], RuntimeWarning, stacklevel=1)
            elif ev == "recovered":
                self.degraded = False
            elif ev == "bound":
                self._run_id = msg["run_id"]
                if self._on_bound is not None:
                    self._on_bound(msg["run_id"])
            elif ev in ("flushed", "stopped"):
                with self._cv:
                    self.degraded = bool(msg.get("degraded"))
                    self.overloaded = bool(msg.get("overloaded"))
                    self._replies[msg["seq"]] = msg
                    self._cv.notify_all()
        with self._cv:
            self._dead = True
            self._cv.notify_all()

    def _watch(self) -> None:
        """Give the child up when it did not open the store in time, stopped beating, or stopped making progress
        while data waits (see the module docstring)."""
        progress_s = 2 * self.request_timeout_s + self._flush_interval_s + STALL_S
        while not self._dead and not self._stopping:
            time.sleep(0.1)
            now = time.monotonic()
            if not self._ready:
                if now - self._started > self._ready_bound:
                    self._fail(
                        f"did not open the tracking store within {self._ready_bound:.0f} s of starting (a process "
                        "forked beside a thread that was using the store can inherit that thread's lock)"
                    )
            elif now - self._last_beat > STALL_S:
                self._fail(
                    f"stopped responding for {now - self._last_beat:.1f} s (stopped by SIGSTOP, a debugger or a "
                    "paused container, or hung)"
                )
            elif now - self._last_progress > progress_s and self.spool.pending > 0:
                self._fail(f"made no delivery progress for {now - self._last_progress:.0f} s while data waited")

    def _fail(self, reason: str) -> None:
        """Give the child up: kill it (a stopped or hung one too) and let waiters go."""
        with self._cv:
            if self._failure is not None or self._stopping:
                return
            self._failure = reason
            self._dead = True
            self._cv.notify_all()
        if self._proc is not None:
            self._proc.kill()

    def _send(self, op: str, **kw: Any) -> int | None:
        self.spool.commit()  # metric records queued in memory reach the file before the child is told to read it
        with self._send_lock:
            if self._dead:
                return None
            self._seq += 1
            seq = self._seq
            data = (json.dumps({"op": op, "seq": seq, **kw}) + "\n").encode("utf-8")
            try:
                os.write(self._fd, data)  # < PIPE_BUF bytes: all or nothing
            except BlockingIOError:
                if op == "wake":
                    return None  # the child polls the spool anyway
            except (OSError, ValueError):
                return None
            else:
                return seq
        # a command that must arrive does not fit: the child stopped reading (failing it takes the send lock)
        self._fail("stopped reading its command pipe (the pipe is full)")
        return None

    def _wait(self, seq: int | None, timeout: float) -> dict[str, Any] | None:
        """The child's reply to ``seq``; ``None`` when it died, or when nothing was delivered for ``timeout``
        seconds (plus a request's time for the reply). Shows progress on the terminal while it takes long."""
        if seq is None:
            return None
        idle = timeout + self.request_timeout_s + 5
        since = time.monotonic()
        progress = Progress(self.spool, self.tracking_uri)
        with self._cv:
            while seq not in self._replies and not self._dead:
                now = time.monotonic()
                if not self._ready and self._ready_bound == FORK_READY_S and now - self._started > FORK_WAITED_READY_S:
                    self._fail(
                        f"did not open the tracking store within {now - self._started:.1f} s of starting, when the "
                        "fit waited for it (a process forked beside a thread that was using the store can inherit "
                        "that thread's lock)"
                    )
                    return None
                if now - max(since, self._last_progress) > idle:
                    return None
                self._cv.wait(0.25)
                self.spool.refresh_ack()
                progress.update()
            return self._replies.pop(seq, None)

    def wake(self) -> None:
        self._send("wake")

    def flush(self, timeout: float) -> bool:
        reply = self._wait(self._send("flush", timeout=timeout), timeout + self.request_timeout_s + 5)
        return bool(reply and reply["ok"])

    def stop(self, timeout: float) -> bool:
        reply = self._wait(self._send("stop", timeout=timeout), timeout)
        self._stopping = True
        if self._proc is not None:
            try:
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                self._proc.wait(timeout=0 if self._failure or reply is None else self.request_timeout_s + 5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self.spool.refresh_ack()
        if reply and reply.get("run_id"):
            self._run_id = reply["run_id"]
        return bool(reply and reply["ok"])

    def detach(self) -> None:
        """Tell the child to deliver what is on disk and exit, without waiting (used when the spool moved
        to memory, where a thread writer takes over)."""
        self._send("stop", timeout=_EOF_DRAIN_S)
        self._stopping = True
        try:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self._reap, name="MLflowCVLogger-writer-reaper", daemon=True).start()

    def _reap(self) -> None:
        """Wait for a detached child's exit, so that it does not stay a zombie until the training process ends."""
        try:
            if self._proc is not None:
                self._proc.wait(timeout=_EOF_DRAIN_S + self.request_timeout_s + 10)
        except (OSError, subprocess.TimeoutExpired):
            pass

    is_process = True

    def is_alive(self) -> bool:
        """Whether the child runs. Called on every logging step: it asks the OS at most every 0.5 s
        (a ``waitpid`` per step would be most of what logging costs the training thread)."""
        if self._proc is None:
            return False
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + 0.5
            self._alive = self._proc.poll() is None
        return self._alive and not self._dead

    @property
    def run_id(self) -> str | None:
        return self._run_id


class _Forked:
    """The part of :class:`subprocess.Popen` that :class:`ProcessWriter` uses, for a child made by ``os.fork``."""

    def __init__(self, pid: int, stdin: TextIO, stdout: TextIO) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else's waitpid(-1)
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline, pause = time.monotonic() + timeout, 0.001
        while (code := self.poll()) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("MLflowCVLogger writer", timeout)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(5.0)
            except (OSError, subprocess.TimeoutExpired):
                pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _fork(cfg: dict[str, Any]) -> _Forked | None:
    """Fork the writer from this process: it inherits the imported MLflow client and the store MLflow already
    opened for the run, so it starts without the ~2-3 CPU s a fresh interpreter spends importing MLflow and
    checking the store's schema. ``None`` when the fork fails (the caller starts a fresh interpreter instead)."""
    down_r, down_w = os.pipe()  # parent -> child
    up_r, up_w = os.pipe()  # child -> parent
    _flush_std()  # or text buffered here would be written twice, once by the child
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns on any fork of a process with threads; the child runs only MLflow's client code
            # and this module, with connections of its own (see _own_client), as DataLoader workers do
            warnings.simplefilter("ignore", DeprecationWarning)
            with _forkguard.quiet():  # none of the package's own threads is inside a store call
                pid = os.fork()
    except OSError:
        for fd in (down_r, down_w, up_r, up_w):
            os.close(fd)
        return None
    if pid == 0:  # the child: never returns into the parent's stack (its frames, atexit handlers, finalisers)
        code = 1
        try:
            os.close(down_w)
            os.close(up_r)
            _after_fork_in_child()
            _serve(cfg, os.fdopen(down_r, "r"), os.fdopen(up_w, "w", buffering=1))
            code = 0
        except BaseException:  # noqa: BLE001 - reported, then the child exits whatever happened
            traceback.print_exc()
        finally:
            _flush_std()
            os._exit(code)
    os.close(down_r)
    os.close(up_w)
    return _Forked(pid, os.fdopen(down_w, "w", buffering=1), os.fdopen(up_r, "r"))


#: SQL connection pools the parent had open when this writer was forked: kept referenced, never used or closed here
#: (closing a PostgreSQL connection tells the server to end the session the parent still uses).
_PARENT_POOLS: list[Any] = []
_OWN_POOL_IDS: set[int] = set()


#: Devices whose descriptors the forked child closes: a training process's GPU (NVIDIA, AMD, DRM render nodes,
#: Habana/other accelerators). Held open by the child, they would keep the device's memory allocated after the
#: training process died, until the writer finished its last delivery.
DEVICE_PREFIXES = ("/dev/nvidia", "/dev/kfd", "/dev/dri/", "/dev/accel", "/dev/hl")

#: The inherited clients' connection pools are replaced at the first client the child builds (see _own_client).
_forked = False


def _after_fork_in_child() -> None:
    """Make the forked child independent of the parent's state (the store's connections: see _own_client)."""
    global _forked
    _forked = True
    gc.freeze()  # the parent's objects are never collected (or their finalisers run) here
    try:
        # Ctrl+C and a scheduler's SIGTERM to the process group are the parent's: it then stops us after delivery
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            if callable(signal.getsignal(sig)):  # e.g. Lightning's SLURM handlers, meant for the training process
                signal.signal(sig, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    _close_devices()
    s3 = sys.modules.get("mlflow.store.artifact.s3_artifact_repo")  # boto3 clients cached by time, not by process
    clear = getattr(getattr(s3, "_cached_get_s3_client", None), "cache_clear", None)
    if clear is not None:
        clear()


def _close_devices() -> None:
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in fds:
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(DEVICE_PREFIXES):
                os.close(fd)
        except OSError:
            pass


def _own_client(uri: str) -> Any:
    """The Writer's client. In a forked child, the store MLflow cached in the parent (inherited here) first gets
    connections of its own: an SQL store's engine a new pool (the parent's stays referenced, never used or closed
    here); HTTP needs nothing, as MLflow keys its request sessions by process id (2.4 onwards). Built by the
    Writer, so a store that cannot be reached is handled (and retried) as in any writer."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if _forked:
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        engine = getattr(store, "engine", None)
        pool = getattr(engine, "pool", None)
        if pool is not None and hasattr(pool, "recreate") and id(pool) not in _OWN_POOL_IDS:
            _PARENT_POOLS.append(pool)
            fresh = pool.recreate()
            _OWN_POOL_IDS.add(id(fresh))  # the child's own from now on: not replaced again on the next client
            engine.pool = fresh  # type: ignore[union-attr]
    return client


class _Unfit(Exception):
    """This process cannot write to the store (a lock inherited through fork that nothing here will release)."""


#: How long the SQLite probe waits for another process's write lock to go before it calls the child unfit.
PROBE_BUSY_MS = 2000


def _prove_store(uri: str) -> None:
    """Prove that this (forked) process can open and write an SQLite store, before the parent relies on it.

    It opens the store's file with SQLite directly (a child forked while another thread was opening a connection
    inherits SQLite's process-wide mutex held, and hangs here: the parent then gives it up) and takes the write
    lock once (``BEGIN EXCLUSIVE``, then ``ROLLBACK``): SQLite tracks the locks of a process's connections in
    process memory, and a child forked while another thread's connection held one inherits it, held by a
    connection that no longer exists there, so every write would wait for it forever ("database is locked"). Such a
    child raises :class:`_Unfit`; a lock another process holds goes within :data:`PROBE_BUSY_MS`. A store that
    cannot be opened at all (missing, unreachable) is not the fork's doing: the writer reports and retries it. Other
    stores have no such process-wide state: their connections are the child's own (see :func:`_own_client`).
    """
    if not uri.startswith("sqlite:"):
        return
    import sqlite3

    from sqlalchemy.engine import make_url

    path = make_url(uri).database
    if not path or path == ":memory:":
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=PROBE_BUSY_MS / 1000, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise _Unfit(
                f"could not take the SQLite store's write lock within {PROBE_BUSY_MS / 1000:g} s ({err}; a process "
                "forked beside a thread that was using the store inherits that thread's locks)"
            ) from err
    finally:
        conn.close()


def main() -> None:
    """Child entry point of a fresh interpreter (where the writer is not forked): deliver the spool until told to
    stop (or until the parent goes away)."""
    try:  # Ctrl+C and a scheduler's SIGTERM to the process group are the parent's: it stops us after delivery
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError):
        pass
    _serve(json.loads(sys.argv[1]), sys.stdin, sys.stdout)


def _serve(cfg: dict[str, Any], inp: TextIO, out: TextIO) -> None:
    """Deliver the spool until told to stop on ``inp`` (or until it closes: the parent went away)."""
    out_lock = threading.Lock()

    def emit(**msg: Any) -> None:
        with out_lock:
            try:
                out.write(json.dumps(msg) + "\n")
                out.flush()
            except (OSError, ValueError):  # the parent is gone; keep delivering anyway
                pass

    uri = cfg["uri"]
    _journal.COMPACT_BYTES = int(cfg.get("compact_bytes", _journal.COMPACT_BYTES))
    spool = Spool(cfg["dir"], cfg["key"])
    spool.shared = True  # the parent appends to the same file
    try:  # prove the store opens here (a lock inherited through fork hangs this): the parent waits for "ready"
        _prove_store(uri)
    except _Unfit as err:
        emit(event="unfit", reason=str(err))
        return
    emit(event="ready")
    writer = Writer(
        lambda: _own_client(uri),
        spool,
        cfg["run_id"],
        uri,
        flush_interval_s=cfg["flush_interval_s"],
        request_timeout_s=cfg["request_timeout_s"],
        on_bound=lambda rid: emit(event="bound", run_id=rid),
        already_warned=cfg["already_warned"],
        on_warning=lambda message: emit(event="warning", message=message),
        on_recovered=lambda: emit(event="recovered"),
    )
    writer.report_progress = False  # the parent shows it
    writer.start()

    def beat() -> None:
        while True:
            time.sleep(BEAT_S)
            emit(event="beat", attempts=writer.attempts, acked=spool.acked)

    threading.Thread(target=beat, name="MLflowCVLogger-writer-beat", daemon=True).start()

    def reply(event: str, seq: int, ok: bool) -> None:
        emit(
            event=event,
            seq=seq,
            ok=ok,
            acked=spool.acked,
            degraded=writer.degraded,
            overloaded=writer.overloaded,
            run_id=writer.run_id,
        )

    for cmd in _messages(inp):
        op = cmd.get("op")
        if op == "wake":
            writer.wake()
        elif op == "flush":
            reply("flushed", cmd["seq"], writer.flush(float(cmd["timeout"])))
        elif op == "stop":
            reply("stopped", cmd["seq"], writer.stop(float(cmd["timeout"])))
            spool.close()
            # Everything is delivered and acknowledged, and the parent waits for this exit at the end of its fit:
            # skip the interpreter's teardown (MLflow's exit handlers took ~0.4 s here, on the fit's critical path).
            out.flush()
            _flush_std()
            os._exit(0)
    # the parent went away without stopping us (crash, SIGKILL): deliver what is on disk, then exit
    writer.stop(_EOF_DRAIN_S)
    spool.close()
