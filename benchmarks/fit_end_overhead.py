"""Fit-end overhead of the shipping callbacks on the digits demo model (median of N runs).

Measures, per fit, the wall time of each fit-end stage that ONNXExportCallback, InferenceLatencyCallback and
ModelRegistryCallback add when training ends:

- ``onnx_export``: ``torch.onnx.export`` (dynamic batch axis)
- ``onnx_check_parity``: ``onnx.checker`` + onnxruntime vs PyTorch at batch 1 and 4
- ``latency``: PyTorch + onnxruntime latency (warmup 10, iters 100, batch 1)
- ``bundle``: ``torch.export`` of the network + one local run of the pyfunc bundle
- ``log_register``: save the pyfunc, upload it, register a version, aliases, gates, model card
- ``total``: all fit-end hooks together

Usage::

    .venv/bin/python benchmarks/fit_end_overhead.py --runs 3            # default exporter (dynamo)
    .venv/bin/python benchmarks/fit_end_overhead.py --runs 3 --legacy-onnx

Each run uses a fresh SQLite store in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any


def _timed(store: dict[str, float], key: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] += time.perf_counter() - t0

    return wrapper


def one_run(workdir: Path, dynamo: bool, epochs: int) -> dict[str, float]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_mlflow_cv import MLflowCVLogger
    from lightning_mlflow_cv._shipping import export as _export
    from lightning_mlflow_cv.callbacks import inference_latency, model_registry, onnx_export
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    times: dict[str, float] = defaultdict(float)
    patches = [
        (onnx_export._export, "export_onnx", "onnx_export"),
        (onnx_export, "onnx_parity", "onnx_check_parity"),
        (inference_latency.InferenceLatencyCallback, "measure", "latency"),
        (model_registry.ModelRegistryCallback, "_bundle", "bundle"),
        (model_registry.ModelRegistryCallback, "_publish", "log_register"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, key in patches:
        setattr(obj, name, _timed(times, key, getattr(obj, name)))

    class Clock(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            times["_t_train_start"] = time.perf_counter()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # first on_train_end hook to run
            times["_t_end"] = time.perf_counter()

    class ClockEnd(Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # last one
            times["total"] = time.perf_counter() - times["_t_end"]

    try:
        os.chdir(workdir)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        pl.seed_everything(0)
        logger = MLflowCVLogger(experiment_name="bench", tracking_uri=uri, flush_interval_s=0.5)
        callbacks = [
            Clock(),
            ModelCheckpoint(monitor="val/acc", mode="max", dirpath=str(workdir / "ckpt")),
            onnx_export.ONNXExportCallback(dynamo=dynamo),
            inference_latency.InferenceLatencyCallback(),
            model_registry.ModelRegistryCallback("digits-bench", gates={"val/acc": ">=0.5", "latency/torch/p95_ms": "<=50"}),
            ClockEnd(),
        ]
        trainer = pl.Trainer(
            max_epochs=epochs, logger=logger, callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=str(workdir), log_every_n_steps=5,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
        times["train"] = times["_t_end"] - times.pop("_t_train_start")
        times.pop("_t_end")
        # the callbacks' ONNX and pt2 copies are cached per trainer: drop them between runs
        _export._BEST_CACHE.clear()
        return dict(times)
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--legacy-onnx", action="store_true", help="TorchScript-based ONNX exporter (dynamo=False)")
    parser.add_argument("--json", default=None, help="write the per-run figures here")
    args = parser.parse_args(argv)
    cwd = os.getcwd()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="lmc-bench-") as tmp:
            with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115
                runs.append(one_run(Path(tmp), dynamo=not args.legacy_onnx, epochs=args.epochs))
            os.chdir(cwd)
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(runs[-1].items())), flush=True)
    keys = ["train", "onnx_export", "onnx_check_parity", "latency", "bundle", "log_register", "total"]
    print(f"\nmedian of {args.runs} runs (exporter: {'legacy TorchScript' if args.legacy_onnx else 'dynamo'})")
    print("| stage | median s |\n|---|---|")
    for k in keys:
        print(f"| {k} | {statistics.median(r.get(k, 0.0) for r in runs):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
