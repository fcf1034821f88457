"""The servable model's bundle: what goes into the logged MLflow pyfunc model, and how it is saved.

The bundle is the network file (``torch.export`` archive or ONNX), the pre/post-processing config
(``preprocess.json``), the "models from code" script and a copy of :mod:`lightning_mlflow_cv._shipping.pyfunc`, a raw
``uint8`` input example and the signature. :func:`build_bundle` runs the bundle once exactly as the served model
will and derives the output schema from what it returned; :func:`save_pyfunc` writes it as an MLflow model
directory. Used by :class:`~lightning_mlflow_cv.callbacks.model_registry.ModelRegistryCallback`.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._shipping import export as _export
from lightning_mlflow_cv._shipping import pyfunc as _pyfunc
from lightning_mlflow_cv.environment import framework_versions

_WHO = "ModelRegistryCallback"
#: Post-processings whose served output is a probability table with one column per class.
CLASS_TABLES = ("softmax", "sigmoid")


@dataclass
class Bundle:
    """The files and metadata of one servable model, all inside one work directory."""

    network: Path
    config: Path
    code: Path
    bundled: Path
    example: np.ndarray
    signature: Any
    cfg: dict[str, Any]


def pyfunc_config(
    mean: Sequence[float],
    std: Sequence[float],
    size: Sequence[int],
    channels: int,
    layout: str,
    postprocess: str,
    class_names: Sequence[str] | None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The served model's config (``preprocess.json``); a single-channel ``mean``/``std`` spreads to ``channels``.

    Example::

        >>> pyfunc_config([0.5], [0.25], [8, 8], 3, "NHWC", "softmax", None)["mean"]
        [0.5, 0.5, 0.5]
    """
    mean, std = list(mean), list(std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    return {
        "mean": mean,
        "std": std,
        "size": [int(size[0]), int(size[1])],
        "channels": int(channels),
        "layout": layout,
        "postprocess": postprocess,
        "class_names": list(class_names) if class_names is not None else None,
        **(options or {}),
    }


def raw_example(sample: torch.Tensor, mean: Sequence[float], std: Sequence[float], layout: str) -> np.ndarray:
    """Normalised ``(N, C, H, W)`` images back to what a client sends: ``uint8`` in ``layout``."""
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)
    raw = ((sample * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    if layout == "NHWC":
        raw = raw.permute(0, 2, 3, 1)
    return np.ascontiguousarray(raw.numpy())


def network_file(
    module: torch.nn.Module, sample: torch.Tensor, work: Path, network_format: str, onnx_path: Path | None = None
) -> Path:
    """The network in ``work``: a ``torch.export`` archive, or ONNX (``onnx_path`` when already exported).

    Raises:
        ValueError: when the ONNX model keeps its weights in an external-data file.
    """
    if network_format != "onnx":
        return _export.export_pt2(module, sample, work / "network.pt2")
    source = (
        onnx_path if onnx_path is not None else _export.export_onnx(module, sample, work / "exported" / "network.onnx")
    )
    if len(_export.onnx_files(source)) > 1:
        raise ValueError(
            "the ONNX model keeps its weights in an external-data file (over 2 GB), which the pyfunc "
            "cannot bundle as one artifact; use network_format='pt2'"
        )
    return Path(shutil.copy(source, work / "network.onnx"))


def input_schema(layout: str, channels: int) -> Any:
    """``uint8`` images of any size and batch, in ``layout``."""
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1, -1, -1, channels) if layout == "NHWC" else (-1, channels, -1, -1)
    return Schema([TensorSpec(np.dtype(np.uint8), shape)])


def output_schema(pred: Any) -> Any:
    """The output schema of what the served model returned: named float columns for a probability table
    (one per class), a tensor with a free batch axis for an array, named tensors for a dict of arrays
    (anomaly: ``scores`` and ``maps``), ``None`` for per-image lists (detection, instances)."""
    from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

    if hasattr(pred, "columns"):  # pandas DataFrame: the class-probability table
        return Schema([ColSpec(DataType.float, str(c)) for c in pred.columns])
    if isinstance(pred, np.ndarray):
        return Schema([TensorSpec(pred.dtype, (-1, *pred.shape[1:]))])
    if isinstance(pred, dict) and pred and all(isinstance(v, np.ndarray) for v in pred.values()):
        return Schema([TensorSpec(v.dtype, (-1, *v.shape[1:]), name=k) for k, v in pred.items()])
    return None


def check_class_names(cfg: dict[str, Any], pred: Any) -> None:
    """The class names fit the network's classes (one name per probability column).

    Raises:
        ValueError: naming both counts and the fix.
    """
    names = cfg.get("class_names")
    if cfg["postprocess"] not in CLASS_TABLES or not names or not hasattr(pred, "columns"):
        return
    num_classes = len(pred.columns)
    if len({str(n) for n in names}) != len(names):
        raise ValueError(
            f"`class_names` must be distinct (they name the served probability columns), got {list(names)}; pass "
            f"distinct class_names to {_WHO} (or to the datamodule's `class_names`)"
        )
    if len(names) != num_classes:
        raise ValueError(
            f"`class_names` has {len(names)} names ({list(names)[:5]}...) but the network outputs {num_classes} "
            f"classes; pass class_names with one name per class to {_WHO} (or to the datamodule's `class_names`)"
        )


def build_bundle(
    module: torch.nn.Module,
    sample: torch.Tensor,
    work: Path,
    cfg: dict[str, Any],
    network_format: str,
    onnx_path: Path | None = None,
) -> Bundle:
    """Network file, config, code, input example and signature in ``work``; checks the bundle runs.

    Raises:
        ValueError: when the class names do not fit the network, or an ONNX model is over 2 GB.
    """
    from mlflow.models.signature import ModelSignature

    example = raw_example(sample, cfg["mean"], cfg["std"], cfg["layout"])
    net = network_file(module, sample, work, network_format, onnx_path)
    config = work / _pyfunc.CONFIG_FILE
    config.write_text(json.dumps(cfg, indent=2))
    served = _pyfunc.CVPythonModel()  # run the bundle once, exactly as the served model will
    served.config, served.network = cfg, _pyfunc.Network(net)
    pred = served.predict(None, example)
    check_class_names(cfg, pred)
    code = work / "model_code.py"
    code.write_text(_pyfunc.MODEL_CODE)
    bundled = Path(shutil.copy(_pyfunc.__file__, work / "lmc_pyfunc.py"))
    signature = ModelSignature(inputs=input_schema(cfg["layout"], cfg["channels"]), outputs=output_schema(pred))
    return Bundle(net, config, code, bundled, example, signature, cfg)


def pip_requirements(bundle: Bundle) -> list[str]:
    """Pinned requirements of the served model: what :mod:`lightning_mlflow_cv._shipping.pyfunc` imports for this bundle."""
    pins = ["torch", "mlflow", "numpy", "pandas"]  # pandas: the class-probability table
    if bundle.cfg["postprocess"] == "boxes":
        pins.append("torchvision")
    if bundle.network.suffix == ".onnx":
        pins.append("onnxruntime")
    return [f"{d}=={v}" for d, v in framework_versions(pins, local=False).items()]


def save_pyfunc(model_dir: Path, bundle: Bundle, card_path: Path | None = None, mlflow_model: Any = None) -> None:
    """``mlflow.pyfunc.save_model`` of the bundle (models from code, explicit pinned requirements) in ``model_dir``.

    On MLflow < 2.13 (no models from code) the same files are saved as a ``loader_module`` model with
    ``data_path``; it loads and predicts the same, and nothing is pickled either way.
    """
    import mlflow

    artifacts = {"network": str(bundle.network), "config": str(bundle.config)}
    if card_path is not None:
        artifacts["model_card"] = str(card_path)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    common: dict[str, Any] = {
        "path": str(model_dir),
        "signature": bundle.signature,
        "input_example": bundle.example,
        "mlflow_model": mlflow_model,
        "pip_requirements": pip_requirements(bundle),
    }
    names = bundle.cfg.get("class_names")
    if not _compat.has_models_from_code():
        # class names in the MLmodel file as below, where this MLflow's save_model takes metadata
        if names and "metadata" in inspect.signature(mlflow.pyfunc.save_model).parameters:
            common["metadata"] = {"class_names": names}
        _save_loader_module(model_dir, bundle, artifacts, common)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(
            python_model=str(bundle.code),
            artifacts=artifacts,
            code_paths=[str(bundle.bundled)],
            # class names where a server or client reads them without loading the model (the MLmodel file)
            metadata={"class_names": names} if names else None,
            **common,
        )


def _save_loader_module(model_dir: Path, bundle: Bundle, artifacts: dict[str, str], common: dict[str, Any]) -> None:
    """MLflow < 2.13: the pre-models-from-code way (``loader_module='lmc_pyfunc'``), still no pickle."""
    import mlflow

    _compat.warn_once(
        "models-from-code",
        f"{_WHO}: MLflow {_compat.version_string()} has no models from code (MLflow >= 2.13); the servable "
        "model is saved with loader_module='lmc_pyfunc' and its files as data_path (it loads and predicts "
        "the same; nothing is pickled).",
    )
    data = model_dir.parent / _pyfunc.DATA_DIR
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for f in artifacts.values():
        shutil.copy(f, data / Path(f).name)
    code_kw = "code_paths" if "code_paths" in inspect.signature(mlflow.pyfunc.save_model).parameters else "code_path"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(
            loader_module="lmc_pyfunc", data_path=str(data), **{code_kw: [str(bundle.bundled)]}, **common
        )
