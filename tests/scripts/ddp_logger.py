"""2-process CPU DDP (gloo) fit with MLflowCVLogger; each rank writes what it saw to OUT/rank<N>.json.

Usage: ddp_logger.py URI OUT [renamed]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from tiny import TinyModel, loaders  # noqa: E402

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        logger = trainer.logger
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"run_id": logger.run_id, "rank": trainer.global_rank, "world": trainer.world_size})
        )


def main() -> None:
    uri, out = sys.argv[1], Path(sys.argv[2])
    if sys.argv[3:] == ["renamed"]:  # as if Lightning renamed the frames the logger's fallback looks for
        from lightning_mlflow_cv._facts import trainer_frames as _trainer_frames

        _trainer_frames.SETUP_FRAME, _trainer_frames.RUN_FRAME = "_renamed_setup_hook", "_renamed_run"
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="ddp", tags={"task": "classification"})
    train, val = loaders()
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=logger, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, callbacks=[Record(out)],
    )
    trainer.fit(TinyModel(), train, val)


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main()
