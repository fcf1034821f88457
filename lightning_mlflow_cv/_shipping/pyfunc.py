"""The servable MLflow pyfunc model: raw uint8 images in, probabilities / boxes / masks out.

Self-contained on purpose (imports only numpy, pandas, torch, torchvision and mlflow): a copy of this file travels inside
every logged model (``code/lmc_pyfunc.py``), so ``mlflow.pyfunc.load_model(...)`` works where
``lightning_mlflow_cv`` is not installed. Nothing here is unpickled: the model is "models from code" and the
network is a ``torch.export`` archive (``.pt2``) or an ONNX file, loaded without running pickled code.

Input layout (documented contract):

- ``NHWC`` (default): ``uint8`` array ``(N, H, W, C)`` in [0, 255], as decoded by PIL / OpenCV / imageio;
  ``(N, H, W)`` is read as grayscale.
- ``NCHW``: ``uint8`` array ``(N, C, H, W)``.

Preprocessing: resize to the training size (bilinear, antialiased) when the size differs, scale to [0, 1],
normalise with the training mean and std. Postprocessing (``postprocess``):

- ``softmax`` / ``sigmoid``: a ``pandas.DataFrame`` of ``float32`` probabilities, one row per image and one column
  per class, named by the class names (``config["class_names"]``; the class ids ``"0"``, ``"1"``, ... where none
  were given). The model's output schema lists the same columns, and ``mlflow models serve`` answers
  ``{"predictions": [{"cat": 0.9, "dog": 0.1}, ...]}``; ``df.to_numpy()`` is the ``(N, num_classes)`` array;
- ``masks``: ``int64`` ``(N, H, W)`` class ids (argmax over the class axis of ``(N, C, H, W)`` logits);
- ``boxes``: a list (one per image) of ``{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,)}`` after a score
  threshold and class-wise NMS. The network returns either ``(N, K, 4 + num_classes)`` (xyxy box + class
  logits per anchor) or torchvision-style lists of dicts with ``boxes``, ``scores``, ``labels``;
- ``instances``: a list (one per image) of ``{"boxes": (K, 4) xyxy, "scores": (K,), "labels": (K,),
  "masks": (K, H, W) bool}`` with ``score >= score_threshold`` (default 0.5), masks binarised at
  ``mask_threshold`` (0.5), at most ``max_detections``. The network returns torchvision Mask R-CNN style lists of
  dicts (masks ``(K, 1, H, W)`` or ``(K, H, W)``) or a tuple ``(boxes (N, K, 4), scores (N, K), labels (N, K),
  masks (N, K, H, W))``;
- ``anomaly``: ``{"scores": float32 (N,)}`` plus ``"maps": float32 (N, H, W)`` when the network returns maps.
  The network returns scores ``(N,)``, a map ``(N, H, W)`` / ``(N, 1, H, W)`` (the score is the map's maximum), a
  tuple ``(scores, maps)`` or a dict with ``scores`` (and ``maps``);
- ``depth``: ``float32`` ``(N, H, W)`` depth maps (from ``(N, 1, H, W)`` or ``(N, H, W)``);
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

POSTPROCESS = ("softmax", "sigmoid", "masks", "boxes", "instances", "anomaly", "depth", "none")
LAYOUTS = ("NHWC", "NCHW")
CONFIG_FILE = "preprocess.json"

#: The "models from code" script saved with each model (``python_model=<this script>``).
MODEL_CODE = '''"""lightning-mlflow-cv servable model (models from code: nothing is unpickled)."""
import mlflow

try:
    from lightning_mlflow_cv._shipping.pyfunc import CVPythonModel
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


def decode_instances(
    out: Any, score_threshold: float = 0.5, mask_threshold: float = 0.5, max_detections: int = 100
) -> list[dict[str, np.ndarray]]:
    """Instance segmentation output -> per-image ``boxes``/``scores``/``labels``/``masks`` (see the module docstring)."""
    if (
        isinstance(out, (tuple, list))
        and len(out) == 4
        and all(isinstance(t, torch.Tensor) and t.ndim >= 2 for t in out)
    ):
        boxes, scores, labels, masks = out
        items = [
            {"boxes": b, "scores": s, "labels": lab, "masks": m}
            for b, s, lab, m in zip(boxes, scores, labels, masks, strict=False)
        ]
    else:
        items = list(out)
    results = []
    for d in items:
        masks = d["masks"]
        if masks.ndim == 4:
            masks = masks[:, 0]
        scores = d["scores"].float()
        keep = torch.nonzero(scores >= score_threshold).flatten()
        keep = keep[scores[keep].argsort(descending=True)][:max_detections]
        m = masks[keep]
        results.append(
            {
                "boxes": d["boxes"][keep].float().numpy().astype(np.float32),
                "scores": scores[keep].numpy().astype(np.float32),
                "labels": d["labels"][keep].long().numpy().astype(np.int64),
                "masks": (m > mask_threshold if m.is_floating_point() else m.bool()).numpy(),
            }
        )
    return results


def decode_anomaly(out: Any) -> dict[str, np.ndarray]:
    """Anomaly output -> ``{"scores": (N,)}`` (+ ``"maps": (N, H, W)``), see the module docstring."""
    maps = None
    if isinstance(out, dict):
        scores, maps = out.get("scores"), out.get("maps")
    elif isinstance(out, (tuple, list)):
        scores, maps = (out[0], out[1]) if len(out) > 1 else (out[0], None)
    else:
        scores = out
    if scores is not None and scores.ndim >= 3:  # a map: the score is its maximum
        maps, scores = scores, None
    if maps is not None and maps.ndim == 4:
        maps = maps[:, 0]
    if scores is None:
        scores = maps.flatten(1).amax(1)
    result = {"scores": scores.reshape(scores.shape[0], -1)[:, 0].float().numpy().astype(np.float32)}
    if maps is not None:
        result["maps"] = maps.float().numpy().astype(np.float32)
    return result


def class_columns(class_names: Any, num_classes: int) -> list[str]:
    """Column names of the probability table: the class names, or the class ids when none fit.

    Example::

        >>> class_columns(["cat", "dog"], 2), class_columns(None, 3)
        (['cat', 'dog'], ['0', '1', '2'])
    """
    if class_names and len(class_names) == num_classes:
        return [str(n) for n in class_names]
    return [str(i) for i in range(num_classes)]


def probability_table(probs: np.ndarray, class_names: Any = None) -> Any:
    """``(N, num_classes)`` probabilities -> a DataFrame with one ``float32`` column per class (see the module docstring)."""
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float32).reshape(probs.shape[0], -1)
    return pd.DataFrame(probs, columns=class_columns(class_names, probs.shape[1]))


def postprocess(out: Any, kind: str, cfg: dict[str, Any] | None = None) -> Any:
    """Network output -> what ``predict`` returns for ``kind`` (see the module docstring)."""
    cfg = cfg or {}
    if kind == "boxes":
        return decode_boxes(
            out, cfg.get("score_threshold", 0.05), cfg.get("iou_threshold", 0.5), cfg.get("max_detections", 100)
        )
    if kind == "instances":
        return decode_instances(
            out, cfg.get("score_threshold", 0.5), cfg.get("mask_threshold", 0.5), cfg.get("max_detections", 100)
        )
    if kind == "anomaly":
        return decode_anomaly(out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    if kind == "softmax":
        return probability_table(out.float().softmax(-1).numpy(), cfg.get("class_names"))
    if kind == "sigmoid":
        return probability_table(out.float().sigmoid().numpy(), cfg.get("class_names"))
    if kind == "masks":
        return out.argmax(1).numpy().astype(np.int64)
    if kind == "depth":
        return (out[:, 0] if out.ndim == 4 else out).float().numpy().astype(np.float32)
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

        def load_context(self, context):
            self.config = json.loads(Path(context.artifacts["config"]).read_text())
            self.network = Network(context.artifacts["network"])

        def predict(self, context, model_input, params=None):
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
