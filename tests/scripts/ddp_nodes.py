"""The full callback set with ``Trainer(num_nodes=2, devices=1, strategy="ddp")``: one process per "node".

Launched twice on one machine, either by two ``torchrun --nnodes 2 --node-rank R --nproc-per-node 1`` agents
sharing a c10d rendezvous (Lightning's TorchElasticEnvironment) or directly with SLURM variables set
(Lightning's SLURMEnvironment). Usage: python ddp_nodes.py TRACKING_URI OUT_DIR. Each rank writes
OUT_DIR/rank<R>.json; rank 0 also writes OUT_DIR/model.pt (final weights).
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_all import callbacks  # noqa: E402

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule  # noqa: E402


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        env = type(trainer.strategy.cluster_environment).__name__
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "run_id": trainer.logger.run_id,
                    "world": trainer.world_size,
                    "node_rank": trainer.node_rank,
                    "num_nodes": trainer.num_nodes,
                    "environment": env,
                }
            )
        )
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.out / "model.pt")


def main() -> None:
    uri, out = sys.argv[1], Path(sys.argv[2])
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="ddp-nodes", tags={"task": "classification"})
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", num_nodes=2, devices=1, max_epochs=2, logger=logger, log_every_n_steps=5,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / "root"),
        limit_train_batches=6, callbacks=[*callbacks(), Record(out)],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main()
