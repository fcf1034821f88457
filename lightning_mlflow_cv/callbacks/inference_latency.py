"""InferenceLatencyCallback: p50/p95/p99 latency (with spread) and throughput of the shipped model, PyTorch and ONNX."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch
from typing_extensions import override

from lightning_mlflow_cv._shipping import export as _export
from lightning_mlflow_cv._shipping.latency import (
    latency_stats,
    time_blocks,
    time_calls,
    torch_threads,
)
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.callbacks._shipping_base import ShippingCallback

__all__ = ["InferenceLatencyCallback", "latency_stats", "time_blocks", "time_calls"]

if TYPE_CHECKING:
    import lightning.pytorch as pl

_NAME = "InferenceLatencyCallback"
_WHEN = ("fit_end", "test_end")
#: Longest wait for the logger's writer to drain before timing (a store that is down does not hold the fit).
_DRAIN_TIMEOUT_S = 15.0


class InferenceLatencyCallback(ShippingCallback):
    """Measure inference latency percentiles and throughput of the shipped model and log them as metrics.

    Times forward passes of ``batch_size`` real validation images through the weights that are shipped (the
    best checkpoint's when a ``ModelCheckpoint`` monitors a metric), in eval mode under
    ``torch.inference_mode``, on the module's device. So that the figures describe the model rather than
    whatever else the machine does at that moment (and a latency gate passes or fails the same way on every
    fit of the same model):

    - the logger's writer is drained first (``logger.flush()``), so delivering metrics does not compete;
    - CPU timings use ``num_threads`` torch threads (default 1; onnxruntime gets the same intra-op setting),
      a stated setting rather than "all cores", which other processes would contend for;
    - ``warmup`` untimed calls, then ``repeats`` blocks of ``iters`` timed calls with Python's garbage
      collector paused; each percentile is the median over the blocks of the block's percentile, and the
      spread (interquartile range of the blocks' p95) is logged beside it.

    On CUDA, ``torch.cuda.synchronize()`` runs before every clock read, so GPU timings include the kernels.
    Metrics (``<backend>`` is ``torch``, and ``onnx`` when an
    :class:`~lightning_mlflow_cv.callbacks.onnx_export.ONNXExportCallback` exported a model, timed on
    onnxruntime's CPU provider): ``latency/<backend>/p50_ms``, ``.../p95_ms``, ``.../p99_ms``,
    ``.../p95_iqr_ms`` and ``.../imgs_per_sec``. The ONNX export is run first when needed, so callback order
    does not matter. Run tags ``latency.device``, ``latency.batch_size``, ``latency.num_threads`` and
    ``latency.calls`` (``repeats x iters``) record the setting.

    Args:
        batch_size: Images per timed call.
        warmup: Untimed calls before timing.
        iters: Timed calls per block.
        when: ``"fit_end"`` (when training ends, while the model is on its device) or ``"test_end"``.
        repeats: Timed blocks; the reported figures are medians over blocks.
        num_threads: Torch (and onnxruntime intra-op) threads while timing on CPU; ``None`` keeps torch's
            current setting and onnxruntime's default.

    Raises:
        ValueError: on an invalid argument.
        RuntimeError: at fit start, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.inference_latency import InferenceLatencyCallback
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[ONNXExportCallback(), InferenceLatencyCallback(iters=200)])
        trainer.fit(model, datamodule=dm)  # -> latency/torch/p95_ms, latency/onnx/p95_ms, ...
    """

    def __init__(
        self,
        batch_size: int = 1,
        warmup: int = 10,
        iters: int = 100,
        when: Literal["fit_end", "test_end"] = "fit_end",
        repeats: int = 5,
        num_threads: int | None = 1,
    ) -> None:
        self.batch_size = _checks.check_int(_NAME, "batch_size", batch_size, 1, fix="e.g. batch_size=1")
        self.warmup = _checks.check_int(_NAME, "warmup", warmup, 0, fix="e.g. warmup=10")
        self.iters = _checks.check_int(_NAME, "iters", iters, 1, fix="e.g. iters=100")
        self.repeats = _checks.check_int(_NAME, "repeats", repeats, 1, fix="e.g. repeats=5")
        self.num_threads = (
            None
            if num_threads is None
            else _checks.check_int(_NAME, "num_threads", num_threads, 1, fix="e.g. num_threads=1")
        )
        self.when = _checks.check_choice(
            _NAME, "when", when, _WHEN, must=f"one of {_WHEN}",
            fix="'fit_end' to measure after training or 'test_end' to measure after `trainer.test`",
        )  # fmt: skip
        #: The metrics of the last measurement.
        self.results: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == ("fit" if self.when == "fit_end" else "test"):
            find_mlflow_logger(trainer, _NAME)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end" and trainer.is_global_zero:
            self.measure(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "test_end" and trainer.is_global_zero:
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Measure and log once per fit/test end (later calls return the first result)."""
        if not self._first_time(trainer, str(trainer.state.fn)):
            return self.results
        logger = find_mlflow_logger(trainer, _NAME)
        device = pl_module.device
        module, _source = _export.best_module(trainer, pl_module)
        try:
            x = _export.sample_input(trainer, pl_module, None, self.batch_size).to(device)
        except RuntimeError as err:
            warnings.warn(f"{_NAME}: {err}; no latency measured.", RuntimeWarning, stacklevel=2)
            return {}
        onnx_path = self._onnx_path(trainer, pl_module)
        logger.flush(timeout=_DRAIN_TIMEOUT_S)  # the writer idle, so delivery does not compete with the timing
        results = self.time_module(module, x)
        if onnx_path is not None:
            results.update(self.time_onnx(onnx_path, x.cpu()))
        self.results = results
        if results:
            logger.log_metrics(results, step=trainer.global_step)
        logger.set_tags(
            {
                "latency.device": str(device),
                "latency.batch_size": str(self.batch_size),
                "latency.num_threads": str(
                    self.num_threads if self.num_threads is not None else torch.get_num_threads()
                ),
                "latency.calls": f"{self.repeats}x{self.iters}",
            }
        )
        return results

    def time_module(self, module: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
        """``latency/torch/*`` of ``module`` on ``x``'s device (the module goes back to the CPU afterwards)."""
        device = x.device
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        runner = module.to(device)  # the shared CPU copy visits the device and goes back
        try:
            with torch.inference_mode(), torch_threads(self.num_threads if device.type == "cpu" else None):
                blocks = time_blocks(lambda: runner(x), self.warmup, self.iters, self.repeats, sync)
            return latency_stats(blocks, self.batch_size, "torch")
        except Exception as err:
            warnings.warn(
                f"{_NAME}: PyTorch timing failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2
            )
            return {}
        finally:
            module.cpu()

    def time_onnx(self, path: Any, x: torch.Tensor) -> dict[str, float]:
        """``latency/onnx/*`` of the ONNX file at ``path`` on onnxruntime's CPU provider."""
        try:
            sess = _export.onnx_session(path, intra_op_threads=self.num_threads)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            blocks = time_blocks(lambda: sess.run(None, feed), self.warmup, self.iters, self.repeats)
        except Exception as err:
            warnings.warn(
                f"{_NAME}: onnxruntime timing failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2
            )
            return {}
        return latency_stats(blocks, self.batch_size, "onnx")

    def _onnx_path(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        cb = _export.find_callback(trainer, ONNXExportCallback)
        return None if cb is None else cb.export(trainer, pl_module)

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        # one per (when, batch size, threads): each measurement keeps its own results
        return dict(when=self.when, batch_size=self.batch_size, num_threads=self.num_threads)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results") or {})
