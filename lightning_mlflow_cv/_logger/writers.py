"""Writer management: the logger's writer (a thread or a child process, see
:mod:`lightning_mlflow_cv._delivery.writer_choice`), replaced when it fails, drained at the end (a mixin of
:class:`~lightning_mlflow_cv.logger.MLflowCVLogger`)."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TYPE_CHECKING, cast

from lightning_mlflow_cv._delivery.writer import Writer
from lightning_mlflow_cv._facts import trainer_frames as _trainer_frames
from lightning_mlflow_cv._facts.redact import safe_uri
from lightning_mlflow_cv._facts.runs import register_live
from lightning_mlflow_cv._logger.state import LoggerState, WriterLike

if TYPE_CHECKING:
    from lightning_mlflow_cv._delivery.writer_proc import ProcessWriter

log = logging.getLogger("lightning_mlflow_cv.logger")


class WriterMixin(LoggerState):
    """Start, replace and drain the logger's writer."""

    def _ensure_writer(self, thread: bool = False) -> WriterLike:
        """The running writer, started (or replaced when it is gone) as :meth:`_choose_writer` says; ``thread``
        forces a writer thread in this process (the last delivery after a writer process delivered nothing)."""
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                from mlflow import MlflowClient

                self._give_up_process_writer()
                uri = self._tracking_uri
                bound = self._run_id if not (self._run_id or "").startswith("offline-") else None
                common = {
                    "flush_interval_s": self._flush_interval_s,
                    "request_timeout_s": self._request_timeout_s,
                    "on_bound": self._on_bound,
                    "already_warned": self.offline,
                }
                if not thread and self._choose_writer() == "process" and self._spool.on_disk:  # type: ignore[union-attr]
                    from lightning_mlflow_cv._delivery.writer_proc import ProcessWriter

                    self._writer = ProcessWriter(self._spool, bound, uri, **common)  # type: ignore[arg-type]
                else:
                    self._writer = Writer(lambda: MlflowClient(uri), self._spool, bound, uri, **common)  # type: ignore[arg-type]
                self._writer.start()
                register_live(self)
            return self._writer

    def _give_up_process_writer(self) -> None:
        """A writer process that failed (did not open the store, stopped, hung, died) is replaced by the thread
        writer for the rest of this logger's life, with one warning saying why; nothing is lost, as the thread
        delivers from the spool's last acknowledged point."""
        failure = getattr(self._writer, "failure", None)
        if not failure or self._process_failure:
            return
        self._process_failure = failure
        if self._spool is not None:
            self._spool.adopt()
        self._writer = None
        warnings.warn(
            f"MLflowCVLogger: the writer process {failure}; it was stopped and a writer thread in the training "
            "process delivers from now on, from the last point the store acknowledged (nothing is lost). "
            "To skip the process from the start, pass writer='thread' (or LIGHTNING_MLFLOW_CV_WRITER=thread).",
            RuntimeWarning,
            stacklevel=2,
        )

    def _choose_writer(self) -> str:
        if self._process_failure:
            self.writer_choice = f"thread: the writer process {self._process_failure}"
            return "thread"
        if self._writer_mode in ("process", "thread"):
            self.writer_choice = f"{self._writer_mode}: writer={self._writer_mode!r}"
            return self._writer_mode
        from lightning_mlflow_cv._delivery.writer_choice import choose_writer, machine_from

        kind, why = choose_writer(machine_from(_trainer_frames.trainer_context().trainer))
        self.writer_choice = f"{kind}: {why}"
        log.debug("MLflowCVLogger: writer %s", self.writer_choice)
        return kind

    def _on_bound(self, run_id: str) -> None:
        log.warning("MLflowCVLogger: created run %s for the offline spool %s", run_id, self._spool.path)  # type: ignore[union-attr]
        self._run_id = run_id
        self.offline = False

    def _drain_timeout(self, writer: WriterLike) -> float:
        """How long the last flush waits with nothing delivered: a request's time for an unreachable store (it does
        not wait out an outage), ``finalize_timeout_s`` for one that answers (slow or overloaded)."""
        if writer.degraded and not getattr(writer, "overloaded", False):
            return self._request_timeout_s
        return self._finalize_timeout_s

    def _close_writer(self) -> None:
        self._follow_spool_to_memory()
        writer = self._writer
        if writer is None or self._spool is None:
            return
        delivered = writer.stop(self._drain_timeout(writer))
        if not delivered and getattr(writer, "is_process", False):
            # The writer process is gone (died, given up, or killed with the process group) or delivered nothing
            # for the timeout: the training process tries the rest itself, once, within a request's time when the
            # process was making no progress.
            failed = getattr(writer, "failure", None)
            with self._writer_lock:
                self._give_up_process_writer()
                if self._spool is not None:
                    self._spool.adopt()
                self._writer = None
            writer = self._ensure_writer(thread=True)
            delivered = writer.stop(self._drain_timeout(writer) if failed else self._request_timeout_s)
        self._writer = None
        spool, self._spool = self._spool, None
        if delivered and writer.run_id:
            self._run_id = writer.run_id
            spool.remove()
        else:
            spool.close()
            self.last_spool_path = spool.path
            if writer.degraded and getattr(writer, "overloaded", False):
                why = f"the store answered that it is overloaded and took nothing for {self._finalize_timeout_s:g} s"
            elif writer.degraded:
                why = "the store is unreachable"
            else:
                why = (
                    f"the store is reachable but accepted nothing for {self._finalize_timeout_s:g} s (slow or stalled)"
                )
            msg = (
                f"MLflowCVLogger: {spool.pending} bytes of logged data were not delivered to "
                f"{safe_uri(self._tracking_uri)}: {why}. They are kept in {spool.path}; nothing is lost. "
                f"Finish the job with: lightning-mlflow-cv sync {spool.path}"
            )
            print(msg, file=sys.stderr)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _follow_spool_to_memory(self) -> None:
        if self._spool is not None and not self._spool.on_disk and getattr(self._writer, "is_process", False):
            # the disk failed: the child delivers what reached the disk, a thread takes the in-memory rest
            cast("ProcessWriter", self._writer).detach()
            self._writer = None
            self._ensure_writer()
