"""Where the logger meets the Trainer.

Lightning gives a logger no reference to its Trainer, yet two jobs need one: reading the run id from the
checkpoint a fit resumes from (before Lightning restores it), and broadcasting rank 0's run id at a point
every rank reaches. Lightning creates logger experiments inside ``_call_setup_hook(trainer)`` on every rank
(right before its ``pre_setup`` barrier), called from ``Trainer._run(model, ckpt_path)``. We look for those
frames; when Lightning changes this, ``tests/test_logger.py`` (resume, DDP) fails loudly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_mlflow_cv.logger import MLflowCVLogger


@dataclass
class TrainerContext:
    trainer: pl.Trainer | None = None
    ckpt_path: str | None = None
    #: True when called from Lightning's all-rank logger initialisation (safe to run a collective).
    all_ranks: bool = False


def trainer_context(max_depth: int = 30) -> TrainerContext:
    """Find the Trainer (and the ``ckpt_path`` of the running fit) among the calling frames."""
    from lightning.pytorch import Trainer

    ctx = TrainerContext()
    frame: Any = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        code = frame.f_code.co_name
        local = frame.f_locals
        if code == "_call_setup_hook" and isinstance(local.get("trainer"), Trainer):
            ctx.trainer = local["trainer"]
            ctx.all_ranks = True
        elif code == "_run" and isinstance(local.get("self"), Trainer):
            ctx.trainer = ctx.trainer or local["self"]
            ckpt = local.get("ckpt_path")
            ctx.ckpt_path = str(ckpt) if ckpt else None
            break
        frame = frame.f_back
        depth += 1
    return ctx


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
