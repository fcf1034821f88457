"""2-process CPU `ddp_spawn` fit with MLflowCVLogger (the logger is pickled to both workers).

Usage: ddp_spawn_logger.py TRACKING_URI OUT [before|after]. ``after``: read ``logger.run_id`` before ``fit``, so the
logger is pickled after use (run created, spool and writer running). Each rank writes OUT/rank<N>.json; the main
process writes OUT/main.json.
"""

import json
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
    uri, out, when = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="ddp_spawn", tags={"task": "classification"})
    before = logger.run_id if when == "after" else None
    train, val = loaders()
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=2, logger=logger, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, callbacks=[Record(out)],
    )
    trainer.fit(TinyModel(), train, val)
    (out / "main.json").write_text(json.dumps({"run_id_before_fit": before}))


if __name__ == "__main__":
    main()
