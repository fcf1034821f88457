"""Per-epoch cost of PredictionGridCallback, as a ratio to the same fit without it (digits demo).

Both arms use MLflowCVLogger on one SQLite store, the digits CNN and data module of the demo, and differ only in
the callback (16 samples, classification, with its worst-mistakes grid unless --no-worst). The arms are interleaved round by round (A B, A B, ...) after one
warm-up fit of each, and the median over rounds is reported, which cancels most drift on a shared machine.
Also reported: the callback's own time per epoch (its hook, timed inside the fit) and the time to render the
grid when the validation set is 1x, 10x and 100x larger (bounded cost: it does not grow with the dataset).

Run:  .venv/bin/python benchmarks/prediction_grid_overhead.py [--rounds 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared CPUs)")
    parser.add_argument("--no-worst", action="store_true", help="PredictionGridCallback(worst_mistakes=False)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    import lightning
    import lightning.pytorch as pl
    import mlflow
    import torch
    import torchvision
    from torch.utils.data import ConcatDataset, DataLoader

    from lightning_mlflow_cv.callbacks.prediction_grid import PredictionGridCallback
    from lightning_mlflow_cv.demos.digits import DIGITS_CLASSES, DIGITS_MEAN, DIGITS_STD, DigitsClassifier, DigitsDataModule
    from lightning_mlflow_cv.logger import MLflowCVLogger

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="grid_bench_"))
    os.chdir(work)
    os.environ.setdefault("LIGHTNING_MLFLOW_CV_SPOOL_DIR", str(work / "spool"))
    store = f"sqlite:///{work / 'bench.db'}"

    class Timed(PredictionGridCallback):
        """The real callback, with its hooks' wall time per epoch recorded (batch hooks + epoch end)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.times: list[float] = []
            self._batch_time = 0.0

        def on_validation_batch_end(self, trainer, pl_module, *a, **kw):
            t = time.perf_counter()
            super().on_validation_batch_end(trainer, pl_module, *a, **kw)
            self._batch_time += time.perf_counter() - t

        def on_validation_epoch_end(self, trainer, pl_module):
            t = time.perf_counter()
            super().on_validation_epoch_end(trainer, pl_module)
            if not trainer.sanity_checking:
                self.times.append(time.perf_counter() - t + self._batch_time)
            self._batch_time = 0.0

    def make_cb():
        return Timed("classification", num_samples=args.num_samples, class_names=DIGITS_CLASSES,
                     mean=DIGITS_MEAN, std=DIGITS_STD, worst_mistakes=not args.no_worst)  # fmt: skip

    def one_fit(with_cb: bool) -> tuple[float, list[float]]:
        pl.seed_everything(0, verbose=False)
        cb = make_cb() if with_cb else None
        logger = MLflowCVLogger(experiment_name="grid-bench", tracking_uri=store)
        trainer = pl.Trainer(
            max_epochs=args.epochs, logger=logger, callbacks=[cb] if cb else [], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0,
            log_every_n_steps=5,
        )  # fmt: skip
        dm = DigitsDataModule(batch_size=64)
        model = DigitsClassifier()
        t = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        elapsed = time.perf_counter() - t
        logger.flush()
        return elapsed / args.epochs, (cb.times if cb else [])

    one_fit(False), one_fit(True)  # warm-up (imports, store creation, first-call costs)
    base, with_cb, hook = [], [], []
    for r in range(args.rounds):
        b, _ = one_fit(False)
        w, times = one_fit(True)
        base.append(b)
        with_cb.append(w)
        hook.extend(times)
        print(f"round {r + 1}: no callback {b * 1000:.0f} ms/epoch, with callback {w * 1000:.0f} ms/epoch", flush=True)

    # bounded cost: render time with a validation set 1x, 10x, 100x larger
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    model = DigitsClassifier()

    class FakeTrainer:
        datamodule = None

        def __init__(self, loader):
            self.val_dataloaders = loader

    scaling = {}
    for mult in (1, 10, 100):
        loader = DataLoader(ConcatDataset([dm.val_set] * mult), batch_size=64)
        cb = make_cb()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            cb.render(FakeTrainer(loader), model)
            ts.append(time.perf_counter() - t)
        scaling[len(loader.dataset)] = statistics.median(ts[1:])  # first call also picks and loads the samples

    mb, mw, mh = statistics.median(base), statistics.median(with_cb), statistics.median(hook)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or platform.platform()})")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, lightning {lightning.__version__}, mlflow {mlflow.__version__}")  # fmt: skip
    print(f"command: {Path(sys.executable).name} benchmarks/prediction_grid_overhead.py --rounds {args.rounds} "
          f"--epochs {args.epochs} --num-samples {args.num_samples} --threads {args.threads}"
          f"{' --no-worst' if args.no_worst else ''}")  # fmt: skip
    print(f"per-epoch time, median of {args.rounds} interleaved rounds x {args.epochs} epochs:")
    print(f"  no callback:   {mb * 1000:8.1f} ms/epoch")
    print(f"  with callback: {mw * 1000:8.1f} ms/epoch")
    ratios = [w / b for b, w in zip(base, with_cb, strict=True)]
    print(f"  ratio:         {mw / mb:8.3f}x  (ratio of medians; per-round ratios {', '.join(f'{r:.2f}' for r in ratios)},"
          f" median {statistics.median(ratios):.3f}x)")  # fmt: skip
    print(f"  callback hooks: {mh * 1000:7.1f} ms/epoch (median over {len(hook)} epochs; batch hooks + render + "
          "log_image enqueue)"
          f" = {mh / mb:.1%} of a no-callback epoch")  # fmt: skip
    print("render time vs validation-set size (median of 4):")
    for n, s in scaling.items():
        print(f"  {n:>7} samples: {s * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
