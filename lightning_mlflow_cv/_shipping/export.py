"""Shared fit-end helpers of the shipping callbacks: the weights to ship, a real input sample, ONNX export.

Used by :class:`~lightning_mlflow_cv.callbacks.onnx_export.ONNXExportCallback`,
:class:`~lightning_mlflow_cv.callbacks.inference_latency.InferenceLatencyCallback` and
:class:`~lightning_mlflow_cv.callbacks.model_registry.ModelRegistryCallback`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from lightning_mlflow_cv._compat import frameworks as _compat_frameworks

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

_C = TypeVar("_C")

log = logging.getLogger(__name__)

# trainer -> (key, module copy): one best-weights copy per fit end, shared by the three callbacks
_BEST_CACHE: weakref.WeakKeyDictionary[pl.Trainer, tuple[tuple[int, str | None, int], nn.Module, str]] = (
    weakref.WeakKeyDictionary()
)


class _Forward(nn.Module):
    """A plain ``nn.Module`` around a LightningModule's ``forward`` (what exporters and timers see)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.net = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def monitored_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ``ModelCheckpoint`` that monitors a metric and has a best checkpoint on disk, else ``None``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path and os.path.isfile(cb.best_model_path):
            return cb
    return None


def best_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
    """A CPU, eval-mode copy of ``pl_module`` with the weights to ship, and where they came from.

    The best checkpoint's weights when a ``ModelCheckpoint`` monitors a metric (loaded with
    ``weights_only=True``), otherwise the final weights. ``pl_module`` itself is never changed. The copy is
    cached per trainer and fit state, so the three shipping callbacks share one copy.
    """
    ckpt = monitored_checkpoint(trainer)
    key = (trainer.global_step, ckpt.best_model_path if ckpt else None, id(pl_module))
    cached = _BEST_CACHE.get(trainer)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    module = copy.deepcopy(pl_module).cpu().eval()
    source = "final weights"
    if ckpt is not None:
        try:
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
            score = ckpt.best_model_score
            shown = f"{float(score):.6g}" if score is not None else "unknown"
            source = f"best checkpoint {ckpt.best_model_path} ({ckpt.monitor}={shown})"
        except Exception as err:  # noqa: BLE001 - fall back to the final weights, say so
            warnings.warn(
                f"could not load the best checkpoint {ckpt.best_model_path} with weights_only=True ({err}); "
                "the final weights are shipped instead.",
                RuntimeWarning,
                stacklevel=2,
            )
    for p in module.parameters():
        p.requires_grad_(False)
    _BEST_CACHE[trainer] = (key, module, source)
    return module, source


def release(trainer: pl.Trainer) -> None:
    """Drop the shared best-weights copy of ``trainer`` (called from the callbacks' ``teardown``)."""
    _BEST_CACHE.pop(trainer, None)


def _images_from_batch(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for k in ("images", "image", "x", "input", "inputs"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v
        return None
    if isinstance(batch, (list, tuple)) and batch:
        return _images_from_batch(batch[0])
    return None


def _first_batch(loaders: Any) -> Any | None:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if loaders is None:
        return None
    try:
        return next(iter(loaders))
    except (StopIteration, TypeError):
        return None


def real_batch(trainer: pl.Trainer) -> torch.Tensor | None:
    """The images tensor of the first validation batch (else the first training batch), on CPU, or ``None``."""
    dm = getattr(trainer, "datamodule", None)
    sources = [lambda: trainer.val_dataloaders]
    if dm is not None:
        sources.append(dm.val_dataloader)
    sources.append(lambda: trainer.train_dataloader)
    for source in sources:
        try:
            images = _images_from_batch(_first_batch(source()))
        except Exception:  # noqa: BLE001 - try the next source
            continue
        if images is not None and images.ndim >= 2 and images.is_floating_point():
            return images.detach().cpu()
    return None


def sample_input(
    trainer: pl.Trainer, pl_module: pl.LightningModule, sample_shape: Sequence[int] | None, batch: int
) -> torch.Tensor:
    """A float input of ``batch`` samples: real validation images (repeated if the batch is short), else zeros of
    ``sample_shape`` (per-sample shape, e.g. ``(1, 8, 8)``), else the module's ``example_input_array``.

    Raises:
        RuntimeError: when no shape can be found (the message names the fix).
    """
    real = real_batch(trainer)
    if real is not None and (sample_shape is None or tuple(real.shape[1:]) == tuple(sample_shape)):
        reps = -(-batch // real.shape[0])
        return real.repeat(reps, *([1] * (real.ndim - 1)))[:batch].float()
    if sample_shape is not None:
        return torch.rand(batch, *sample_shape)
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return example[:1].detach().cpu().float().repeat(batch, *([1] * (example.ndim - 1)))
    raise RuntimeError(
        "no input sample: the fit has no validation or training dataloader with tensor images, the module has no "
        "`example_input_array`, and `sample_shape` is None. Fix: pass `sample_shape=(C, H, W)`."
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints (stdout) and chatty loggers."""
    buf = io.StringIO()
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch._export")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def export_onnx(
    module: nn.Module,
    sample: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    input_names: Sequence[str] = ("images",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    dynamo: bool = True,
) -> Path:
    """Export ``module(sample)`` to ONNX at ``path`` (batch axis dynamic when asked). Raises what the exporter raises.

    ``dynamo=True`` uses the ``torch.export``-based exporter where torch has it (2.5), the TorchScript-based one
    otherwise (callers that let a user choose say so once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    takes_dynamo = _compat_frameworks.onnx_export_takes_dynamo()
    dynamo = dynamo and takes_dynamo
    extra: dict[str, Any] = {"dynamo": dynamo} if takes_dynamo else {}
    if dynamic_batch and dynamo:
        extra["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    elif dynamic_batch:
        extra["dynamic_axes"] = {n: {0: "batch"} for n in (*input_names, *output_names)}

    def run(**more: Any) -> None:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                _Forward(module).eval(),
                (sample,),
                str(path),
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                verbose=False,
                **extra,
                **more,
            )

    if not dynamo:
        run()
        return path
    # one self-contained file (the dynamo exporter writes weights to `<name>.data` by default); models over
    # protobuf's 2 GB limit keep external data: `onnx_files(path)` lists every file to ship
    try:
        run(external_data=False)
    except Exception as err:  # noqa: BLE001
        if "2GB" not in str(err).replace(" ", "") and "2 GB" not in str(err) and "too large" not in str(err).lower():
            raise
        run(external_data=True)
    return path


def onnx_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ONNX file and its external-data file (``<name>.data``) when there is one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def export_pt2(module: nn.Module, sample: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """``torch.export`` the module with a dynamic batch axis and save it as a ``.pt2`` archive (safe to load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = sample[:2] if sample.shape[0] >= 2 else sample.repeat(2, *([1] * (sample.ndim - 1)))
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        ep = torch.export.export(_Forward(module).eval(), (example,), dynamic_shapes=({0: batch},))
        torch.export.save(ep, str(path))
    return path


def onnx_session(path: str | os.PathLike[str], intra_op_threads: int | None = None) -> Any:
    """A CPU onnxruntime session for ``path`` (``intra_op_threads``: onnxruntime's default when ``None``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def find_callback(trainer: pl.Trainer, cls: type[_C]) -> _C | None:
    """The first callback of type ``cls`` on the trainer, or ``None``."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, cls):
            return cb
    return None
