"""Ownership locks of a spool file: ``flock`` on ``<key>.lock`` beside it.

- every process that has a spool open (the logger, its writer process, ``sync``) holds a *shared* lock on it for
  as long as it is open (:func:`hold`); the kernel drops it when the process dies, even by SIGKILL;
- auto-delivery (:mod:`lightning_mlflow_cv._delivery.autosync`) takes an *exclusive* lock without waiting
  (:func:`claim`), so a spool still open in a live process, or being delivered by another process, is left alone.

The journal takes its locks here; this module imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

#: How long a process opening a spool waits for another process that is delivering it.
HOLD_WAIT_S = 30.0


def lock_path(directory: str | os.PathLike[str], key: str) -> Path:
    return Path(directory) / f"{key}.lock"


def _try_lock(path: Path, mode: int) -> IO[bytes] | None:
    """Open ``path`` and ``flock`` it without waiting; None when another process holds a conflicting lock.

    Raises OSError when the lock file cannot be opened (read-only or missing directory). Rechecks that the locked file is still the one at ``path`` (it may have been unlinked by a process that
    removed a delivered spool meanwhile), so two processes never both believe they own the spool.
    """
    for _ in range(5):
        fh = open(path, "ab")  # noqa: SIM115 - held for the lock's lifetime; OSError: the caller decides
        try:
            fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            return fh
        fh.close()
    return None


def hold(directory: str | os.PathLike[str], key: str, wait_s: float = HOLD_WAIT_S) -> IO[bytes] | None:
    """Shared lock that marks a spool as open in a live process (released by :func:`release` or process exit).

    Waits up to ``wait_s`` while another process is auto-delivering the spool (it then sees the delivered
    state); past that it goes on without the lock, which is only a risk of sending a point twice.
    """
    path = lock_path(directory, key)
    deadline = time.monotonic() + wait_s
    noted = False
    while True:
        try:
            fh = _try_lock(path, fcntl.LOCK_SH)
        except OSError:
            return None  # an unwritable spool directory: the spool falls back to memory anyway
        if fh is not None or time.monotonic() >= deadline:
            return fh
        if not noted:
            noted = True
            log.warning(
                "MLflowCVLogger: waiting for another process that is delivering the spool %s",
                path.with_suffix(".jsonl"),
            )
        time.sleep(0.2)


def release(fh: IO[bytes] | None, unlink: str | os.PathLike[str] | None = None) -> None:
    """Drop a lock from :func:`hold` or :func:`claim`; ``unlink`` removes the lock file first (spool removed)."""
    if fh is None:
        return
    if unlink is not None:
        with contextlib.suppress(OSError):
            os.unlink(unlink)
    with contextlib.suppress(OSError):
        fh.close()


@contextlib.contextmanager
def claim(directory: str | os.PathLike[str], key: str) -> Iterator[IO[bytes] | None]:
    """Exclusive lock for delivering a spool nobody has open; yields None (and holds nothing) when busy."""
    try:
        fh = _try_lock(lock_path(directory, key), fcntl.LOCK_EX)
    except OSError:
        fh = None
    try:
        yield fh
    finally:
        release(fh)
