"""ONNXExportCallback: export the shipped weights to ONNX at fit end, check them and prove parity with PyTorch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv._compat.mlflow_api import warn_once
from lightning_mlflow_cv._shipping import export as _export
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.callbacks._shipping_base import ShippingCallback

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Batch sizes at which onnxruntime is compared with PyTorch (two sizes prove the dynamic batch axis).
PARITY_BATCHES = (1, 4)
_NAME = "ONNXExportCallback"


def _check_names(arg: str, value: Any) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(
            f"{_NAME}: `{arg}` must be a non-empty sequence of non-empty strings (one name per tensor), got "
            f"{value!r}. Example: {arg}=('images',)."
        )
    return tuple(value)


class ONNXExportCallback(ShippingCallback):
    """Export the model to ONNX at the end of fitting, check it and compare onnxruntime with PyTorch.

    On global rank 0, when training ends (``on_train_end``, while the model is still on its device and the run
    is open):

    1. the weights to ship are the best checkpoint's when a ``ModelCheckpoint`` monitors a metric (loaded with
       ``weights_only=True``), otherwise the final weights; the module being trained is not changed;
    2. the input sample comes from a real validation batch (``sample_shape`` only when there is none);
    3. ``torch.onnx.export`` with a dynamic batch axis, then ``onnx.checker.check_model``;
    4. onnxruntime (CPU) is compared with PyTorch at batch 1 and batch 4; the largest absolute difference is
       logged as the metric ``onnx/max_abs_err``;
    5. the file is logged under the artifact path ``onnx/`` (``onnx/model.onnx``) and kept locally at
       :attr:`onnx_path` (``<default_root_dir>/onnx/<run id>/model.onnx``) for
       :class:`~lightning_mlflow_cv.callbacks.inference_latency.InferenceLatencyCallback`.

    An export failure (e.g. an operator ONNX does not support), a checker failure or a parity failure gives one
    warning and the run tags ``onnx.status`` (``failed_export``, ``failed_check``, ``failed_parity`` or ``ok``)
    and ``onnx.error`` (the reason). It never stops the fit. Tags ``onnx.weights`` and ``onnx.opset`` record what
    was exported.

    Args:
        opset: ONNX opset version (7..25).
        input_names: Names of the graph inputs (one: the images).
        output_names: Names of the graph outputs.
        dynamic_batch: Make axis 0 of every input and output dynamic.
        sample_shape: Per-sample input shape ``(C, H, W)`` used only when no real batch is available.
        check: Run ``onnx.checker`` and the onnxruntime parity check.
        atol: Largest acceptable absolute difference between onnxruntime and PyTorch.
        also_torchscript: Also log a traced TorchScript file ``onnx/model.torchscript.pt`` (TorchScript is
            deprecated in PyTorch; prefer ONNX or the pt2 model of ``ModelRegistryCallback``).
        dynamo: Use the ``torch.export``-based exporter (PyTorch's default); ``False`` uses the legacy
            TorchScript-based exporter (faster, deprecated).

    Raises:
        ValueError: on an invalid argument (the message names the argument and the fix).
        RuntimeError: at fit start, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        trainer = Trainer(
            logger=MLflowCVLogger(experiment_name="digits"),
            callbacks=[ModelCheckpoint(monitor="val/acc", mode="max"), ONNXExportCallback(opset=17)],
        )
        trainer.fit(model, datamodule=dm)  # -> artifact onnx/model.onnx, metric onnx/max_abs_err
    """

    def __init__(
        self,
        opset: int = 17,
        input_names: Sequence[str] = ("images",),
        output_names: Sequence[str] = ("output",),
        dynamic_batch: bool = True,
        sample_shape: Sequence[int] | None = None,
        check: bool = True,
        atol: float = 1e-4,
        also_torchscript: bool = False,
        dynamo: bool = True,
    ) -> None:
        _checks.check_int(_NAME, "opset", opset, 7, 25, fix="opset=17 (the default) unless your runtime needs another")
        self.input_names = _check_names("input_names", input_names)
        self.output_names = _check_names("output_names", output_names)
        if len(self.input_names) != 1:
            raise ValueError(
                f"{_NAME}: `input_names` must name exactly one input (the image batch), got {input_names!r}. "
                "Example: input_names=('images',)."
            )
        if sample_shape is not None and (
            isinstance(sample_shape, (str, bytes))
            or not isinstance(sample_shape, Sequence)
            or not sample_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sample_shape)
        ):
            raise ValueError(
                f"{_NAME}: `sample_shape` must be None or the per-sample shape as positive ints, e.g. (3, 224, 224), "
                f"got {sample_shape!r}. Leave it None to infer it from a real validation batch."
            )
        _checks.check_number(_NAME, "atol", atol, 0, above=True, fix="e.g. atol=1e-4")
        self.opset = opset
        self.dynamic_batch = bool(dynamic_batch)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.check = bool(check)
        self.atol = float(atol)
        self.also_torchscript = bool(also_torchscript)
        self.dynamo = bool(dynamo)
        if self.dynamo and not _compat_frameworks.onnx_export_takes_dynamo():
            warn_once(
                "onnx-dynamo",
                f"{_NAME}: dynamo=True needs torch.onnx.export(dynamo=...) (torch >= 2.5); this is torch "
                f"{torch.__version__}, so the TorchScript-based exporter is used. Fix: pass dynamo=False (the same "
                "exporter, no warning) or upgrade torch.",
                RuntimeWarning,
            )
        #: Local path of the exported model (``None`` until a successful export).
        self.onnx_path: Path | None = None
        #: Largest |onnxruntime - PyTorch| over the parity batches (``None`` when not checked).
        self.max_abs_err: float | None = None
        #: ``ok``, ``failed_export``, ``failed_check`` or ``failed_parity`` after the export ran.
        self.status: str | None = None
        #: Why the export or a check failed.
        self.error: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_mlflow_logger(trainer, _NAME)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.onnx_path, self.max_abs_err, self.status, self.error, self._done_key = None, None, None, None, None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Run the export once per fit end (later calls return the first result). Returns :attr:`onnx_path`."""
        if not self._first_time(trainer):
            return self.onnx_path
        logger = find_mlflow_logger(trainer, _NAME)
        module, source = _export.best_module(trainer, pl_module)
        path = Path(trainer.default_root_dir) / "onnx" / str(logger.run_id) / "model.onnx"
        tags = {"onnx.opset": str(self.opset), "onnx.weights": source}
        try:
            sample = _export.sample_input(trainer, pl_module, self.sample_shape, max(PARITY_BATCHES))
            export_sample = sample if self.dynamic_batch else sample[:1]
            _export.export_onnx(
                module,
                export_sample,
                path,
                opset=self.opset,
                input_names=self.input_names,
                output_names=self.output_names,
                dynamic_batch=self.dynamic_batch,
                dynamo=self.dynamo,
            )
        except Exception as err:  # noqa: BLE001 - never crash the fit
            self._fail(logger, tags, "failed_export", f"export failed: {type(err).__name__}: {_first_lines(err)}")
            return None
        self.onnx_path = path
        if self.check:
            try:
                import onnx

                onnx.checker.check_model(str(path))
            except Exception as err:  # noqa: BLE001
                self._fail(logger, tags, "failed_check", f"onnx.checker: {type(err).__name__}: {_first_lines(err)}")
                self._log_files(logger, path)
                return path
            try:
                batches = PARITY_BATCHES if self.dynamic_batch else (1,)
                self.max_abs_err = onnx_parity(path, module, sample, batches)
                logger.log_metrics({"onnx/max_abs_err": self.max_abs_err}, step=trainer.global_step)
            except Exception as err:  # noqa: BLE001
                self._fail(
                    logger, tags, "failed_parity", f"onnxruntime failed: {type(err).__name__}: {_first_lines(err)}"
                )
                self._log_files(logger, path)
                return path
            if not self.max_abs_err <= self.atol:
                self._fail(
                    logger,
                    tags,
                    "failed_parity",
                    f"onnxruntime differs from PyTorch by {self.max_abs_err:.3g} > atol={self.atol:g} "
                    f"(batches {list(batches)})",
                )
                self._log_files(logger, path)
                return path
        self.status = "ok"
        logger.set_tags({**tags, "onnx.status": "ok"})
        self._log_files(logger, path)
        if self.also_torchscript:
            self._torchscript(logger, module, sample[:1], path.with_name("model.torchscript.pt"))
        return path

    @staticmethod
    def _log_files(logger: Any, path: Path) -> None:
        for f in _export.onnx_files(path):
            logger.log_artifact(f, "onnx")

    def _fail(self, logger: Any, tags: dict[str, str], status: str, reason: str) -> None:
        self.status, self.error = status, reason
        warnings.warn(f"{_NAME}: {reason}. The fit goes on; see the run tag onnx.error.", RuntimeWarning, stacklevel=3)
        logger.set_tags({**tags, "onnx.status": status, "onnx.error": reason})

    def _torchscript(self, logger: Any, module: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(_export._Forward(_DetachedForward(module)), sample)
                torch.jit.save(traced, str(path))
        except Exception as err:  # noqa: BLE001
            reason = f"TorchScript trace failed: {type(err).__name__}: {_first_lines(err)}"
            warnings.warn(f"{_NAME}: {reason}", RuntimeWarning, stacklevel=3)
            logger.set_tags({"onnx.torchscript_error": reason})
            return
        self._log_files(logger, path)

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        # one per (opset, exporter): each export keeps its own file and error
        return dict(opset=self.opset, dynamo=self.dynamo)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"onnx_path": str(self.onnx_path) if self.onnx_path else None, "max_abs_err": self.max_abs_err}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        path = state_dict.get("onnx_path")
        self.onnx_path = Path(path) if path else None
        self.max_abs_err = state_dict.get("max_abs_err")


class _DetachedForward(torch.nn.Module):
    """Hides a LightningModule's ``trainer`` property from ``torch.jit.trace`` (it raises when detached)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.fn = module.forward
        # register the parameters and buffers so tracing sees them as module state
        self.inner = torch.nn.ModuleDict({k: v for k, v in module.named_children()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def onnx_parity(
    path: str | Path, module: torch.nn.Module, sample: torch.Tensor, batches: Sequence[int] = PARITY_BATCHES
) -> float:
    """Largest absolute difference between onnxruntime (CPU) and ``module`` (PyTorch, CPU) at each batch size.

    Example::

        err = onnx_parity("model.onnx", model.eval(), torch.randn(4, 1, 8, 8))
    """
    sess = _export.onnx_session(path)
    in_name = sess.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for b in batches:
            x = sample[:b].float().cpu()
            ref = module(x)
            ref_t = ref if isinstance(ref, torch.Tensor) else ref[0]
            got = sess.run(None, {in_name: x.numpy()})[0]
            if tuple(got.shape) != tuple(ref_t.shape):
                raise ValueError(
                    f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(ref_t.shape)} at batch {b}"
                )
            worst = max(worst, float((torch.from_numpy(got) - ref_t.float()).abs().max()))
    return worst


def _first_lines(err: BaseException, limit: int = 600) -> str:
    text = " ".join(str(err).split())
    return text[:limit]
