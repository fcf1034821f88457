"""2-process CPU DDP (gloo) fit with CVMetricsCallback, run by tests/callbacks/test_cv_metrics.py.

Usage: python ddp_cv_metrics.py TRACKING_URI OUT_DIR. Lightning's DDP launcher re-executes this script for
rank 1. Rank 0 writes OUT_DIR/rank0.json (run id, world size) and OUT_DIR/model.pt (the final weights).
The validation set has 400 samples, so the DistributedSampler splits it evenly with no padding.

Besides classification, the fit runs CVMetricsCallback for the instance-segmentation, anomaly-detection and
depth-estimation tasks on outputs derived from the same batches (the ``*_outputs`` mapping functions below), so
the test can compare their DDP values with one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_mlflow_cv.demos.digits import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    images, labels = load_digits_tensors()
    x = (images.float() / 255.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    return x, labels


def val_dataset() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[:400], y[:400])


def train_dataset() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[400:], y[400:])


def anomaly_outputs(outputs, batch):
    """Anomaly scores from the classifier: digit 0 is the 'anomaly'; its logit is the score."""
    return {"scores": outputs["logits"][:, 0].float(), "targets": (outputs["targets"] == 0).long()}


def depth_outputs(outputs, batch):
    """A depth map from the logits against one from the image; dark pixels (x <= -0.6) are invalid (0)."""
    x = batch[0]
    target = (x[:, :, :2, :5] + 0.6).clamp_min(0.0) * 4
    return {"preds": outputs["logits"].view(-1, 1, 2, 5).abs() + 0.5, "targets": target}


def instance_outputs(outputs, batch):
    """One instance per image: the bright pixels (label 1 + digit % 2); predicted with a logit-dependent threshold."""
    x = batch[0]
    probs = outputs["logits"].softmax(1)
    preds, targets = [], []
    for xi, yi, pi in zip(x[:, 0], outputs["targets"], probs):
        def inst(mask):
            if not mask.any():
                return torch.zeros(0, 4), torch.zeros(0, 8, 8, dtype=torch.bool)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            return box, mask[None]

        gb, gm = inst(xi > 1.0)
        pb, pm = inst(xi > 1.0 + float(pi[yi]) - 0.5)
        label = int(yi) % 2 + 1
        targets.append({"boxes": gb, "labels": torch.full((len(gb),), label), "masks": gm})
        preds.append({"boxes": pb + 0.25, "scores": pi[yi].reshape(1)[: len(pb)].float(),
                      "labels": torch.full((len(pb),), label), "masks": pm})  # fmt: skip
    return {"preds": preds, "targets": targets}


def task_callbacks():
    """CVMetricsCallbacks of the new tasks (validation only)."""
    from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback

    return [
        CVMetricsCallback("anomaly", stages=["val"], output_fn=anomaly_outputs),
        CVMetricsCallback("depth", stages=["val"], output_fn=depth_outputs),
        CVMetricsCallback("instance", 3, stages=["val"], output_fn=instance_outputs),
    ]


def build_model():
    from lightning_mlflow_cv.demos.digits import DigitsClassifier

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
        logger=logger, callbacks=[CVMetricsCallback("classification", 10, curve_thresholds=50), *task_callbacks()],
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
