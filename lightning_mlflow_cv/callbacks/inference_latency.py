"""InferenceLatencyCallback: p50/p95/p99 latency and throughput of the shipped model, PyTorch and ONNX."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv import _export
from lightning_mlflow_cv._context import find_mlflow_logger

if TYPE_CHECKING:
    import lightning.pytorch as pl

_NAME = "InferenceLatencyCallback"
_WHEN = ("fit_end", "test_end")


def latency_stats(times_s: Sequence[float], batch_size: int, prefix: str = "") -> dict[str, float]:
    """Latency percentiles (ms, linear interpolation) and throughput from per-call wall times in seconds.

    Args:
        times_s: One wall time per timed call.
        batch_size: Images per call.
        prefix: Prepended to every key (e.g. ``"onnx_"``).

    Raises:
        ValueError: when ``times_s`` is empty or ``batch_size`` < 1.

    Example::

        >>> latency_stats([0.001, 0.002, 0.003, 0.004], batch_size=2)["p50_latency_ms"]
        2.5
    """
    if len(times_s) == 0:
        raise ValueError("latency_stats: `times_s` is empty; time at least one call.")
    if batch_size < 1:
        raise ValueError(f"latency_stats: `batch_size` must be >= 1, got {batch_size!r}.")
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    total = float(ms.sum()) / 1000.0
    return {
        f"{prefix}p50_latency_ms": float(p50),
        f"{prefix}p95_latency_ms": float(p95),
        f"{prefix}p99_latency_ms": float(p99),
        f"{prefix}throughput_imgs_per_sec": float(batch_size * len(ms) / total) if total > 0 else float("inf"),
    }


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed (``sync`` before each clock read)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def _positive_int(arg: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_NAME}: `{arg}` must be an int >= {minimum}, got {value!r}. Example: {arg}={max(minimum, 1)}.")
    return value


class InferenceLatencyCallback(Callback):
    """Measure inference latency percentiles and throughput of the shipped model and log them as metrics.

    Times ``iters`` forward passes (after ``warmup`` untimed ones) of ``batch_size`` real validation images
    through the weights that are shipped (the best checkpoint's when a ``ModelCheckpoint`` monitors a metric),
    in eval mode under ``torch.inference_mode``, on the module's device. On CUDA, ``torch.cuda.synchronize()``
    runs before every clock read, so GPU timings include the kernels. Logs ``p50_latency_ms``,
    ``p95_latency_ms``, ``p99_latency_ms`` and ``throughput_imgs_per_sec``; when an
    :class:`~lightning_mlflow_cv.callbacks.onnx_export.ONNXExportCallback` exported a model, the same four for
    onnxruntime (CPU) with the prefix ``onnx_`` (e.g. ``onnx_p95_latency_ms``). The ONNX export is run first
    when needed, so callback order does not matter. Run tags ``latency.device`` and ``latency.batch_size``
    record the setting.

    Args:
        batch_size: Images per timed call.
        warmup: Untimed calls before timing.
        iters: Timed calls.
        when: ``"fit_end"`` (when training ends, while the model is on its device) or ``"test_end"``.

    Raises:
        ValueError: on an invalid argument.
        RuntimeError: at fit start, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.inference_latency import InferenceLatencyCallback
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[ONNXExportCallback(), InferenceLatencyCallback(iters=200)])
        trainer.fit(model, datamodule=dm)  # -> p95_latency_ms, onnx_p95_latency_ms, ...
    """

    def __init__(
        self, batch_size: int = 1, warmup: int = 10, iters: int = 100, when: Literal["fit_end", "test_end"] = "fit_end"
    ) -> None:
        self.batch_size = _positive_int("batch_size", batch_size, 1)
        self.warmup = _positive_int("warmup", warmup, 0)
        self.iters = _positive_int("iters", iters, 1)
        if when not in _WHEN:
            raise ValueError(
                f"{_NAME}: `when` must be one of {_WHEN}, got {when!r}. Use 'fit_end' to measure after training or "
                "'test_end' to measure after `trainer.test`."
            )
        self.when = when
        #: The metrics of the last measurement.
        self.results: dict[str, float] = {}
        self._done_key: tuple[int, int, str] | None = None

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
        key = (id(trainer), trainer.global_step, str(trainer.state.fn))
        if self._done_key == key:
            return self.results
        self._done_key = key
        logger = find_mlflow_logger(trainer, _NAME)
        device = pl_module.device
        module, _source = _export.best_module(trainer, pl_module)
        try:
            x = _export.sample_input(trainer, pl_module, None, self.batch_size).to(device)
        except RuntimeError as err:
            warnings.warn(f"{_NAME}: {err}; no latency measured.", RuntimeWarning, stacklevel=2)
            return {}
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        results: dict[str, float] = {}
        runner = module.to(device)  # the shared CPU copy visits the device and goes back
        try:
            with torch.inference_mode():
                times = time_calls(lambda: runner(x), self.warmup, self.iters, sync)
            results.update(latency_stats(times, self.batch_size))
        except Exception as err:  # noqa: BLE001 - a measurement must not stop the fit
            warnings.warn(f"{_NAME}: PyTorch timing failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
        finally:
            module.cpu()
        results.update(self._onnx(trainer, pl_module, x.cpu()))
        self.results = results
        if results:
            logger.log_metrics(results, step=trainer.global_step)
        logger.set_tags({"latency.device": str(device), "latency.batch_size": str(self.batch_size)})
        return results

    def _onnx(self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: torch.Tensor) -> dict[str, float]:
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        cb = _export.find_callback(trainer, ONNXExportCallback)
        if cb is None:
            return {}
        path = cb.export(trainer, pl_module)
        if path is None:
            return {}
        try:
            sess = _export.onnx_session(path)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            times = time_calls(lambda: sess.run(None, feed), self.warmup, self.iters)
        except Exception as err:  # noqa: BLE001 - a broken export must not stop the fit
            warnings.warn(f"{_NAME}: onnxruntime timing failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
            return {}
        return latency_stats(times, self.batch_size, prefix="onnx_")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _export.release(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results") or {})
