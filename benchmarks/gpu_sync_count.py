"""Host-device synchronisations per training step on a CUDA GPU: no logger, Lightning's MLFlowLogger, MLflowCVLogger.

Counted with ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch warns once for every synchronising CUDA call
(``.item()``, device-to-host copies, ``nonzero``, ...). The mode is switched on at ``on_train_start`` and off at
``on_train_end`` with validation disabled, so the count covers training steps only, including what Lightning's
logger connector does to hand metrics to a logger (``self.log`` values become floats once per logged step).

Run: ``python benchmarks/gpu_sync_count.py [--steps 50]`` (prints JSON; exits 0 with a note without CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

CONFIGS = ("none", "mlflowlogger", "mlflowcvlogger")


def _model_and_data(steps: int) -> tuple[Any, Any]:
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8, 10))  # fmt: skip

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
            self.log("train/loss", loss)
            self.log("train/acc", acc)
            for k in range(6):
                self.log(f"train/m{k}", loss.detach() * k)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (steps * 8,), generator=g)
    return Net(), DataLoader(TensorDataset(x, y), batch_size=8)


def count_syncs(config: str, steps: int = 50, workdir: str | None = None) -> dict[str, Any]:
    """Fit ``steps`` training steps on CUDA with one logging configuration; return syncs per step.

    Args:
        config: ``"none"`` (no logger), ``"mlflowlogger"`` (Lightning's, SQLite) or ``"mlflowcvlogger"`` (ours,
            SQLite, plus the callbacks that act during training steps).
        steps: Training steps to count over.
        workdir: Where the SQLite store goes (a temp dir by default).

    Raises:
        ValueError: for an unknown ``config``.
        RuntimeError: when CUDA is not available.
    """
    import lightning.pytorch as pl
    import torch

    if config not in CONFIGS:
        raise ValueError(f"count_syncs: `config` must be one of {CONFIGS}, got {config!r}.")
    if not torch.cuda.is_available():
        raise RuntimeError("count_syncs needs a CUDA GPU; none is visible to torch.")
    workdir = workdir or tempfile.mkdtemp(prefix="sync-count-")
    uri = f"sqlite:///{Path(workdir) / f'{config}.db'}"
    callbacks: list[Any] = []
    logger: Any = False
    if config == "mlflowlogger":
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(tracking_uri=uri, experiment_name="sync-count")
    elif config == "mlflowcvlogger":
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks import ReproducibilityCallback

        logger = MLflowCVLogger(tracking_uri=uri, experiment_name="sync-count")
        callbacks.append(ReproducibilityCallback(seed=0))

    class SyncDebug(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

    model, data = _model_and_data(steps)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=logger, log_every_n_steps=1,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, SyncDebug()],
                         default_root_dir=workdir)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    if hasattr(logger, "flush"):
        logger.flush()
    return {"config": config, "steps": steps, "syncs": len(syncs), "syncs_per_step": len(syncs) / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA GPU visible to torch"}))
        return 0
    print(json.dumps([count_syncs(c, args.steps) for c in CONFIGS], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
