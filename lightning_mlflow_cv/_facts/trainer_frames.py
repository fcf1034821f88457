"""Fallback: find the Trainer (and the checkpoint a fit resumes from) among the calling frames.

Lightning gives a logger no reference to its Trainer. The logger needs one twice, when Lightning first touches
``logger.experiment``: to add its internal callback (whose public ``setup`` hook then shares rank 0's run id with
every rank, and whose ``state_dict`` puts the run id in each checkpoint), and to read the checkpoint of
``fit(ckpt_path=...)``, which Lightning only publishes as ``trainer.ckpt_path`` after the loggers and the callbacks'
``setup`` ran (``_CheckpointConnector.resume_start``), too late to choose the run a resumed fit continues.

The public ways come first (see ``MLflowCVLogger``): ``resume_from=`` / ``run_id=`` name the run, and
``trainer.ckpt_path`` is read when the user set it before the fit. This module is the fallback for plain
``trainer.fit(model, ckpt_path=...)``: Lightning creates logger experiments inside ``call._call_setup_hook(trainer)``
on every rank, called from ``Trainer._run(model, ckpt_path, ...)``. Checked on Lightning 2.6.6 (the main environment) and
2.2.0 (the floor, ``make test-compat``): the frames are the same.

When Lightning renames them, :func:`trainer_context` still finds a Trainer among the frames of Lightning's trainer
package (so the callback and the DDP broadcast keep working), reports ``missed`` and the logger warns once: a fit
resumed with ``ckpt_path=`` would then start a new run unless ``resume_from=`` says which run to continue.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Lightning versions whose frames were checked (named in the fallback warning).
CHECKED_ON = "2.2.0 and 2.6.6"
#: The function that touches ``logger.experiment`` on every rank (local ``trainer``).
SETUP_FRAME = "_call_setup_hook"
#: The Trainer method that runs it (locals ``self``, ``ckpt_path``: the resolved checkpoint of this fit).
RUN_FRAME = "_run"
_TRAINER_MODULES = ("lightning.pytorch.trainer", "pytorch_lightning.trainer")


@dataclass
class TrainerContext:
    """What the calling frames say about the Trainer that is touching the logger."""

    trainer: pl.Trainer | None = None
    #: The checkpoint the running fit/validate/test restores (``None``: none, or not found).
    ckpt_path: str | None = None
    #: Called from Lightning's trainer package, but not through the frames named above: Lightning changed.
    missed: bool = False


def trainer_context(max_depth: int = 40) -> TrainerContext:
    """Find the Trainer (and the ``ckpt_path`` of the running fit) among the calling frames."""
    from lightning.pytorch import Trainer

    ctx = TrainerContext()
    in_trainer_code = False
    any_trainer: Any = None
    found_setup = found_run = False
    frame: Any = sys._getframe(1)
    depth = 0
    while frame is not None and depth < max_depth:
        code = frame.f_code.co_name
        local = frame.f_locals
        if str(frame.f_globals.get("__name__", "")).startswith(_TRAINER_MODULES):
            in_trainer_code = True
            for name in ("trainer", "self"):
                if any_trainer is None and isinstance(local.get(name), Trainer):
                    any_trainer = local[name]
        if code == SETUP_FRAME and isinstance(local.get("trainer"), Trainer):
            ctx.trainer = local["trainer"]
            found_setup = True
        elif code == RUN_FRAME and isinstance(local.get("self"), Trainer):
            ctx.trainer = ctx.trainer or local["self"]
            ckpt = local.get("ckpt_path")
            ctx.ckpt_path = str(ckpt) if ckpt else None
            found_run = True
            break
        frame = frame.f_back
        depth += 1
    if in_trainer_code and not (found_setup and found_run):
        ctx.missed = True
        ctx.trainer = ctx.trainer or any_trainer
    return ctx
