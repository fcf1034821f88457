"""CVMetricsCallback: the usual CV metric tables, confusion matrices and curves, logged to MLflow.

The hooks are thin: metric states and their computation live with each task in :mod:`lightning_mlflow_cv.tasks`,
tables, figures and the best-epoch rule in :mod:`lightning_mlflow_cv.metrics`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from typing_extensions import override

from lightning_mlflow_cv import tasks as _tasks
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.metrics.best_epoch import fit_summary, is_new_best, resolve_monitor
from lightning_mlflow_cv.metrics.functional import (
    confusion_matrix_record,
    integer_bincount_allowed,
    normalize_by_true_class,
    table_csv,
)
from lightning_mlflow_cv.metrics.plots import confusion_matrix_figure, confusion_matrix_image, curve_figure
from lightning_mlflow_cv.tasks import adapt_outputs, load_output_fn

__all__ = ["CVMetricsCallback"]

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.typing import LegendLocType

WHO = "CVMetricsCallback"
Stage = Literal["val", "test"]
STAGES: tuple[str, ...] = ("val", "test")
#: Artifact folder of the plots and tables: ``cv_metrics/<stage>/...``.
ARTIFACT_DIR = "cv_metrics"
#: Image series of the per-epoch confusion matrix (``MLflowCVLogger.log_image`` key).
HISTORY_KEY = "val/confusion_matrix"


def _stage(trainer: pl.Trainer) -> str:
    """``"test"`` inside ``trainer.test``, else ``"val"`` (fit's validation loop, ``trainer.validate``)."""
    return "test" if trainer.testing else "val"


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------
class CVMetricsCallback(Callback):
    """Metric presets for classification, object detection and semantic segmentation, built on torchmetrics.

    Reads predictions from what ``validation_step``/``test_step`` return (the output convention in
    :mod:`lightning_mlflow_cv.tasks`, or ``output_fn``), accumulates torchmetrics states on every rank
    (synchronised under DDP) and logs, with the stage as prefix (``val/...``, ``test/...``):

    - **classification**: ``top1_acc``, ``top5_acc`` (k capped at ``num_classes``), macro ``precision``,
      ``recall``, ``f1`` and ``per_class_f1/<class>``;
    - **object-detection**: ``mAP50``, ``mAP50-95`` (``MeanAveragePrecision``, COCO definition),
      ``precision`` and ``recall`` (macro over classes seen, from greedy matching at ``iou_threshold`` of the
      predictions scoring at least ``score_threshold``);
    - **semantic-segmentation**: ``mIoU`` (mean over classes present in targets or predictions),
      ``pixel_acc`` and ``per_class_IoU/<class>``;
    - **instance-segmentation**: ``mask_AP``, ``bbox_AP`` (COCO AP over IoU 0.50:0.95), ``mask_AP50``,
      ``bbox_AP50`` (``MeanAveragePrecision(iou_type=("bbox", "segm"))``), per-class mask/box AP in the table;
    - **anomaly-detection** (no classes): ``AUROC``, ``AUPRC``, ``F1_at_best_threshold`` and ``best_threshold``
      (exact, on the raw scores), PR and ROC curve plots;
    - **depth-estimation** (no classes): ``AbsRel``, ``SqRel``, ``RMSE``, ``RMSE_log``, ``delta_1``,
      ``delta_2``, ``delta_3`` over valid target pixels (finite and > 0; sum states, exact under DDP).

    The output conventions and presets live in :mod:`lightning_mlflow_cv.tasks`, one module per task.

    Scalars are logged every validation epoch (not during the sanity check) with ``pl_module.log``, so
    ``ModelCheckpoint``/``EarlyStopping`` can monitor them (e.g. ``monitor="val/mAP50"``); the step is the
    Trainer's global step, like the model's own ``val/loss``.

    Plots and tables are logged once, under ``cv_metrics/<stage>/``: at fit end for the best validation epoch
    (judged by ``monitor``/``mode``, by default those of the Trainer's ``ModelCheckpoint``; its confusion
    state is kept) or the last one, and at the end of ``trainer.test``/``trainer.validate``:

    - ``confusion_matrix.png``, ``confusion_matrix_normalized.png`` (rows sum to 1),
      ``confusion_matrix.json`` (classification, segmentation);
    - ``pr_curve.png`` and ``roc_curve.png`` with per-class AP/AUC in the legend (classification);
    - ``per_class.json`` and ``per_class.csv``: per-class precision/recall/F1/AUC, IoU, AP50-95/AP50/AR100 or
      mask/box AP (tasks with classes); ``summary.json`` (anomaly detection, depth estimation).

    At fit end the summary metrics ``best/<monitor>``, ``best/epoch`` and ``time/train_hrs`` are logged.

    For the tasks with a confusion matrix (classification, semantic segmentation), every validation epoch of
    ``trainer.fit`` also logs the confusion matrix normalised by true class as the image series
    ``val/confusion_matrix`` at step = epoch (as ``PredictionGridCallback`` does, which says why), so the MLflow
    UI's image card opens on the first epoch and shows its history with a step slider
    (``confusion_matrix_history=False`` turns it off).

    Under DDP every rank computes (torchmetrics syncs the states) and only global rank 0 writes. Note that a
    ``DistributedSampler`` pads the validation set to a multiple of the world size by repeating samples,
    which then count twice.

    Args:
        task: A task of :mod:`lightning_mlflow_cv.tasks`: ``"classification"``, ``"object-detection"``,
            ``"semantic-segmentation"``, ``"instance-segmentation"``, ``"anomaly-detection"``,
            ``"depth-estimation"`` (short names ``"detection"``, ``"segmentation"``, ``"instance"``,
            ``"anomaly"``, ``"depth"``).
        num_classes: Number of classes (for detection: label values are ``0 .. num_classes - 1``, a
            background class included if the model has one). Only for tasks with classes: leave it out for
            anomaly detection and depth estimation.
        class_names: One name per class (default ``"0"``, ``"1"``, ...), used in metric keys and plots.
        stages: Where to compute: any of ``"val"``, ``"test"``.
        output_fn: ``fn(outputs, batch) -> dict`` in the task's format, or its import path
            (``"pkg.module:fn"``) for YAML, when ``validation_step`` returns something else.
        top_k: The k of the second accuracy (logged as ``top5_acc``), capped at ``num_classes``.
        ignore_index: Segmentation target value to ignore (e.g. 255).
        iou_threshold: Detection IoU of a true positive for ``precision``/``recall``.
        score_threshold: Detection score below which predictions are ignored for ``precision``/``recall``.
        curve_thresholds: Thresholds of the PR/ROC curves: an int bins scores into that many thresholds
            (constant memory); ``None`` keeps every score (exact, memory grows with the dataset).
        monitor: Metric that decides the best epoch; default: the ``ModelCheckpoint``'s monitor (if any).
        mode: ``"min"`` or ``"max"`` for ``monitor``; default: the ``ModelCheckpoint``'s mode, else ``"max"``.
        detection_backend: Backend of ``MeanAveragePrecision``: ``"pycocotools"`` or ``"faster_coco_eval"``.
        max_plot_classes: Above this many classes, the curve plots are skipped (the tables keep AUC) and
            the confusion matrix plots have no cell text.
        confusion_matrix_history: Log the confusion matrix image ``val/confusion_matrix`` every validation
            epoch of a fit (tasks with a confusion matrix); the fit-end ``cv_metrics/val/`` files are logged
            either way.

    Raises:
        ValueError: for an unknown task or stage, a ``num_classes`` below 2, ``class_names`` of the wrong
            length, a bad threshold or ``mode``, a ``confusion_matrix_history`` that is not a bool, or an
            ``output_fn`` that cannot be imported.
        RuntimeError: at setup, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback

        trainer = Trainer(
            logger=MLflowCVLogger(experiment_name="digits"),
            callbacks=[
                ModelCheckpoint(monitor="val/f1", mode="max"),
                CVMetricsCallback(task="classification", num_classes=10, class_names=[str(i) for i in range(10)]),
            ],
        )
        trainer.fit(model, datamodule=dm)   # val/top1_acc, val/f1, ... every epoch; plots of the best epoch
        trainer.test(model, datamodule=dm)  # test/top1_acc, ... and cv_metrics/test/*.png
    """

    def __init__(
        self,
        task: str,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        stages: Sequence[Stage] = ("val", "test"),
        output_fn: str | Callable[[Any, Any], Any] | None = None,
        top_k: int = 5,
        ignore_index: int | None = None,
        iou_threshold: float = 0.5,
        score_threshold: float = 0.5,
        curve_thresholds: int | None = 200,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        detection_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
        max_plot_classes: int = 30,
        confusion_matrix_history: bool = True,
    ) -> None:
        super().__init__()
        self._task = _tasks.get_task(task, WHO)
        self.task: str = self._task.name
        if not self._task.has_classes:
            if num_classes is not None or class_names is not None:
                raise ValueError(
                    f"{WHO}: task={self.task!r} has no classes, got num_classes={num_classes!r}, "
                    f"class_names={class_names!r}. Fix: leave both out, e.g. CVMetricsCallback(task={self.task!r})."
                )
            num_classes = 0
        else:
            num_classes = _checks.check_int(
                WHO,
                "num_classes",
                num_classes,
                2,
                fix="pass the number of classes the model predicts (binary tasks: 2)",
            )
        #: Number of classes (0 for tasks without classes: anomaly detection, depth estimation).
        self.num_classes: int = num_classes
        if class_names is None:
            names = [str(i) for i in range(num_classes)]
        elif isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise ValueError(
                f"{WHO}: `class_names` must be a list of {num_classes} strings, got {type(class_names).__name__}. "
                "Fix: pass e.g. class_names=['cat', 'dog']."
            )
        else:
            names = [str(n) for n in class_names]
            if len(names) != num_classes:
                raise ValueError(
                    f"{WHO}: `class_names` has {len(names)} names but num_classes={num_classes}: {names[:10]}. "
                    "Fix: give exactly one name per class (for detection with a background class, include it)."
                )
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"{WHO}: `class_names` must be unique, these repeat: {dup}. Fix: rename them.")
        self.class_names: list[str] = names
        picked: tuple[str, ...] = (stages,) if isinstance(stages, str) else tuple(stages)  # YAML/CLI pass a str
        bad = [s for s in picked if s not in STAGES]
        if bad or not picked:
            raise ValueError(
                f"{WHO}: `stages` must be a non-empty subset of {list(STAGES)}, got {list(picked)}. "
                "Fix: e.g. stages=['val', 'test']."
            )
        self.stages: tuple[str, ...] = tuple(dict.fromkeys(picked))
        self._output_fn_spec = output_fn
        self.output_fn = load_output_fn(output_fn, WHO)
        _checks.check_int(WHO, "top_k", top_k, fix="e.g. top_k=5")
        self.top_k = min(top_k, num_classes) if num_classes else top_k
        self.ignore_index = _checks.check_int(WHO, "ignore_index", ignore_index, None, allow_none=True, fix="e.g. 255")
        for name, val in (("iou_threshold", iou_threshold), ("score_threshold", score_threshold)):
            _checks.check_number(WHO, name, val, 0, 1, fix=f"e.g. {name}=0.5")
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.curve_thresholds = _checks.check_int(
            WHO, "curve_thresholds", curve_thresholds, 2, allow_none=True,
            must="an int >= 2 (binned curves) or None (exact)", fix="e.g. curve_thresholds=200",
        )  # fmt: skip
        _checks.check_choice(WHO, "mode", mode, ("min", "max", None), fix="mode='max'")
        _checks.check_text(WHO, "monitor", monitor, allow_none=True, strip=False, must="a metric name", fix="'val/f1'")
        self._monitor_arg = monitor
        self._mode_arg = mode
        _checks.check_choice(WHO, "detection_backend", detection_backend, ("pycocotools", "faster_coco_eval"))
        self.detection_backend = detection_backend
        self.max_plot_classes = _checks.check_int(
            WHO, "max_plot_classes", max_plot_classes, fix="e.g. max_plot_classes=30"
        )
        self.confusion_matrix_history = _checks.check_bool(
            WHO, "confusion_matrix_history", confusion_matrix_history,
            fix="confusion_matrix_history=False to log the confusion matrix only at fit end",
        )  # fmt: skip

        self._metrics: dict[str, dict[str, Metric]] = {}
        self._updated: dict[str, bool] = {}
        self._devices: dict[str, torch.device] = {}
        self.monitor: str | None = monitor
        self.mode: Literal["min", "max"] = mode or "max"
        # state (state_dict)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_snapshot: dict[str, Any] | None = None
        self.last_epoch: int | None = None
        self.last_snapshot: dict[str, Any] | None = None
        self.train_time_s: float = 0.0
        self._fit_start: float | None = None

    # ------------------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------------------
    def _build(self) -> dict[str, Metric]:
        return self._task.build_metrics(self)

    def _metrics_for(self, stage: str, device: torch.device) -> dict[str, Metric]:
        metrics = self._metrics.get(stage)
        if metrics is None:
            metrics = self._metrics[stage] = self._build()
        if self._devices.get(stage) != device:
            for m in metrics.values():
                m.to(device)
            self._devices[stage] = device
        return metrics

    def _update(self, stage: str, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        out = adapt_outputs(self.task, outputs, batch, self.output_fn, self.num_classes or None, WHO)
        metrics = self._metrics_for(stage, pl_module.device)
        self._updated[stage] = True
        with integer_bincount_allowed():
            self._update_metrics(metrics, out)

    def _update_metrics(self, metrics: dict[str, Metric], out: Any) -> None:
        self._task.update_metrics(metrics, out)

    def _compute(self, stage: str) -> tuple[dict[str, float], dict[str, Any]]:
        """Synchronised results: (scalars without the stage prefix, snapshot for plots and tables). Resets."""
        metrics = self._metrics[stage]
        scalars, snap = self._task.compute(metrics, self)
        snap = {"task": self.task, **snap}
        self._reset(stage)
        self._updated[stage] = False
        return scalars, snap

    # ------------------------------------------------------------------------------------------
    # plots and tables (rank zero)
    # ------------------------------------------------------------------------------------------
    def _log_artifacts(self, trainer: pl.Trainer, stage: str, snap: dict[str, Any], epoch: int | None) -> None:
        """The ``cv_metrics/<stage>/`` files of one snapshot: confusion matrices, curves, tables, summary."""
        if not trainer.is_global_zero:
            return
        logger = find_mlflow_logger(trainer, WHO)
        base = f"{ARTIFACT_DIR}/{stage}"
        names = self.class_names
        many = self.num_classes > self.max_plot_classes
        at_epoch = f", epoch {epoch}" if epoch is not None else ""
        if "confmat" in snap:
            cm = snap["confmat"]
            for suffix, val, title in (
                ("", cm, "counts"),
                ("_normalized", normalize_by_true_class(cm), "normalised by true class"),
            ):
                fig = confusion_matrix_figure(val, names, f"{stage} confusion matrix ({title}){at_epoch}", not many)
                logger.log_figure(f"{base}/confusion_matrix{suffix}.png", fig)
            logger.log_dict(confusion_matrix_record(cm, names, stage, epoch), f"{base}/confusion_matrix.json")
        if "roc" in snap and not many:
            p, r, t = snap["pr"]
            roc_axes = ("False positive rate", "True positive rate")
            loc: LegendLocType
            for fname, curve, score, axes, title, loc in (
                ("pr_curve", (r, p, t), snap["ap"], ("Recall", "Precision"), "precision-recall (AP)", "lower left"),
                ("roc_curve", snap["roc"], snap["auc"], roc_axes, "ROC (AUC)", "lower right"),
            ):
                fig = curve_figure(curve, score, axes, f"{stage} {title}", snap.get("curve_labels"), loc)
                logger.log_figure(f"{base}/{fname}.png", fig)
        elif "roc" in snap:
            warnings.warn(
                f"{WHO}: {self.num_classes} classes > max_plot_classes={self.max_plot_classes}: PR/ROC curve plots "
                "are skipped (per-class AUC and AP are in per_class.json). Raise max_plot_classes to plot them.",
                UserWarning,
                stacklevel=2,
            )
        if "table" in snap:
            table = snap["table"] or []
            logger.log_dict(
                {"stage": stage, "epoch": epoch, "task": self.task, "classes": table}, f"{base}/per_class.json"
            )
            logger.log_text(table_csv(table), f"{base}/per_class.csv")
        if "summary" in snap:
            logger.log_dict(
                {"stage": stage, "epoch": epoch, "task": self.task, **snap["summary"]}, f"{base}/summary.json"
            )

    def _log_confusion_history(self, trainer: pl.Trainer, confmat: torch.Tensor) -> None:
        """One ``val/confusion_matrix`` image (PIL-drawn, a few ms) per epoch, at step = epoch (as the prediction grid:
        MLflow 3.17's image card opens at step 0)."""
        title = f"val confusion matrix (normalised by true class), epoch {trainer.current_epoch}"
        text = self.num_classes <= self.max_plot_classes
        image = confusion_matrix_image(normalize_by_true_class(confmat), self.class_names, title, text)
        find_mlflow_logger(trainer, WHO).log_image(HISTORY_KEY, image, step=trainer.current_epoch)

    # ------------------------------------------------------------------------------------------
    # bookkeeping: epoch results, the last and the best epoch, training time
    # ------------------------------------------------------------------------------------------
    def _epoch_end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        if stage not in self.stages or trainer.sanity_checking or stage not in self._metrics:
            return None
        scalars, snap = self._compute(stage)
        for k, v in scalars.items():
            pl_module.log(f"{stage}/{k}", v, on_step=False, on_epoch=True, sync_dist=True)
        return snap

    def _end_validation_epoch(self, trainer: pl.Trainer, snap: dict[str, Any]) -> None:
        self.last_epoch = trainer.current_epoch
        if trainer.state.fn != "fit":  # trainer.validate(): plot now
            self.last_snapshot = None
            self._log_artifacts(trainer, "val", snap, None)
            return
        self.last_snapshot = snap
        if self.confusion_matrix_history and "confmat" in snap and trainer.is_global_zero:
            self._log_confusion_history(trainer, snap["confmat"])

    def _track_best(self, score: Any) -> None:
        if is_new_best(score, self.best_score, self.mode):
            self.best_score = float(score)
            self.best_epoch = self.last_epoch
            self.best_snapshot = self.last_snapshot

    def _log_fit_end(self, trainer: pl.Trainer) -> None:
        use_best = self.monitor is not None and self.best_snapshot is not None
        epoch = self.best_epoch if use_best else self.last_epoch
        snap = self.best_snapshot if use_best else self.last_snapshot
        if snap is not None and "val" in self.stages:
            self._log_artifacts(trainer, "val", snap, epoch)
        summary = fit_summary(self.train_time_s, epoch, self.monitor if use_best else None, self.best_score)
        find_mlflow_logger(trainer, WHO).log_metrics(summary, step=trainer.global_step)

    def _elapsed_s(self) -> float:
        return self.train_time_s + (time.monotonic() - self._fit_start if self._fit_start is not None else 0.0)

    def _reset(self, stage: str) -> None:
        for m in self._metrics.get(stage, {}).values():
            m.reset()

    # ------------------------------------------------------------------------------------------
    # hooks: a guard and one call
    # ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        find_mlflow_logger(trainer, WHO)  # fails before training when there is no MLflowCVLogger
        self.monitor, self.mode = resolve_monitor(self._monitor_arg, self._mode_arg, trainer.checkpoint_callbacks)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stage = _stage(trainer)
        if stage in self.stages and not trainer.sanity_checking:
            self._update(stage, pl_module, outputs, batch)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(_stage(trainer))

    # test batches and epochs take the same path: the stage comes from the Trainer
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_start = on_validation_epoch_start

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap = self._epoch_end("val", trainer, pl_module)
        if snap is not None:
            self._end_validation_epoch(trainer, snap)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the epoch's metrics are final and before ModelCheckpoint (checkpoint callbacks run last).
        tracking = self.monitor is not None and self.last_snapshot is not None and "val" in self.stages
        if tracking and self.monitor is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._track_best(trainer.callback_metrics.get(self.monitor))

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap = self._epoch_end("test", trainer, pl_module)
        if snap is not None:
            self._log_artifacts(trainer, "test", snap, None)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.monotonic()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_time_s, self._fit_start = self._elapsed_s(), None
        if trainer.is_global_zero:
            self._log_fit_end(trainer)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # one callback per task may share a Trainer (e.g. a multi-task model), each with its own state
        return self._generate_state_key(task=self.task)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_snapshot": self.best_snapshot,
            "last_epoch": self.last_epoch,
            "last_snapshot": self.last_snapshot,
            "train_time_s": self._elapsed_s(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor or self.monitor is None:
            self.best_score = state_dict.get("best_score")
            self.best_epoch = state_dict.get("best_epoch")
            self.best_snapshot = state_dict.get("best_snapshot")
        self.last_epoch = state_dict.get("last_epoch")
        self.last_snapshot = state_dict.get("last_snapshot")
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))
