"""Output adapters: one documented convention per CV task for what ``validation_step``/``test_step`` return.

Callbacks that need predictions (:class:`~lightning_mlflow_cv.callbacks.cv_metrics.CVMetricsCallback`,
``PredictionGridCallback``, ...) read them from the step outputs through :func:`adapt_outputs`:

- ``"classification"``: ``{"logits": (N, C) float, "targets": (N,) int}``
- ``"object-detection"``: ``{"preds": [{"boxes": (K, 4) xyxy float, "scores": (K,), "labels": (K,) int}, ...],
  "targets": [{"boxes": (M, 4) xyxy, "labels": (M,) int}, ...]}`` (torchvision style, one dict per image)
- ``"semantic-segmentation"``: ``{"logits": (N, C, H, W) float, "targets": (N, H, W) int}``

``"detection"`` and ``"segmentation"`` are accepted as short names. When a model returns something else, pass
``output_fn``: a function ``fn(outputs, batch) -> dict`` in the format above, or its import path as a string
(``"pkg.module:fn"`` or ``"pkg.module.fn"``) so a LightningCLI YAML can name it.

A wrong format raises ``ValueError`` at the first batch, naming the callback, the expected format and what
arrived (types and shapes). Everything here is a pure function, testable without a Trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from torch import Tensor

Task = Literal["classification", "object-detection", "semantic-segmentation"]
#: The canonical task names (also the ``task`` tag values of the logger's CV tag schema).
TASKS: tuple[str, ...] = get_args(Task)
#: Short names accepted for convenience.
TASK_ALIASES: dict[str, str] = {"detection": "object-detection", "segmentation": "semantic-segmentation"}

#: The expected output format per task, as shown in error messages.
EXPECTED_FORMAT: dict[str, str] = {
    "classification": '{"logits": (N, C) float tensor, "targets": (N,) integer tensor}',
    "object-detection": (
        '{"preds": list of N dicts {"boxes": (K, 4) float xyxy, "scores": (K,) float, "labels": (K,) int}, '
        '"targets": list of N dicts {"boxes": (M, 4) float xyxy, "labels": (M,) int}}'
    ),
    "semantic-segmentation": '{"logits": (N, C, H, W) float tensor, "targets": (N, H, W) integer tensor}',
}

OutputFn = Callable[[Any, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class ClassificationOutput:
    """Checked classification outputs: ``logits`` ``(N, C)`` float, ``targets`` ``(N,)`` long."""

    logits: Tensor
    targets: Tensor


@dataclass(frozen=True)
class DetectionOutput:
    """Checked detection outputs: one dict per image for ``preds`` and ``targets`` (torchvision style)."""

    preds: list[dict[str, Tensor]]
    targets: list[dict[str, Tensor]]


@dataclass(frozen=True)
class SegmentationOutput:
    """Checked segmentation outputs: ``logits`` ``(N, C, H, W)`` float, ``targets`` ``(N, H, W)`` long."""

    logits: Tensor
    targets: Tensor


TaskOutput = Union[ClassificationOutput, DetectionOutput, SegmentationOutput]


def normalize_task(task: str, who: str = "callback") -> str:
    """The canonical task name for ``task`` (short names allowed).

    Raises:
        ValueError: for an unknown task, naming the allowed values.

    Example::

        >>> normalize_task("detection")
        'object-detection'
    """
    if isinstance(task, str):
        if task in TASKS:
            return task
        if task in TASK_ALIASES:
            return TASK_ALIASES[task]
    raise ValueError(
        f"{who}: `task` must be one of {list(TASKS)} (or the short names {list(TASK_ALIASES)}), got {task!r}. "
        f"Fix: pass e.g. task='classification'."
    )


def describe(obj: Any, depth: int = 0) -> str:
    """A short description of ``obj`` with tensor shapes and dtypes, for error messages.

    Example::

        >>> describe({"logits": torch.zeros(2, 3)})
        "dict{'logits': Tensor(shape=(2, 3), dtype=float32)}"
    """
    if isinstance(obj, Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={str(obj.dtype).replace('torch.', '')})"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = list(obj.items())
        inner = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in items[:8])
        more = f", ... ({len(items)} keys)" if len(items) > 8 else ""
        return f"{type(obj).__name__}{{{inner}{more}}}"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(describe(v, depth + 1) for v in obj[:2])
        more = ", ..." if len(obj) > 2 else ""
        return f"{type(obj).__name__}[len={len(obj)}: {inner}{more}]"
    if obj is None:
        return "None"
    return type(obj).__name__


def load_output_fn(spec: str | OutputFn | None, who: str = "callback") -> OutputFn | None:
    """Resolve ``output_fn``: a callable as is, or an import path ``"pkg.module:fn"`` / ``"pkg.module.fn"``.

    Raises:
        ValueError: when the path cannot be imported or does not name a callable.

    Example::

        >>> fn = load_output_fn("lightning_mlflow_cv._adapters:describe")
        >>> fn is describe
        True
    """
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{who}: `output_fn` must be a callable or an import path string like 'my_pkg.module:fn', got {spec!r}."
        )
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"{who}: `output_fn` import path {spec!r} is not of the form 'pkg.module:fn' or 'pkg.module.fn'. "
            "Fix: name the module and the function, e.g. 'my_project.outputs:to_cv_format'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{who}: `output_fn` {spec!r}: module {module_name!r} cannot be imported ({err}). "
            "Fix: check the spelling and that the module is on PYTHONPATH."
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{who}: `output_fn` {spec!r}: module {module_name!r} has no attribute {attr!r}. "
                "Fix: check the function name."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{who}: `output_fn` {spec!r} names a {type(obj).__name__}, not a function.")
    return obj


def logits_and_batch_targets(outputs: Any, batch: Any) -> dict[str, Any]:
    """A ready-made ``output_fn``: the step returned raw logits (or a dict with ``"logits"``) and the batch is
    ``(inputs, targets, ...)`` or a dict with ``"targets"``/``"target"``/``"labels"``/``"label"``/``"mask"``.

    Works for classification and semantic segmentation. In YAML:
    ``output_fn: lightning_mlflow_cv._adapters:logits_and_batch_targets``.

    Example::

        >>> out = logits_and_batch_targets(torch.zeros(2, 3), (torch.zeros(2, 8), torch.tensor([0, 2])))
        >>> out["targets"].tolist()
        [0, 2]
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) and "logits" in outputs else outputs
    targets: Any = None
    if isinstance(batch, Mapping):
        targets = next((batch[k] for k in ("targets", "target", "labels", "label", "mask") if k in batch), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        targets = batch[1]
    return {"logits": logits, "targets": targets}


def _fail(who: str, task: str, outputs: Any, problem: str) -> ValueError:
    return ValueError(
        f"{who}: the step outputs are not in the {task!r} format: {problem}. "
        f"Expected: {EXPECTED_FORMAT[task]}. Got: {describe(outputs)}. "
        "Fix: return that dict from validation_step/test_step, or pass output_fn='pkg.module:fn' mapping "
        "(outputs, batch) to it."
    )


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _is_int(t: Any) -> bool:
    return isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _dense(
    task: str, outputs: Any, who: str, num_classes: int | None, spatial: bool
) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, Mapping) or "logits" not in outputs or "targets" not in outputs:
        raise _fail(who, task, outputs, "expected a dict with keys 'logits' and 'targets'")
    logits, targets = outputs["logits"], outputs["targets"]
    nd = 4 if spatial else 2
    dims = "(N, C, H, W)" if spatial else "(N, C)"
    tdims = "(N, H, W)" if spatial else "(N,)"
    if not _is_float(logits) or logits.ndim != nd:
        raise _fail(who, task, outputs, f"'logits' must be a float tensor of shape {dims}")
    if not _is_int(targets) or targets.ndim != nd - 1:
        raise _fail(who, task, outputs, f"'targets' must be an integer tensor of shape {tdims} (class indices)")
    want = (logits.shape[0], *logits.shape[2:])
    if tuple(targets.shape) != tuple(want):
        raise _fail(
            who, task, outputs, f"'targets' shape {tuple(targets.shape)} does not match the logits' {tuple(want)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise _fail(who, task, outputs, f"'logits' has {logits.shape[1]} classes in dim 1, num_classes={num_classes}")
    return logits, targets.long()


def _det_dicts(task: str, outputs: Any, who: str, key: str, items: Any, need: tuple[str, ...]) -> list[dict[str, Tensor]]:
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or isinstance(items, Tensor):
        raise _fail(who, task, outputs, f"'{key}' must be a list with one dict per image")
    out = []
    for i, d in enumerate(items):
        if not isinstance(d, Mapping) or any(k not in d for k in need):
            raise _fail(who, task, outputs, f"'{key}'[{i}] must be a dict with keys {list(need)}")
        boxes, labels = d["boxes"], d["labels"]
        if not _is_float(boxes) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise _fail(who, task, outputs, f"'{key}'[{i}]['boxes'] must be a float tensor of shape (K, 4) (xyxy)")
        k = boxes.shape[0]
        if not _is_int(labels) or labels.shape != (k,):
            raise _fail(
                who, task, outputs, f"'{key}'[{i}]['labels'] must be an integer tensor of shape ({k},) like its boxes"
            )
        item = {"boxes": boxes, "labels": labels.long()}
        if "scores" in need:
            scores = d["scores"]
            if not _is_float(scores) or scores.shape != (k,):
                raise _fail(who, task, outputs, f"'{key}'[{i}]['scores'] must be a float tensor of shape ({k},)")
            item["scores"] = scores
        out.append(item)
    return out


def check_outputs(task: str, outputs: Any, num_classes: int | None = None, who: str = "callback") -> TaskOutput:
    """Check ``outputs`` (already in the convention) against ``task``'s format and return them typed.

    Args:
        task: One of :data:`TASKS` (or a short name).
        outputs: What ``validation_step``/``test_step`` (or ``output_fn``) returned.
        num_classes: When given, the class dimension of the logits must equal it.
        who: The callback's name, for messages.

    Raises:
        ValueError: naming ``who``, the expected format and what arrived.

    Example::

        >>> out = check_outputs("classification", {"logits": torch.zeros(4, 3), "targets": torch.zeros(4, dtype=torch.long)})
        >>> out.logits.shape
        torch.Size([4, 3])
    """
    task = normalize_task(task, who)
    if task == "classification":
        return ClassificationOutput(*_dense(task, outputs, who, num_classes, spatial=False))
    if task == "semantic-segmentation":
        return SegmentationOutput(*_dense(task, outputs, who, num_classes, spatial=True))
    if not isinstance(outputs, Mapping) or "preds" not in outputs or "targets" not in outputs:
        raise _fail(who, task, outputs, "expected a dict with keys 'preds' and 'targets'")
    preds = _det_dicts(task, outputs, who, "preds", outputs["preds"], ("boxes", "scores", "labels"))
    targets = _det_dicts(task, outputs, who, "targets", outputs["targets"], ("boxes", "labels"))
    if len(preds) != len(targets):
        raise _fail(who, task, outputs, f"{len(preds)} 'preds' dicts but {len(targets)} 'targets' dicts (one per image)")
    if num_classes is not None:
        for name, items in (("preds", preds), ("targets", targets)):
            for i, d in enumerate(items):
                if d["labels"].numel() and (int(d["labels"].min()) < 0 or int(d["labels"].max()) >= num_classes):
                    raise _fail(
                        who, task, outputs,
                        f"'{name}'[{i}]['labels'] has values outside [0, {num_classes - 1}] (num_classes={num_classes}); "
                        "labels are class indices (with a background class, count it in num_classes)",
                    )
    return DetectionOutput(preds, targets)


def adapt_outputs(
    task: str,
    outputs: Any,
    batch: Any = None,
    output_fn: OutputFn | None = None,
    num_classes: int | None = None,
    who: str = "callback",
) -> TaskOutput:
    """Map step ``outputs`` (through ``output_fn`` when given) to the checked format of ``task``.

    Args:
        task: One of :data:`TASKS` (or a short name).
        outputs: What ``validation_step``/``test_step`` returned.
        batch: The batch, passed to ``output_fn``.
        output_fn: ``fn(outputs, batch) -> dict`` in the task's format (resolve strings with
            :func:`load_output_fn` first).
        num_classes: When given, checked against the logits / labels.
        who: The callback's name, for messages.

    Raises:
        ValueError: when the result is not in the task's format (names ``who``, the format and what arrived).

    Example::

        out = adapt_outputs("classification", step_outputs, batch, output_fn=lambda o, b: {"logits": o, "targets": b[1]})
    """
    if output_fn is not None:
        name = getattr(output_fn, "__qualname__", repr(output_fn))
        mapped = output_fn(outputs, batch)
        try:
            return check_outputs(task, mapped, num_classes, who)
        except ValueError as err:
            raise ValueError(f"{err} (these came from output_fn {name})") from None
    if outputs is None:
        raise _fail(
            who, normalize_task(task, who), outputs,
            "validation_step/test_step returned None (the callback reads predictions from the step's return value)",
        )
    return check_outputs(task, outputs, num_classes, who)
