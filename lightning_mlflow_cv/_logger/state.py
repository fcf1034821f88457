"""What the logger's parts read and write on the logger, and what they use of its writer (for type checkers).

The parts are mixins of :class:`~lightning_mlflow_cv.logger.MLflowCVLogger`: :mod:`.resume`, :mod:`.run_start` and
:mod:`.writers`. To a type checker they are ``MLFlowLogger`` subclasses that hold the logger's own attributes;
at run time :class:`LoggerState` is a plain ``object``, so the mixins add methods and nothing else.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.utilities.rank_zero import rank_zero_only

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger as _Base

    from lightning_mlflow_cv._delivery.journal import Spool
else:
    _Base = object


def rank() -> int:
    """This process's global rank, read when called (Lightning's strategies update it at setup)."""
    # `rank` is an attribute Lightning sets on the function object at import, unknown to its type
    return rank_zero_only.rank  # type: ignore[attr-defined]


class WriterLike(Protocol):
    """What the logger uses of its writer: a :class:`~lightning_mlflow_cv._delivery.writer.Writer` thread or a
    :class:`~lightning_mlflow_cv._delivery.writer_proc.ProcessWriter` (which adds ``failure``, ``is_process`` and
    ``detach``, read through ``getattr`` or after checking ``is_process``)."""

    degraded: bool
    overloaded: bool

    @property
    def run_id(self) -> str | None: ...

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def wake(self) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def stop(self, timeout: float) -> bool: ...


class LoggerState(_Base):
    """The logger's attributes and methods that its parts use (declared for type checkers only)."""

    if TYPE_CHECKING:
        _explicit_run_id: bool
        _broadcast_done: bool
        _root_dir: str
        _context_tags: dict[str, str]
        _parent_run_id: str | None
        _parent_experiment_id: str | None
        _flush_interval_s: float
        _request_timeout_s: float
        _finalize_timeout_s: float
        _writer_mode: str
        writer_choice: str | None
        _spool_dir: str | None
        _spool: Spool | None
        _spool_key: str | None
        _writer: WriterLike | None
        _process_failure: str | None
        _writer_lock: threading.Lock
        _params: dict[str, str]
        last_spool_path: Path | None
        offline: bool
        resumed: bool

        def _warn_once(self, key: str, msg: str, category: type[Warning] = UserWarning) -> None: ...

        def _warn_if_autolog(self) -> None: ...

        def _share_run_id(self, trainer: Any) -> None: ...

        def _check_resumed_run(self, ckpt_run_id: str | None) -> None: ...

        def _open_spool(self, key: str, header: dict[str, Any]) -> None: ...

        def _ensure_writer(self, thread: bool = False) -> WriterLike: ...

        def _give_up_process_writer(self) -> None: ...

        def _follow_spool_to_memory(self) -> None: ...
