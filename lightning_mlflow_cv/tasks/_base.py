"""The contract of a CV task, and the helpers every task module shares (no Trainer, no MLflow).

A task is one :class:`CVTask` subclass in its own module. It defines, once:

- its canonical ``name`` (the logger's ``task`` tag value) and short ``aliases``;
- its **output convention**: what ``validation_step``/``test_step`` return (``expected_format``), split in a
  prediction part (what ``forward`` returns, ``expected_output``) and a target part (what the batch holds,
  ``expected_target``), checked by ONE pair of functions (:meth:`CVTask.check_preds`,
  :meth:`CVTask.check_targets`) whatever callback reads them;
- its **metric preset** (torchmetrics states, synchronised under DDP): :meth:`CVTask.build_metrics`,
  :meth:`CVTask.update_metrics`, :meth:`CVTask.compute`;
- its **prediction panel**: :meth:`CVTask.panel`, and the ground truth alone, :meth:`CVTask.target_panel`
  (augmentation samples);
- its **per-image badness**: :meth:`CVTask.badness` (higher = worse, NaN = not a mistake), which ranks the
  prediction grid's worst mistakes, and :meth:`CVTask.take` (the outputs of some images of a batch);
- its **servable post-processing**: ``postprocess``, a kind understood by the self-contained
  :mod:`lightning_mlflow_cv._shipping.pyfunc` (which travels inside every logged model), and :meth:`CVTask.served_metrics`
  for :func:`~lightning_mlflow_cv.evaluation.evaluate`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

OutputFn = Callable[[Any, Any], Mapping[str, Any]]


# ----------------------------------------------------------------------------------------------
# descriptions for error messages
# ----------------------------------------------------------------------------------------------
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


def describe_short(obj: Any, depth: int = 0) -> str:
    """A compact description (``Tensor(4, 10) float32``, ``list[3] of ...``), used by the image callbacks."""
    if isinstance(obj, Tensor):
        return f"Tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k!r}: {describe_short(v, depth + 1)}" for k, v in list(obj.items())[:6])
        return f"{type(obj).__name__}{{{inner}}}"
    if isinstance(obj, (list, tuple)):
        first = f" of {describe_short(obj[0], depth + 1)}" if obj else ""
        return f"{type(obj).__name__}[{len(obj)}]{first}"
    return type(obj).__name__


# ----------------------------------------------------------------------------------------------
# the one mapping hook: fn(outputs, batch) -> dict in the task's format, by callable or import path
# ----------------------------------------------------------------------------------------------
def load_output_fn(spec: str | OutputFn | None, who: str = "callback", arg: str = "output_fn") -> OutputFn | None:
    """Resolve ``output_fn``: a callable as is, or an import path ``"pkg.module:fn"`` / ``"pkg.module.fn"``.

    Raises:
        ValueError: when the path cannot be imported or does not name a callable.

    Example::

        >>> fn = load_output_fn("lightning_mlflow_cv.tasks:describe")
        >>> fn is describe
        True
    """
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{who}: `{arg}` must be a callable or an import path string like 'my_pkg.module:fn', got {spec!r}."
        )
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"{who}: `{arg}` import path {spec!r} is not of the form 'pkg.module:fn' or 'pkg.module.fn'. "
            "Fix: name the module and the function, e.g. 'my_project.outputs:to_cv_format'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{who}: `{arg}` {spec!r}: module {module_name!r} cannot be imported ({err}). "
            "Fix: check the spelling and that the module is on PYTHONPATH."
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{who}: `{arg}` {spec!r}: module {module_name!r} has no attribute {attr!r}. "
                "Fix: check the function name."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{who}: `{arg}` {spec!r} names a {type(obj).__name__}, not a function.")
    return obj


# ----------------------------------------------------------------------------------------------
# format problems: raised by the checks, worded by the caller
# ----------------------------------------------------------------------------------------------
class FormatProblem(Exception):
    """A part of the outputs (``"preds"`` or ``"targets"``) does not follow the task's convention."""

    def __init__(self, part: str, text: str) -> None:
        super().__init__(text)
        self.part = part
        self.text = text


def is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def is_int(t: Any) -> bool:
    return isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def is_seq(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes, Tensor))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den == 0``."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, float("nan")))


def num(v: Any) -> float | None:
    """A finite float, or None (tables: NaN and inf become empty cells)."""
    import math

    f = float(v)
    return None if math.isnan(f) or math.isinf(f) else f


@dataclass
class PanelOptions:
    """What a prediction panel may use besides the sample: names, thresholds, display settings."""

    class_names: Sequence[str] | None = None
    score_threshold: float = 0.5
    background_class: int | None = None
    #: Segmentation targets drawn alone: classes to colour (default: the largest id in the mask + 1).
    num_classes: int | None = None
    #: Caption text size in pixels (the prediction grid scales it with the tile size).
    font_size: int = 12
    #: Anomaly detection: the score above which an image counts as anomalous, for :meth:`CVTask.badness`
    #: (None: 0, i.e. scores centred at the decision threshold).
    decision_threshold: float | None = None


class CVTask:
    """One CV task: output convention, metric preset, prediction panel and served post-processing.

    Subclasses set the class attributes and implement the methods; :func:`~lightning_mlflow_cv.tasks.register`
    makes them known to every callback. ``self`` holds no state: the callbacks keep the metric objects.
    """

    #: Canonical name (the logger's ``task`` tag value).
    name: ClassVar[str] = ""
    #: Short names accepted everywhere a task is named.
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Whether the task has classes (then ``num_classes`` is asked for).
    has_classes: ClassVar[bool] = True
    #: Key of the prediction part in the step-output dict.
    pred_key: ClassVar[str] = "preds"
    #: The step-output format (``validation_step``/``test_step`` or ``output_fn``), shown in messages.
    expected_format: ClassVar[str] = ""
    #: What ``forward`` returns (the prediction part), shown by the image callbacks.
    expected_output: ClassVar[str] = ""
    #: What the batch's targets look like, shown by the image callbacks.
    expected_target: ClassVar[str] = ""
    #: Post-processing kind of the servable pyfunc (see :mod:`lightning_mlflow_cv._shipping.pyfunc`).
    postprocess: ClassVar[str] = "none"
    #: Metric that a higher value is better of, for docs/examples (``val/<key>``).
    main_metric: ClassVar[str] = ""
    #: What :meth:`badness` measures, shown under each panel of the worst-mistakes grid.
    badness_name: ClassVar[str] = "badness"

    # -- output convention -----------------------------------------------------------------------
    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> Any:
        """The prediction part, normalised; ``n`` is the batch size when known. Raises :class:`FormatProblem`."""
        raise NotImplementedError

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> Any:
        """The target part for checked ``preds`` of batch size ``n``, normalised. Raises :class:`FormatProblem`."""
        raise NotImplementedError

    def align_for_display(self, preds: Any, targets: Any) -> Any:
        """Predictions made comparable to the targets for drawing (e.g. logits upsampled); default: as is."""
        return preds

    def batch_size(self, preds: Any) -> int:
        """The batch size of checked predictions."""
        return len(preds)

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> Any:
        """The typed output of checked parts (``extra``: the rest of the step-output dict)."""
        raise NotImplementedError

    def split_step_outputs(self, outputs: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(preds, targets)`` of a step-output dict that has the required keys."""
        return outputs[self.pred_key], outputs["targets"]

    def to_cpu(self, out: Any) -> Any:
        """A typed output detached and on the CPU (the image callbacks draw from it)."""
        import dataclasses

        def cpu(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.detach().cpu()
            if isinstance(v, list):
                return [cpu(x) for x in v]
            if isinstance(v, dict):
                return {k: cpu(x) for k, x in v.items()}
            return v

        return dataclasses.replace(out, **{f.name: cpu(getattr(out, f.name)) for f in dataclasses.fields(out)})

    # -- metric preset ----------------------------------------------------------------------------
    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        """The torchmetrics objects of one stage; ``cfg`` is the ``CVMetricsCallback`` (its arguments)."""
        raise NotImplementedError

    def update_metrics(self, metrics: dict[str, Any], out: Any) -> None:
        """Feed one batch of checked outputs."""
        raise NotImplementedError

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """Synchronised ``(scalars without the stage prefix, snapshot for plots and tables)``."""
        raise NotImplementedError

    # -- prediction panel -------------------------------------------------------------------------
    def panel(self, img: Tensor, src_size: tuple[int, int], out: Any, i: int, opts: PanelOptions) -> Tensor:
        """Panel of sample ``i`` of a checked CPU output: ``img`` is the display image (``uint8`` ``(3, h, w)``),
        ``src_size`` the model input's ``(H, W)``."""
        raise NotImplementedError

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        """Panel of one sample's checked CPU target alone (no prediction), drawn as :meth:`panel` draws the
        ground truth: ``target`` is one item of :meth:`check_targets`' result."""
        raise NotImplementedError

    # -- worst mistakes ---------------------------------------------------------------------------
    def badness(self, out: Any, opts: PanelOptions) -> Tensor:
        """How bad the prediction on each image of a checked output is: a float ``(N,)`` tensor, higher = worse,
        NaN (or <= 0) where the image is not a mistake. Pure: reads only ``out`` and ``opts``."""
        raise NotImplementedError

    def take(self, out: Any, index: Sequence[int]) -> Any:
        """The typed output of images ``index`` of a checked output (tensor fields indexed in dim 0, per-image
        lists picked, ``None`` kept), e.g. to keep a few images of a batch."""
        import dataclasses

        idx = list(index)

        def pick(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v[torch.as_tensor(idx, dtype=torch.long, device=v.device)]
            if isinstance(v, list):
                return [v[i] for i in idx]
            return v

        return dataclasses.replace(out, **{f.name: pick(getattr(out, f.name)) for f in dataclasses.fields(out)})

    # -- servable model ---------------------------------------------------------------------------
    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        """Metrics of the served model's predictions (one item per batch) against the targets, for ``evaluate``."""
        raise NotImplementedError(f"evaluate() does not support task {self.name!r} yet")


def logits_and_batch_targets(outputs: Any, batch: Any) -> dict[str, Any]:
    """A ready-made ``output_fn``: the step returned raw logits (or a dict with ``"logits"``) and the batch is
    ``(inputs, targets, ...)`` or a dict with ``"targets"``/``"target"``/``"labels"``/``"label"``/``"mask"``.

    Works for classification and semantic segmentation. In YAML:
    ``output_fn: lightning_mlflow_cv.tasks:logits_and_batch_targets``.

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
