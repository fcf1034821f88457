"""The servable MLflow pyfunc model: raw uint8 images in, probabilities / boxes / masks out.

Self-contained on purpose (imports only numpy, torch, torchvision and mlflow): a copy of this file travels inside
every logged model (``code/lmc_pyfunc.py``), so ``mlflow.pyfunc.load_model(...)`` works where
``lightning_mlflow_cv`` is not installed. Nothing here is unpickled: the model is "models from code" and the
network is a ``torch.export`` archive (``.pt2``) or an ONNX file, loaded without running pickled code.

Input layout (documented contract):

- ``NHWC`` (default): ``uint8`` array ``(N, H, W, C)`` in [0, 255], as decoded by PIL / OpenCV / imageio;
  ``(N, H, W)`` is read as grayscale.
- ``NCHW``: ``uint8`` array ``(N, C, H, W)``.

Preprocessing: resize to the training size (bilinear, antialiased) when the size differs, scale to [0, 1],
normalise with the training mean and std. Postprocessing (``postprocess``):

- ``softmax`` / ``sigmoid``: ``float32`` ``(N, num_classes)`` probabilities;
- ``masks``: ``int64`` ``(N, H, W)`` class ids (argmax over the class axis of ``(N, C, H, W)`` logits);
- ``boxes``: a list (one per image) of ``{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,)}`` after a score
  threshold and class-wise NMS. The network returns either ``(N, K, 4 + num_classes)`` (xyxy box + class
  logits per anchor) or torchvision-style lists of dicts with ``boxes``, ``scores``, ``labels``;
- ``none``: the network output as is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

POSTPROCESS = ("softmax", "sigmoid", "masks", "boxes", "none")
LAYOUTS = ("NHWC", "NCHW")
CONFIG_FILE = "preprocess.json"

#: The "models from code" script saved with each model (``python_model=<this script>``).
MODEL_CODE = '''"""lightning-mlflow-cv servable model (models from code: nothing is unpickled)."""
import mlflow

try:
    from lightning_mlflow_cv._pyfunc import CVPythonModel
except ImportError:  # the copy bundled in the model's code/ directory
    from lmc_pyfunc import CVPythonModel

mlflow.models.set_model(CVPythonModel())
'''


def to_nchw_float(raw: Any, layout: str, channels: int) -> torch.Tensor:
    """Raw images (uint8, see the module docstring) -> float tensor ``(N, C, H, W)`` in [0, 255].

    Raises:
        ValueError: on a shape that does not fit ``layout`` and ``channels``.
    """
    if hasattr(raw, "to_numpy") and not isinstance(raw, np.ndarray):  # pandas
        raw = raw.to_numpy()
        if raw.dtype == object:
            raw = np.stack([np.asarray(v) for v in raw.ravel()])
    x = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(raw)))
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(-1 if layout == "NHWC" else 1)
    if x.ndim != 4:
        raise ValueError(
            f"expected a batch of images, {layout} uint8 with {channels} channel(s), got shape {tuple(x.shape)}. "
            f"Stack images into one array, e.g. np.stack(images) -> (N, H, W, C)."
        )
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        raise ValueError(
            f"expected {channels} channel(s) in layout {layout}, got shape {tuple(x.shape)} after reading as NCHW. "
            f"Send (N, H, W, {channels}) uint8 images."
        )
    return x.contiguous()


def preprocess(
    raw: Any, mean: list[float], std: list[float], size: list[int] | None, layout: str, channels: int
) -> torch.Tensor:
    """Resize to ``size`` (when it differs), scale to [0, 1], normalise with ``mean``/``std``; returns NCHW float."""
    x = to_nchw_float(raw, layout, channels)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    x = x / 255.0
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def decode_boxes(
    out: Any, score_threshold: float = 0.05, iou_threshold: float = 0.5, max_detections: int = 100
) -> list[dict[str, np.ndarray]]:
    """Detection output -> per-image ``boxes``/``scores``/``labels`` after a score threshold and class-wise NMS.

    ``out`` is ``(N, K, 4 + num_classes)`` (xyxy + class logits; scores are their sigmoid) or a list of dicts
    with ``boxes``, ``scores``, ``labels`` (torchvision style).
    """
    from torchvision.ops import batched_nms

    per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if isinstance(out, torch.Tensor):
        if out.ndim != 3 or out.shape[-1] < 5:
            raise ValueError(f"boxes postprocess expects (N, K, 4 + num_classes), got shape {tuple(out.shape)}")
        for o in out:
            scores, labels = o[:, 4:].sigmoid().max(-1)
            per_image.append((o[:, :4], scores, labels))
    else:
        for d in out:
            per_image.append((d["boxes"], d["scores"], d["labels"]))
    results = []
    for boxes, scores, labels in per_image:
        keep = scores >= score_threshold
        boxes, scores, labels = boxes[keep].float(), scores[keep].float(), labels[keep].long()
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        results.append(
            {
                "boxes": boxes[keep].numpy().astype(np.float32),
                "scores": scores[keep].numpy().astype(np.float32),
                "labels": labels[keep].numpy().astype(np.int64),
            }
        )
    return results


def postprocess(out: Any, kind: str, cfg: dict[str, Any] | None = None) -> Any:
    """Network output -> what ``predict`` returns for ``kind`` (see the module docstring)."""
    cfg = cfg or {}
    if kind == "boxes":
        return decode_boxes(
            out, cfg.get("score_threshold", 0.05), cfg.get("iou_threshold", 0.5), cfg.get("max_detections", 100)
        )
    if isinstance(out, (list, tuple)):
        out = out[0]
    if kind == "softmax":
        return out.float().softmax(-1).numpy().astype(np.float32)
    if kind == "sigmoid":
        return out.float().sigmoid().numpy().astype(np.float32)
    if kind == "masks":
        return out.argmax(1).numpy().astype(np.int64)
    return out.numpy()


class Network:
    """Runs the saved network file: a ``torch.export`` archive (``.pt2``) or ONNX (``.onnx``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path.endswith(".onnx"):
            import onnxruntime as ort

            self._sess = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self._input = self._sess.get_inputs()[0].name
            self._module = None
        else:
            self._sess = None
            self._module = torch.export.load(self.path).module()

    def __call__(self, x: torch.Tensor) -> Any:
        if self._sess is not None:
            outs = self._sess.run(None, {self._input: x.numpy()})
            return torch.from_numpy(outs[0]) if len(outs) == 1 else [torch.from_numpy(o) for o in outs]
        with torch.inference_mode():
            return self._module(x)


with warnings.catch_warnings():  # MLflow warns at class creation that predict has no type hints (on purpose)
    warnings.simplefilter("ignore", UserWarning)

    class CVPythonModel(mlflow.pyfunc.PythonModel):
        """pre-processing + network + post-processing, configured by the ``config`` artifact (``preprocess.json``)."""

        def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow reads these hints; none is right
            self.config = json.loads(Path(context.artifacts["config"]).read_text())
            self.network = Network(context.artifacts["network"])

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - see load_context
            cfg = self.config
            x = preprocess(model_input, cfg["mean"], cfg["std"], cfg.get("size"), cfg["layout"], cfg["channels"])
            return postprocess(self.network(x), cfg["postprocess"], cfg)


#: Directory name of the model's data on MLflow < 2.13 (``loader_module`` + ``data_path``, no models from code).
DATA_DIR = "lmc_model"


class LoadedModel:
    """What :func:`_load_pyfunc` returns: the same predict as :class:`CVPythonModel`, without an MLflow context."""

    def __init__(self, data_path: str | Path) -> None:
        root = Path(data_path)
        self.config = json.loads((root / CONFIG_FILE).read_text())
        net = next((p for p in (root / "network.pt2", root / "network.onnx") if p.is_file()), None)
        if net is None:
            raise FileNotFoundError(f"no network.pt2 or network.onnx in {root}")
        self.network = Network(net)

    def predict(self, model_input: Any, params: Any = None) -> Any:
        cfg = self.config
        x = preprocess(model_input, cfg["mean"], cfg["std"], cfg.get("size"), cfg["layout"], cfg["channels"])
        return postprocess(self.network(x), cfg["postprocess"], cfg)


def _load_pyfunc(data_path: str) -> LoadedModel:
    """MLflow's ``loader_module`` entry point (MLflow < 2.13): reads the config and network, unpickles nothing."""
    return LoadedModel(data_path)
