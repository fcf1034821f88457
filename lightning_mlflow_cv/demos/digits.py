"""The main job: a small CNN on scikit-learn's bundled handwritten digits (no download).

``lightning-mlflow-cv demo`` (``make demo``) trains it into the embedded store ``sqlite:///mlflow.db``,
printing a line per epoch, then the headline metrics, whether the model was promoted to ``@champion`` (or
why not), the run page's URL and the ``mlflow ui`` command that serves it.

The module also holds the pieces tests and examples reuse: :class:`DigitsDataModule` and
:class:`DigitsClassifier`, whose ``validation_step``/``test_step`` return the classification output
convention (``{"logits": (N, C), "targets": (N,)}``).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv.demos._base import ExampleDataModule, ExampleModule, Split

#: Normalisation of the digits images after scaling to [0, 1].
DIGITS_MEAN = (0.2662,)
DIGITS_STD = (0.3830,)
DIGITS_CLASSES = [str(i) for i in range(10)]
#: The demo's promotion gates (``latency/torch/p95_ms`` is the PyTorch p95 latency, see the README's metric names).
DEMO_GATES = {"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50"}
#: The metrics the demo prints and puts in the run description.
HEADLINE = ("val/acc", "test/acc", "best/val/acc", "latency/torch/p95_ms", "latency/onnx/p95_ms")


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``uint8`` images ``(N, 1, 8, 8)`` in [0, 255] and labels ``(N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (images * 255).round().to(torch.uint8), torch.tensor(d.target, dtype=torch.long)


class NormalizedDigits(Dataset):
    """uint8 digit images -> normalised float tensors, with an optional training transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.mean = torch.tensor(DIGITS_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(DIGITS_STD).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float() / 255.0
        if self.transform is not None:
            x = self.transform(x)
        return (x - self.mean) / self.std, self.labels[i]


class DigitsDataModule(ExampleDataModule):
    """Train/val/test split of scikit-learn's digits (seeded), as normalised ``(1, 8, 8)`` tensors.

    Args:
        batch_size: Batch size of every loader.
        val_fraction: Share of images for validation (the same share again for test).
        split_seed: Seed of the train/val/test split (named apart from the global seed, which
            ``seed_everything``/``ReproducibilityCallback`` log as ``global_seed``).
        augment: Light augmentation (random affine) on the training split.
        num_workers: DataLoader workers.

    Example::

        dm = DigitsDataModule(batch_size=64)
        trainer.fit(DigitsClassifier(), datamodule=dm)
    """

    mean = DIGITS_MEAN
    std = DIGITS_STD
    class_names = DIGITS_CLASSES

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_transform = None
        if augment:
            from torchvision.transforms import v2

            self.train_transform = v2.Compose([v2.RandomAffine(degrees=10, translate=(0.1, 0.1))])

    @override
    def make_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        images, labels = load_digits_tensors()
        g = torch.Generator().manual_seed(self.hparams.split_seed)
        perm = torch.randperm(len(labels), generator=g)
        n_val = int(len(labels) * self.hparams.val_fraction)
        val, test, train = perm[:n_val], perm[n_val : 2 * n_val], perm[2 * n_val :]
        train_set = NormalizedDigits(images[train], labels[train], self.train_transform)
        return train_set, NormalizedDigits(images[val], labels[val]), NormalizedDigits(images[test], labels[test])


class DigitsClassifier(ExampleModule):
    """A small CNN for 8x8 digits. ``validation_step``/``test_step`` return ``{"logits", "targets"}``.

    Args:
        num_classes: Output classes.
        lr: Adam learning rate.
        width: Channels of the first conv layer.

    Example::

        model = DigitsClassifier(lr=3e-3)
        pl.Trainer(max_epochs=5).fit(model, datamodule=DigitsDataModule())
    """

    def __init__(self, num_classes: int = 10, lr: float = 3e-3, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 64), nn.ReLU(), nn.Linear(64, num_classes))
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @override
    def _step(self, batch: Any, stage: Split) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log_stage(stage, "loss", loss)
        self.log_stage(stage, "acc", (logits.argmax(1) == y).float().mean())
        return {"loss": loss, "logits": logits.detach(), "targets": y}

    @override
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        # `name` is the LearningRateMonitor's metric key (the package's `<split>/<name>` scheme)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "name": "train/lr"}}


def demo_callbacks() -> list[pl.Callback]:
    """The plugin's callbacks that exist in this version, configured for the digits demo."""
    from lightning_mlflow_cv import callbacks as cbs

    out: list[pl.Callback] = []
    factories: dict[str, Any] = {
        "ReproducibilityCallback": lambda c: c(seed=42),
        "DatasetLineageCallback": lambda c: c(
            names={"training": "digits-train", "validation": "digits-val", "testing": "digits-test"}
        ),
        "CVMetricsCallback": lambda c: c(task="classification", num_classes=10, class_names=DIGITS_CLASSES),
        "PredictionGridCallback": lambda c: c(
            task="classification", num_samples=16, class_names=DIGITS_CLASSES, mean=DIGITS_MEAN, std=DIGITS_STD
        ),
        "AugmentationSamplesCallback": lambda c: c(
            num_samples=16, task="classification", class_names=DIGITS_CLASSES, mean=DIGITS_MEAN, std=DIGITS_STD
        ),
        "GradCAMCallback": lambda c: c("features.3", num_samples=8) if importlib.util.find_spec("captum") else None,
        "SystemMetricsCallback": lambda c: c(interval_s=2.0) if importlib.util.find_spec("psutil") else None,
        "ONNXExportCallback": lambda c: c(),
        "InferenceLatencyCallback": lambda c: c(),
        "ModelRegistryCallback": lambda c: c(
            "digits-cnn",
            gates=DEMO_GATES,
            compare_metric="val/acc",
            model_card={
                "intended_use": "Demo: 8x8 handwritten digit classification.",
                "limitations": "Trained on 1,077 scikit-learn digits; not for real-world OCR.",
            },
        ),
    }
    for name, make in factories.items():
        cls = getattr(cbs, name, None)
        cb = make(cls) if cls is not None else None
        if cb is not None:
            out.append(cb)
    return out


class EpochLines(pl.Callback):
    """One line per epoch on stdout (``epoch 3/8  train/loss 0.41  val/loss 0.2  val/acc 0.95  12.3 s``)."""

    KEYS = ("train/loss_epoch", "val/loss", "val/acc")

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._t0 = time.monotonic()
        print(f"training {type(pl_module).__name__} for {trainer.max_epochs} epochs ...", flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time  # runs after the epoch's validation, so both losses are there

        m = trainer.callback_metrics
        vals = "  ".join(f"{k.replace('_epoch', '')} {float(m[k]):.4f}" for k in self.KEYS if k in m)
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {vals}  {time.monotonic() - self._t0:.1f} s",
            flush=True,
        )


def run_demo(
    max_epochs: int = 8, experiment_name: str = "digits-demo", tracking_uri: str | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Train the digits CNN with MLflowCVLogger and the plugin's callbacks; return run id, metrics and outcome."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from mlflow import MlflowClient

    from lightning_mlflow_cv import MLflowCVLogger
    from lightning_mlflow_cv._facts.summary import NOTE_TAG, run_description

    _compat_frameworks.seed_everything(42, workers=True)
    logger = MLflowCVLogger(
        experiment_name=experiment_name,
        run_name="digits-cnn",
        tracking_uri=tracking_uri,
        tags={"task": "classification", "backbone": "small-cnn", "dataset": "sklearn-digits", "env": "demo"},
    )
    dm = DigitsDataModule()
    model = DigitsClassifier()
    callbacks = [ModelCheckpoint(monitor="val/acc", mode="max"), LearningRateMonitor(logging_interval="epoch")]
    callbacks += demo_callbacks() + ([] if quiet else [EpochLines()])
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=logger,
        log_every_n_steps=5,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        default_root_dir="checkpoints",
    )
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    logger.flush()
    client = MlflowClient(logger.tracking_uri)
    run = client.get_run(logger.run_id)
    stored = run.data.metrics
    metrics = {k: round(v, 4) for k, v in stored.items() if not k.endswith("_step") and "/per_class" not in k}
    registry = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ModelRegistryCallback"), None)
    decision = getattr(registry, "decision", None)
    model_uri = run.data.tags.get("registry.model_uri")
    # the run page's description: headline metrics (test included) and the promotion outcome
    logger.set_tags({NOTE_TAG: run_description("Digits demo", stored, HEADLINE, decision, model_uri)})
    logger.flush()
    models = []
    for mv in client.search_model_versions(f"run_id = '{logger.run_id}'"):
        aliases = client.get_model_version(mv.name, mv.version).aliases
        models.append(f"models:/{mv.name}/{mv.version} aliases={aliases or '[]'}")
    return {
        "run_id": logger.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": logger.tracking_uri,
        "metrics": metrics,
        "test": test,
        "models": models,
        "decision": decision,
        "model_uri": model_uri,
    }


def _quiet() -> None:
    """Leave the terminal to the demo's own lines: Lightning's and MLflow's info lines and known notices go."""
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (r".*Add type hints to the `predict` method.*", r".*isinstance\(treespec, LeafSpec\).*"):
        warnings.filterwarnings("ignore", message=message)


def main(argv: list[str] | None = None) -> int:
    from lightning_mlflow_cv._facts.redact import safe_uri
    from lightning_mlflow_cv._facts.summary import headline, promotion_line

    parser = argparse.ArgumentParser(prog="lightning-mlflow-cv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--experiment-name", default="digits-demo")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--port", type=int, default=5000, help="port of the `mlflow ui` command printed at the end")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's and MLflow's own log lines")
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet()
    out = run_demo(args.max_epochs, args.experiment_name, args.tracking_uri)
    uri = safe_uri(out["tracking_uri"])
    print("\n=== lightning-mlflow-cv demo ===")
    for k, v in headline(out["metrics"], HEADLINE).items():
        print(f"  {k:<24} {v}")
    print(f"model:     {promotion_line(out['decision'], out['model_uri'])}")
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        print(f"run page:  {base}/#/experiments/{out['experiment_id']}/runs/{out['run_id']}")
    else:
        base = f"http://127.0.0.1:{args.port}"
        print(f"run page:  {base}/#/experiments/{out['experiment_id']}/runs/{out['run_id']}")
        print(f"open it:   mlflow ui --backend-store-uri {uri} --port {args.port}", flush=True)
    return 0
