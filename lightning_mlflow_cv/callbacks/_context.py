"""Where the callbacks meet the logger: :func:`find_mlflow_logger`.

(How the logger finds its Trainer is in ``_trainer_frames``; this module imports the logger, never the reverse.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_mlflow_cv.logger import MLflowCVLogger


def find_mlflow_logger(trainer: pl.Trainer, who: str) -> MLflowCVLogger:
    """The :class:`MLflowCVLogger` among ``trainer.loggers``.

    Raises:
        RuntimeError: when there is none, naming the callback and the fix.
    """
    from lightning_mlflow_cv.logger import MLflowCVLogger

    for lg in trainer.loggers:
        if isinstance(lg, MLflowCVLogger):
            return lg
    found = [type(lg).__name__ for lg in trainer.loggers] or "none"
    raise RuntimeError(
        f"{who} needs an MLflowCVLogger among the Trainer's loggers, found: {found}. "
        "Fix: Trainer(logger=MLflowCVLogger(...)) (or add it to a list of loggers), or in LightningCLI YAML: "
        "trainer.logger.class_path: lightning_mlflow_cv.MLflowCVLogger"
    )
