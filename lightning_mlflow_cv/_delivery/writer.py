"""The writer thread: delivers what the journal holds in the background, and rides out a store outage.

:class:`Writer` wakes when the logger has a full request's worth of new points, when a partial request is due, and
on ``flush`` / ``stop``; it delivers through :class:`~lightning_mlflow_cv._delivery.deliverer.Deliverer` and, while the
store is unreachable, warns once and retries with backoff while the data stays in the journal
(:mod:`lightning_mlflow_cv._delivery.journal`). :mod:`lightning_mlflow_cv._delivery.writer_proc` runs the same thread in a child
process.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from lightning_mlflow_cv._delivery import forkguard as _forkguard
from lightning_mlflow_cv._delivery import http as _http
from lightning_mlflow_cv._delivery.deliverer import (
    Deliverer,
    concurrency_for,
    describe_failure,
    is_overload,
    lower_priority,
)
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._facts.redact import safe_uri

log = logging.getLogger(__name__)

#: Failed attempts in a row after which a flush (and so ``finalize``) stops waiting for a store that was
#: reachable when the flush began; the backoff between them is 0.5 s, then 1 s.
FLUSH_TRIES = 3

#: A flush that takes longer than this shows its progress on the terminal, every :data:`PROGRESS_EVERY_S`.
PROGRESS_AFTER_S = 3.0
PROGRESS_EVERY_S = 5.0


class Progress:
    """Progress of a long flush on stderr: points (estimated from the journal's bytes) and bytes left, and the rate.

    Example::

        >>> import tempfile
        >>> from lightning_mlflow_cv._delivery.journal import Spool
        >>> p = Progress(Spool(tempfile.mkdtemp(), "run"), "sqlite:///mlflow.db")
        >>> p.update()  # silent until PROGRESS_AFTER_S passed
    """

    def __init__(self, spool: Spool, uri: str) -> None:
        self.spool = spool
        self.uri = uri
        self.t0 = time.monotonic()
        self.next = self.t0 + PROGRESS_AFTER_S
        self.left0 = -1

    def update(self) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + PROGRESS_EVERY_S
        left = max(self.spool.pending, 0)
        if self.left0 < 0:
            self.left0, self.t0 = left, now
            rate = ""
        else:
            per_s = (self.left0 - left) / max(now - self.t0, 1e-9)
            rate = f", {per_s / 1e6:.2f} MB/s" + (
                f" (~{per_s * self.spool.points_per_byte:,.0f} points/s)" if per_s else ""
            )
        points = left * self.spool.points_per_byte
        print(
            f"MLflowCVLogger: delivering to {safe_uri(self.uri)}: {left / 1e6:.2f} MB"
            + (f" (~{points:,.0f} points)" if points else "")
            + f" left{rate}",
            file=sys.stderr,
            flush=True,
        )


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
        #: The last failure was the store answering that it is overloaded (not unreachable): flushes wait for it.
        self.overloaded = False
        self._deliverer: Deliverer | None = None
        #: Show a long flush's progress on stderr (the writer process leaves that to the training process).
        self.report_progress = True

    # -- API used by the logger -----------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    @property
    def attempts(self) -> int:
        """Delivery attempts completed so far (the writer process reports it as its sign of progress)."""
        return self._attempts

    def flush(self, timeout: float) -> bool:
        """Ask for an immediate attempt and wait until everything is delivered, as long as delivery makes progress.

        Returns True when the spool is fully delivered. It waits while the store takes data, however long the
        backlog, and gives up when nothing was delivered for ``timeout`` seconds (a store that is reachable but
        stopped taking data, or answers that it is overloaded). It does not wait out an outage: when the store was already unreachable it returns
        after the first failed attempt, and when it fails during this flush (a transient 5xx, a dropped
        connection) after :data:`FLUSH_TRIES` attempts in a row have failed. After :data:`PROGRESS_AFTER_S` it
        shows what is left and the rate on stderr.
        """
        progress = Progress(self.spool, self.tracking_uri)
        with self._idle:
            self._draining += 1
            try:
                start = self._attempts
                tries = 1 if self.degraded else FLUSH_TRIES
                self._next_try = 0.0
                self._wake.set()
                acked, since = self.spool.acked, time.monotonic()
                while self.is_alive():
                    now = time.monotonic()
                    if self.spool.acked != acked:
                        acked, since = self.spool.acked, now
                    elif now - since >= timeout:
                        break
                    if self.spool.pending <= 0 and self._attempts > start:
                        return True
                    if self._attempts > start and self.degraded and not self.overloaded and self._failures >= tries:
                        return False  # unreachable: don't wait out an outage (an overloaded store is waited for)
                    if self.report_progress:
                        progress.update()
                    self._idle.wait(min(0.05, max(timeout - (now - since), 0)))
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
                with _forkguard.store_call():
                    client = self._client_factory()
                self._deliverer = Deliverer(client, self.spool, self._run_id, concurrency_for(self.tracking_uri))
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
            self.overloaded = False
            self._failures = 0
        except Exception as err:  # noqa: BLE001 - any failure is retried, data stays in the spool
            self.last_error = err
            self.overloaded = is_overload(err)
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
