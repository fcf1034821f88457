"""Never fork while one of our own threads is inside a store call.

A child process forked while another thread holds a lock inherits that lock held, by a thread that does not exist
in the child: SQLite's process-wide mutex (taken while a connection opens) is one, and a forked writer then hangs
at its first connection. The package's own threads that talk to MLflow (the thread writer, background delivery of
older spools, their request pools) enter :func:`store_call` around each call; :func:`quiet` waits, for a bounded
time, until none is inside one and holds new ones back while the caller forks. Threads the user runs are outside
this guard: the forked writer proves it can open the store before it is relied on
(:mod:`lightning_mlflow_cv._delivery.writer_proc`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

_cond = threading.Condition()
_inside = 0
_forking = False


@contextlib.contextmanager
def store_call() -> Iterator[None]:
    """Mark a call into MLflow's client; waits while a fork is under way (milliseconds).

    Example::

        >>> with store_call():
        ...     pass
    """
    global _inside
    with _cond:
        while _forking:
            _cond.wait(0.1)
        _inside += 1
    try:
        yield
    finally:
        with _cond:
            _inside -= 1
            _cond.notify_all()


@contextlib.contextmanager
def quiet(timeout_s: float = 2.0) -> Iterator[bool]:
    """Hold new store calls back and wait up to ``timeout_s`` for those under way; yields whether all ended.

    Example::

        >>> with quiet(0.1) as idle:
        ...     idle
        True
    """
    global _forking
    deadline = time.monotonic() + timeout_s
    with _cond:
        _forking = True
        while _inside and time.monotonic() < deadline:
            _cond.wait(max(min(deadline - time.monotonic(), 0.05), 0.0))
        idle = _inside == 0
    try:
        yield idle
    finally:
        with _cond:
            _forking = False
            _cond.notify_all()


def _reset_in_child() -> None:
    """The child has none of the parent's threads: nothing is inside a store call there."""
    global _cond, _inside, _forking
    _cond = threading.Condition()
    _inside = 0
    _forking = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
