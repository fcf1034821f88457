"""Resume handling: the run id a checkpoint carries, the internal callback that shares it with every rank and
stores it in every checkpoint, and the logger's side of both (a mixin of
:class:`~lightning_mlflow_cv.logger.MLflowCVLogger`)."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._logger.state import LoggerState, rank

if TYPE_CHECKING:
    import lightning.pytorch as pl


#: ``state_key`` under which the run id travels inside Lightning checkpoints.
CHECKPOINT_KEY = "MLflowCVLogger"


def run_id_from_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """The MLflow run id stored in a Lightning checkpoint by :class:`~lightning_mlflow_cv.logger.MLflowCVLogger`, or ``None``.

    Reads with ``weights_only=True`` (no arbitrary unpickling) and, where torch has it, ``mmap`` (no full load).
    Warns when the checkpoint cannot be read.
    """
    run_id, unread = read_run_id(path)
    if unread is not None:
        warnings.warn(
            f"MLflowCVLogger: could not read the MLflow run id from checkpoint {path} ({unread}); a new run is "
            "started. Pass `run_id=` to continue a specific run.",
            RuntimeWarning,
            stacklevel=2,
        )
    return run_id


def read_run_id(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """``(run id or None, None)``, or ``(None, why the checkpoint could not be read)``."""
    from lightning_mlflow_cv._compat import frameworks as _compat_frameworks

    try:
        ckpt = _compat_frameworks.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint just means "start a new run"
        return None, f"{type(err).__name__}: {err}"
    state = (ckpt.get("callbacks") or {}).get(CHECKPOINT_KEY) or {}
    return state.get("run_id"), None


class RunIdInCheckpoint(Callback):
    """Internal: shares rank 0's run id with every rank (``setup``) and stores it in every checkpoint, so a resumed
    fit continues the same run (added to ``trainer.callbacks`` when Lightning first touches the logger)."""

    def __init__(self, logger: LoggerState) -> None:
        self._logger = logger  # a plain reference: a Trainer that holds this callback must stay picklable

    @property
    @override
    def state_key(self) -> str:
        return CHECKPOINT_KEY

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._logger._share_run_id(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Metric records wait up to 100 ms in memory (the journal's group commit); put them on disk before the
        # checkpoint exists, so a fit killed later and resumed from it loses no point logged before it.
        spool = self._logger._spool
        if spool is not None:
            spool.commit()

    @override
    def state_dict(self) -> dict[str, Any]:
        try:
            return {"run_id": self._logger._run_id, "experiment_id": self._logger._experiment_id}
        except ReferenceError:
            return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logger._check_resumed_run(state_dict.get("run_id"))


class ResumeMixin(LoggerState):
    """The logger's side of resuming: rank 0's run id shared with every rank, a restored checkpoint's run checked."""

    def _share_run_id(self, trainer: pl.Trainer) -> None:
        """Give every rank rank 0's run id (called on every rank by the internal callback's ``setup``)."""
        if trainer.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self._run_id, self._experiment_id = trainer.strategy.broadcast(
                    (self._run_id, self._experiment_id), src=0
                )
        self._broadcast_done = True

    #: Why the checkpoint of a resumed fit could not be read when the run was chosen (``None``: it was, or none).
    _ckpt_unread: str | None = None

    def _check_resumed_run(self, ckpt_run_id: str | None) -> None:
        """Lightning restored a checkpoint written under run ``ckpt_run_id``: warn when this fit logs elsewhere
        without being told to (the frame fallback missed the checkpoint, or could not read it)."""
        if rank() != 0 or not ckpt_run_id or self._explicit_run_id or self.resumed:
            return
        if ckpt_run_id != self._run_id:
            why = (
                "the checkpoint was not known when the run was chosen"
                if self._ckpt_unread is None
                else f"its run id could not be read when the run was chosen ({self._ckpt_unread})"
            )
            self._warn_once(
                "resume-missed",
                f"MLflowCVLogger: this fit restored a checkpoint of MLflow run {ckpt_run_id}, but logs into the new "
                f"run {self._run_id}: {why}. Fix: `MLflowCVLogger(resume_from=<the checkpoint>)` (or "
                f"`run_id={ckpt_run_id!r}`) continues the checkpoint's run.",
                RuntimeWarning,
            )

    def _attach(self, trainer: pl.Trainer) -> None:
        self._root_dir = os.fspath(trainer.default_root_dir)
        # Trainer.callbacks is set by Lightning's CallbackConnector and not declared on the class
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, RunIdInCheckpoint) for cb in callbacks):
            # first: its `setup` shares the run id before other callbacks' `setup` may read it on any rank
            callbacks.insert(0, RunIdInCheckpoint(self))
