"""2-process CPU DDP (gloo) fit with CVMetricsCallback, run by tests/callbacks/test_cv_metrics.py.

Usage: python ddp_cv_metrics.py TRACKING_URI OUT_DIR. Lightning's DDP launcher re-executes this script for
rank 1. Rank 0 writes OUT_DIR/rank0.json (run id, world size) and OUT_DIR/model.pt (the final weights).
The validation set has 400 samples, so the DistributedSampler splits it evenly with no padding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_mlflow_cv.demo import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    images, labels = load_digits_tensors()
    x = (images.float() / 255.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    return x, labels


def val_dataset() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[:400], y[:400])


def train_dataset() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[400:], y[400:])


def build_model():
    from lightning_mlflow_cv.demo import DigitsClassifier

    torch.manual_seed(0)
    return DigitsClassifier(width=4)


def main() -> None:
    import lightning.pytorch as pl

    from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
    from lightning_mlflow_cv.logger import MLflowCVLogger

    tracking_uri, out = sys.argv[1], Path(sys.argv[2])
    logger = MLflowCVLogger(experiment_name="ddp-cv", tracking_uri=tracking_uri)
    model = build_model()
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=4, num_sanity_val_steps=0,
        logger=logger, callbacks=[CVMetricsCallback("classification", 10, curve_thresholds=50)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(
        model,
        train_dataloaders=DataLoader(train_dataset(), batch_size=64, shuffle=True),
        val_dataloaders=DataLoader(val_dataset(), batch_size=64),  # 200 per rank: 4 batches of 64 and one of 8
    )
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out / "model.pt")
        (out / "rank0.json").write_text(json.dumps({"run_id": logger.run_id, "world": trainer.world_size}))


if __name__ == "__main__":
    main()
