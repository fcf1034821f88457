"""`first`: fit, SIGKILL itself in epoch 2 with points still in the spool. `resume`: continue from last.ckpt."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from tiny import TinyModel, loaders, trainer  # noqa: E402

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402

uri, spool_dir, ckpt_dir, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
if mode == "first":
    # No time bound on the journal's group commit: metric records reach the file only when something else does
    # (the checkpoint), so the kill deterministically loses the steps after the last checkpoint, and the steps
    # before it must be in the spool.
    from lightning_mlflow_cv._delivery import journal as _journal  # noqa: E402

    _journal.COMMIT_MS = 10**9


class KillAt(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 28:  # epoch 2 of 3 (16 steps each), after the epoch-1 checkpoint
            Path("run_id.txt").write_text(trainer.logger.run_id)
            os.kill(os.getpid(), signal.SIGKILL)


class Record(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        Path("run_id.txt").write_text(trainer.logger.run_id)


# a long flush interval keeps the last steps undelivered in the spool when the process dies
logger = MLflowCVLogger(tracking_uri=uri, experiment_name="sigkill", spool_dir=spool_dir, flush_interval_s=3600 if mode == "first" else 0.5)
train, val = loaders()
cbs = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)]
cbs.append(KillAt() if mode == "first" else Record())
tr = trainer(logger, max_epochs=3, callbacks=cbs, enable_checkpointing=True)
tr.fit(TinyModel(), train, val, ckpt_path=None if mode == "first" else str(ckpt_dir / "last.ckpt"))
