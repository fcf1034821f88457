"""Anomaly detection: one score per image (higher = more anomalous) and binary targets; AUROC, AUPRC, the F1 at
the best threshold and that threshold; PR and ROC curves; the served model returns the score (and map)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.tasks._base import (
    CVTask,
    FormatProblem,
    PanelOptions,
    is_float,
    is_int,
)
from lightning_mlflow_cv.tasks._registry import register


@dataclass(frozen=True)
class AnomalyOutput:
    """Checked anomaly outputs: ``scores`` ``(N,)`` float, ``targets`` ``(N,)`` long in {0, 1}, optional
    ``maps`` ``(N, H, W)`` float."""

    scores: Tensor
    targets: Tensor
    maps: Tensor | None = None


def anomaly_scores(scores: Tensor, targets: Tensor) -> dict[str, Any]:
    """AUROC, AUPRC (average precision), best-F1 threshold and curves of raw ``scores`` against binary ``targets``.

    torchmetrics' exact (unbinned) binary curve computations on the scores as given (no sigmoid: thresholds stay
    in the model's score units). The best threshold maximises F1 over the PR curve's thresholds; a sample is
    anomalous when ``score >= best_threshold``. With only one class present AUROC/AUPRC are NaN.

    Example::

        >>> r = anomaly_scores(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        >>> round(float(r["AUROC"]), 4), round(float(r["best_threshold"]), 4)
        (0.75, 0.35)
    """
    import warnings

    from torchmetrics.functional.classification.auroc import _binary_auroc_compute
    from torchmetrics.functional.classification.average_precision import (
        _binary_average_precision_compute,
    )
    from torchmetrics.functional.classification.precision_recall_curve import (
        _binary_precision_recall_curve_compute,
    )
    from torchmetrics.functional.classification.roc import _binary_roc_compute

    state = (scores.double(), targets.long())
    pos = int(targets.sum())
    with warnings.catch_warnings():  # one class only: the curves are degenerate and the scores below are NaN
        if not 0 < pos < targets.numel():
            warnings.simplefilter("ignore", UserWarning)
        p, r, t = _binary_precision_recall_curve_compute(state, None)
        roc = _binary_roc_compute(state, None)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    both = 0 < pos < targets.numel()
    auroc = _binary_auroc_compute(state, None) if both else nan
    auprc = _binary_average_precision_compute(state, None) if pos > 0 else nan
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), torch.zeros_like(p))[:-1]  # last: no threshold
    if f1.numel() and pos > 0:
        best = int(f1.argmax())
        best_f1, best_t = f1[best], t[best]
    else:
        best_f1, best_t = nan, nan
    return {
        "AUROC": auroc, "AUPRC": auprc, "F1_at_best_threshold": best_f1, "best_threshold": best_t,
        "pr": (p, r, t), "roc": roc,
    }  # fmt: skip


class AnomalyScores(Metric):
    """Keeps every image's anomaly score and label (``cat`` states: gathered across DDP ranks) and computes
    :func:`anomaly_scores` on all of them.

    Example::

        m = AnomalyScores()
        m.update(scores, targets)
        m.compute()["AUROC"]
    """

    full_state_update = False
    scores: list[Tensor]
    targets: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, targets: Tensor) -> None:
        self.scores.append(scores.detach().double().reshape(-1))
        self.targets.append(targets.detach().long().reshape(-1))

    def compute(self) -> dict[str, Any]:
        from torchmetrics.utilities import dim_zero_cat

        def cat(state: Any, dtype: torch.dtype) -> Tensor:
            if isinstance(state, Tensor) or state:  # a tensor after a DDP sync, else a list of batches
                return dim_zero_cat(state)
            return torch.zeros(0, dtype=dtype, device=self.device)

        scores, targets = cat(self.scores, torch.float64), cat(self.targets, torch.long)
        return anomaly_scores(scores, targets)


def anomaly_errors(scores: Tensor, targets: Tensor, threshold: float | None = None) -> Tensor:
    """Per image: how far its score lies on the wrong side of ``threshold`` (a normal image scored above it, an
    anomalous one below it); <= 0 when it lies on the right side. ``threshold`` None: 0 (scores centred at the
    decision threshold, e.g. logits).

    Example::

        >>> bad = anomaly_errors(torch.tensor([0.9, 0.2, 0.1, 0.8]), torch.tensor([0, 0, 1, 1]), threshold=0.5)
        >>> [round(v, 3) for v in bad.tolist()]  # a false alarm, right, a miss, right
        [0.4, -0.3, 0.4, -0.3]
    """
    s = scores.detach().double() - (0.0 if threshold is None else float(threshold))
    return torch.where(targets.to(s.device) == 1, -s, s)


def _squeeze1(x: Tensor) -> Tensor:
    return x[:, 0] if x.ndim == 2 and x.shape[1] == 1 else x


class AnomalyDetection(CVTask):
    """``"anomaly-detection"`` (``"anomaly"``): ``{"scores": (N,) float, "targets": (N,) in {0, 1}}``, optionally
    ``"maps": (N, H, W)`` per-pixel anomaly maps for the prediction grid."""

    name = "anomaly-detection"
    aliases = ("anomaly",)
    has_classes = False
    pred_key = "scores"
    expected_format = (
        '{"scores": (N,) float tensor (higher = more anomalous), "targets": (N,) integer tensor in {0, 1}, '
        'optional "maps": (N, H, W) float tensor}'
    )
    expected_output = "scores Tensor (N,) (higher = more anomalous), or a dict {'scores': (N,), 'maps': (N, H, W)}"
    expected_target = "labels Tensor (N,) in {0, 1} (1 = anomalous)"
    postprocess = "anomaly"
    main_metric = "AUROC"
    badness_name = "score past threshold"

    def split_step_outputs(self, outputs: Mapping[str, Any]) -> tuple[Any, Any]:
        return {"scores": outputs["scores"], "maps": outputs.get("maps")}, outputs["targets"]

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> tuple[Tensor, Tensor | None]:
        maps = None
        if isinstance(preds, Mapping):
            if "scores" not in preds:
                raise FormatProblem("preds", "expected a dict with key 'scores' (and optionally 'maps')")
            scores, maps = preds["scores"], preds.get("maps")
        else:
            scores = preds
        if isinstance(scores, Tensor):
            scores = _squeeze1(scores)
        if not is_float(scores) or scores.ndim != 1:
            raise FormatProblem("preds", "'scores' must be a float tensor of shape (N,), one score per image")
        if n is not None and scores.shape[0] != n:
            raise FormatProblem("preds", f"'scores' has {scores.shape[0]} values but the batch has {n} images")
        if maps is not None:
            if isinstance(maps, Tensor) and maps.ndim == 4 and maps.shape[1] == 1:
                maps = maps[:, 0]
            if not is_float(maps) or maps.ndim != 3 or maps.shape[0] != scores.shape[0]:
                raise FormatProblem("preds", f"'maps' must be a float tensor of shape ({scores.shape[0]}, H, W)")
        return scores, maps

    def batch_size(self, preds: Any) -> int:
        return int(preds[0].shape[0])

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> Tensor:
        if isinstance(targets, (list, tuple)) and targets and all(isinstance(v, (int, bool)) for v in targets):
            targets = torch.tensor([int(v) for v in targets])
        if isinstance(targets, Tensor) and targets.dtype == torch.bool:
            targets = targets.long()
        if isinstance(targets, Tensor):
            targets = _squeeze1(targets)
        if not is_int(targets) or targets.ndim != 1:
            raise FormatProblem("targets", "'targets' must be an integer tensor of shape (N,) with values 0 or 1")
        if targets.shape[0] != n:
            raise FormatProblem("targets", f"'targets' has {targets.shape[0]} values but 'scores' has {n}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) > 1):
            raise FormatProblem("targets", "'targets' must be 0 (normal) or 1 (anomalous)")
        return targets.long()

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> AnomalyOutput:
        return AnomalyOutput(preds[0], targets, preds[1])

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        return {"scores": AnomalyScores()}

    def update_metrics(self, metrics: dict[str, Any], out: AnomalyOutput) -> None:
        metrics["scores"].update(out.scores, out.targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        res = metrics["scores"].compute()
        keys = ("AUROC", "AUPRC", "F1_at_best_threshold", "best_threshold")
        scalars = {k: float(res[k]) for k in keys}
        p, r, t = (x.cpu() for x in res["pr"])
        roc = tuple(x.cpu() for x in res["roc"])
        snap = {
            "pr": (p, r, t), "roc": roc, "ap": torch.tensor(scalars["AUPRC"]), "auc": torch.tensor(scalars["AUROC"]),
            "curve_labels": None, "summary": scalars,
        }  # fmt: skip
        return scalars, snap

    def panel(self, img: Tensor, src_size: tuple[int, int], out: AnomalyOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        label = int(out.targets[i])
        shown = _pixels.heatmap_overlay(img, out.maps[i]) if out.maps is not None else img
        color = _label_color(label)
        lines = [f"score: {float(out.scores[i]):.4g}", _label_line(label)]
        fs = opts.font_size
        parts = [
            _pixels.caption(img, ["image"], font_size=fs), _pixels.caption(shown, lines, color=color, font_size=fs)
        ] if out.maps is not None else [_pixels.caption(img, lines, color=color, font_size=fs)]  # fmt: skip
        return _pixels.hstack(parts)

    def badness(self, out: AnomalyOutput, opts: PanelOptions) -> Tensor:
        return anomaly_errors(out.scores, out.targets, opts.decision_threshold)

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        label = int(target)
        return _pixels.caption(img, [_label_line(label)], color=_label_color(label), font_size=opts.font_size)

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        import numpy as np

        scores = torch.from_numpy(
            np.concatenate([np.asarray(p["scores"] if isinstance(p, Mapping) else p) for p in preds])
        )
        y = torch.cat([torch.as_tensor(t).reshape(-1) for t in targets])
        res = anomaly_scores(scores, y)
        return {k: float(res[k]) for k in ("AUROC", "AUPRC", "F1_at_best_threshold", "best_threshold")}


def _label_line(label: int) -> str:
    return f"label: {'anomalous' if label else 'normal'}"


def _label_color(label: int) -> tuple[int, int, int]:
    return _pixels.RED if label == 1 else _pixels.GREEN


TASK = register(AnomalyDetection)
