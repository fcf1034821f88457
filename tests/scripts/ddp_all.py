"""The full callback set on the digits model under 2-process CPU DDP (gloo). Rank 0 writes OUT/result.json."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv import callbacks as cbs
from lightning_mlflow_cv.demos.digits import DIGITS_CLASSES, DIGITS_MEAN, DIGITS_STD, DigitsClassifier, DigitsDataModule


def callbacks() -> list[pl.Callback]:
    out = [
        ModelCheckpoint(monitor="val/acc", mode="max"),
        cbs.ReproducibilityCallback(seed=3),
        cbs.DatasetLineageCallback(),
        cbs.PredictionGridCallback(task="classification", num_samples=8, class_names=DIGITS_CLASSES, mean=DIGITS_MEAN, std=DIGITS_STD),
        cbs.AugmentationSamplesCallback(num_samples=8, mean=DIGITS_MEAN, std=DIGITS_STD),
        cbs.GradCAMCallback("features.3", num_samples=2),
        cbs.ONNXExportCallback(),
        cbs.InferenceLatencyCallback(iters=20, warmup=2),
        cbs.ModelRegistryCallback("ddp-digits", gates={"val/acc": ">=0.1"}, compare_metric="val/acc"),
    ]
    if hasattr(cbs, "CVMetricsCallback"):
        out.append(cbs.CVMetricsCallback(task="classification", num_classes=10, class_names=DIGITS_CLASSES))
    return out


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"run_id": trainer.logger.run_id, "world": trainer.world_size})
        )


def main() -> None:
    uri, out = sys.argv[1], Path(sys.argv[2])
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="ddp-all", tags={"task": "classification"})
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=logger, log_every_n_steps=5,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / "root"),
        limit_train_batches=6, callbacks=[*callbacks(), Record(out)],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main()
