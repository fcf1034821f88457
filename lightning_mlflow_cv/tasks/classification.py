"""Classification: logits ``(N, C)`` and integer targets ``(N,)``; top-1/top-k accuracy, macro P/R/F1,
per-class F1, confusion matrix, PR/ROC curves; the served model returns softmax probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv.tasks._base import CVTask, PanelOptions, num
from lightning_mlflow_cv.tasks._dense import (
    check_index_targets,
    check_logits,
    confusion_stats,
)
from lightning_mlflow_cv.tasks._registry import register


@dataclass(frozen=True)
class ClassificationOutput:
    """Checked classification outputs: ``logits`` ``(N, C)`` float, ``targets`` ``(N,)`` long."""

    logits: Tensor
    targets: Tensor


def _curve_cpu(curve: Any) -> tuple[Any, Any, Any]:
    def cpu(x: Any) -> Any:
        return [t.cpu() for t in x] if isinstance(x, (list, tuple)) else x.cpu()

    return tuple(cpu(x) for x in curve)


def confident_errors(logits: Tensor, targets: Tensor) -> Tensor:
    """Per image: the softmax probability of the predicted class when the prediction is wrong, NaN when it is
    right, so the most confident mistakes rank worst.

    Example::

        >>> confident_errors(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([1, 1, 1])).tolist()
        [0.8807970285415649, nan, 0.7310585975646973]
    """
    prob = logits.detach().float().softmax(-1)
    conf, pred = prob.max(-1)
    return torch.where(pred != targets.to(pred.device), conf, torch.full_like(conf, float("nan")))


class Classification(CVTask):
    """``"classification"``: ``{"logits": (N, C) float, "targets": (N,) int}``."""

    name = "classification"
    pred_key = "logits"
    expected_format = '{"logits": (N, C) float tensor, "targets": (N,) integer tensor}'
    expected_output = "logits Tensor (N, C) with N = batch size"
    expected_target = "integer class ids Tensor (N,)"
    postprocess = "softmax"
    main_metric = "top1_acc"
    badness_name = "conf"

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> Tensor:
        return check_logits(preds, n, num_classes, spatial=False)

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> Tensor:
        return check_index_targets(targets, preds, spatial=False, n=n)

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> ClassificationOutput:
        return ClassificationOutput(preds, targets)

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        from torchmetrics import MetricCollection
        from torchmetrics import classification as C

        n = cfg.num_classes
        return {
            "scalars": MetricCollection(
                {
                    "top1_acc": C.MulticlassAccuracy(n, top_k=1, average="micro"),
                    "top5_acc": C.MulticlassAccuracy(n, top_k=cfg.top_k, average="micro"),
                    "precision": C.MulticlassPrecision(n, average="macro"),
                    "recall": C.MulticlassRecall(n, average="macro"),
                    "f1": C.MulticlassF1Score(n, average="macro"),
                    "per_class_f1": C.MulticlassF1Score(n, average=None),
                },
                compute_groups=False,
            ),
            "confmat": C.MulticlassConfusionMatrix(n),
            "pr": C.MulticlassPrecisionRecallCurve(n, thresholds=cfg.curve_thresholds),
            "roc": C.MulticlassROC(n, thresholds=cfg.curve_thresholds),
        }

    def update_metrics(self, metrics: dict[str, Any], out: ClassificationOutput) -> None:
        logits, targets = out.logits.detach().float(), out.targets
        metrics["scalars"].update(logits, targets)
        metrics["confmat"].update(logits.argmax(1), targets)
        probs = logits.softmax(1)
        metrics["pr"].update(probs, targets)
        metrics["roc"].update(probs, targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        from torchmetrics.functional.classification.auroc import _reduce_auroc
        from torchmetrics.functional.classification.average_precision import (
            _reduce_average_precision,
        )

        names = cfg.class_names
        scalars: dict[str, float] = {}
        res = metrics["scalars"].compute()
        for k in ("top1_acc", "top5_acc", "precision", "recall", "f1"):
            scalars[k] = float(res[k])
        per_f1 = res["per_class_f1"].cpu()
        for i, name in enumerate(names):
            scalars[f"per_class_f1/{name}"] = float(per_f1[i])
        confmat = metrics["confmat"].compute().cpu()
        pr = _curve_cpu(metrics["pr"].compute())
        roc = _curve_cpu(metrics["roc"].compute())
        auc = _reduce_auroc(roc[0], roc[1], average=None).cpu()
        ap = _reduce_average_precision(pr[0], pr[1], average=None).cpu()
        stats = confusion_stats(confmat)
        snap: dict[str, Any] = {"confmat": confmat, "pr": pr, "roc": roc, "auc": auc, "ap": ap, "curve_labels": names}
        snap["table"] = [
            {
                "class": name,
                "support": int(stats["support"][i]),
                "precision": num(stats["precision"][i]),
                "recall": num(stats["recall"][i]),
                "f1": num(per_f1[i]),
                "roc_auc": num(auc[i]),
                "average_precision": num(ap[i]),
            }
            for i, name in enumerate(names)
        ]
        return scalars, snap

    def panel(self, img: Tensor, src_size: tuple[int, int], out: ClassificationOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        prob = out.logits[i].float().softmax(-1)
        pred = int(prob.argmax())
        return _panels.classification_panel(
            img, int(out.targets[i]), pred, float(prob[pred]), opts.class_names, font_size=opts.font_size
        )

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        return _panels.classification_panel(img, int(target), class_names=opts.class_names, font_size=opts.font_size)

    def badness(self, out: ClassificationOutput, opts: PanelOptions) -> Tensor:
        return confident_errors(out.logits, out.targets)

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        raise NotImplementedError("classification is evaluated with mlflow.models.evaluate in evaluation.evaluate")


TASK = register(Classification)
