"""PredictionGridCallback: a per-epoch grid of predictions on a fixed set of validation samples."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv import tasks as _tasks
from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.callbacks import _checks, _samples
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.tasks import PanelOptions

if TYPE_CHECKING:
    import lightning.pytorch as pl

_WHO = "PredictionGridCallback"


def _datamodule_attr(trainer: pl.Trainer, name: str) -> Any:
    dm = getattr(trainer, "datamodule", None)
    return getattr(dm, name, None) if dm is not None else None


class PredictionGridCallback(Callback):
    """Log one image per validation epoch: the model's predictions on a fixed set of validation samples.

    The samples are picked once (seeded) from the validation dataset and kept in the callback's state, so a
    resumed fit shows the same samples. At each validation epoch end (never during the sanity check) the
    model runs on them in eval mode without gradients; the grid is logged with
    ``MLflowCVLogger.log_image(key, grid, step=trainer.current_epoch)``. The step is the epoch, not the global
    step, on purpose: MLflow 3.17's image card starts at step 0 and moves to the smallest logged step only when
    the card's images have exactly one step, so images at global steps (the first validation comes after the
    first epoch's training steps) open on "No image logged at this step" (checked in headless Chromium,
    ``tests/browser_check.py``); at step = epoch the card opens on the first epoch's grid. The grid is laid out
    wider than tall (:func:`lightning_mlflow_cv._draw.panels.grid_columns`) so the card shows all of it.

    **Worst mistakes.** Beside the fixed samples (which are often all right by the last epoch), a second grid
    shows the epoch's worst predictions among the validation batches: ``worst_mistakes=True`` (default) logs
    it as the image series ``<key>_worst_mistakes`` (``val/predictions_worst_mistakes`` by default) at the same
    step. What "worst" means comes from the task (:meth:`~lightning_mlflow_cv.tasks.CVTask.badness`):
    classification, the most confident wrong predictions; detection and instance segmentation, the lowest
    per-image F1 at IoU 0.5 (mask IoU for instances); semantic segmentation, the lowest per-image mIoU;
    depth, the highest per-image AbsRel; anomaly detection, the scores furthest on the wrong side of the
    decision threshold (``val/best_threshold`` of ``CVMetricsCallback`` from the previous epoch when logged,
    else 0). Only images that are mistakes are shown (up to ``num_samples``), each captioned with its rank
    and badness; no image is logged for an epoch without any. Predictions are read from what
    ``validation_step`` returns when it follows the task's convention (or through ``output_fn``); otherwise
    the model's ``forward`` runs once more on each validation batch (return the convention from
    ``validation_step`` to avoid that cost). Only the ``num_samples`` worst images are held on the CPU while
    the batches arrive (a running top-k) and the grid is drawn once at epoch end. Under DDP it covers rank
    0's share of the validation set.

    What a panel shows, by ``task`` (output conventions of :mod:`lightning_mlflow_cv.tasks`; short names such as
    ``"detection"`` work too):

    - ``"classification"``: logits ``(N, C)``, targets ``(N,)``: predicted label and probability, true label;
      wrong predictions get a red frame and red text.
    - ``"object-detection"``: a list of dicts with ``boxes`` (xyxy), ``scores``, ``labels``; targets a list of
      dicts with ``boxes``, ``labels``: ground-truth boxes beside predicted boxes with
      ``score >= score_threshold``.
    - ``"semantic-segmentation"``: logits ``(N, C, H, W)`` (upsampled to the image size when smaller), masks
      ``(N, H, W)``: image, ground-truth overlay, predicted overlay.
    - ``"instance-segmentation"``: like detection plus ``masks`` ``(K, H, W)``: ground-truth instances beside
      predicted instances (``score >= score_threshold``), one colour per instance, with boxes and labels.
    - ``"anomaly-detection"``: scores ``(N,)`` (or ``{"scores": (N,), "maps": (N, H, W)}``), targets ``(N,)`` in
      {0, 1}: the anomaly map as a heatmap over the image, with the score and the label.
    - ``"depth-estimation"``: depth ``(N, 1, H, W)``, targets the same (0/NaN invalid): prediction and target
      colour-mapped on one shared scale, and the absolute error, side by side.

    Images are de-normalised with ``mean``/``std``, tiny images are enlarged (nearest neighbour, whole factors,
    crisp pixels) until their longer side is at least ``display_min_size`` (128 px by default, so 8x8 digits
    become 128x128 tiles) and large ones are shrunk; caption text grows with the tiles (16 px for 128-px
    tiles). The cost per epoch is bounded by ``num_samples`` whatever the dataset size.

    Args:
        task: A task of :mod:`lightning_mlflow_cv.tasks` (``"classification"``, ``"object-detection"``,
            ``"semantic-segmentation"``, ``"instance-segmentation"``, ``"anomaly-detection"``,
            ``"depth-estimation"``, or a short name).
        num_samples: How many validation samples the grid shows.
        every_n_epochs: Log when ``(epoch + 1) % every_n_epochs == 0``.
        class_names: Names for class ids; default ``trainer.datamodule.class_names`` when it exists, else ids.
        mean: Per-channel mean of the input normalisation; default ``trainer.datamodule.mean`` when it exists.
            Without mean/std, float inputs outside [0, 1] are min-max scaled for display.
        std: Per-channel std of the input normalisation; default ``trainer.datamodule.std`` when it exists.
        score_threshold: Detection: draw predicted boxes with at least this score.
        key: Image series name in MLflow.
        seed: Seed of the sample choice.
        output_fn: The mapping hook shared by every callback: ``fn(outputs, batch) -> dict`` in the task's
            step-output format (predictions and targets), or its import path ``"pkg.module:fn"``; here
            ``outputs`` is what ``forward`` returned on the batch's images. Replaces ``output_transform`` and
            ``batch_transform``' target part.
        output_transform: A callable, or its import path ``"pkg.module:function"``, mapping the model output to
            the task's prediction format (targets then come from the batch).
        batch_transform: A callable, or its import path, mapping a validation batch to ``(images, targets)``;
            default: the first two items of a tuple batch, or the image/target keys of a dict batch.
        dataloader_idx: Which validation dataloader to take samples from.
        nrow: Panels per grid row; default: the fewest that make the grid at least 1.4x wider than tall
            (:func:`lightning_mlflow_cv._draw.panels.grid_columns`), so an MLflow image card shows all of it.
        background_class: Segmentation: a class id left uncoloured in overlays (e.g. 0 for background).
        display_min_size: Smaller images are enlarged until their longer side reaches this many pixels.
        display_max_size: Larger images are shrunk to this many pixels on their longer side.
        worst_mistakes: Also log the epoch's worst predictions as the image series ``<key>_worst_mistakes``.

    Raises:
        ValueError: on invalid arguments (at construction); on a model output or batch that does not follow the
            task's convention (at the first grid, naming the expected format and what arrived).
        RuntimeError: at setup, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks.prediction_grid import PredictionGridCallback

        grid = PredictionGridCallback("classification", num_samples=16, class_names=[str(i) for i in range(10)],
                                      mean=(0.2662,), std=(0.3830,))
        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[grid], max_epochs=5)
        trainer.fit(model, datamodule=dm)
        # images/val~predictions+step+<epoch>+... and images/val~predictions_worst_mistakes+step+<epoch>+...
    """

    def __init__(
        self,
        task: str,
        num_samples: int = 8,
        every_n_epochs: int = 1,
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        score_threshold: float = 0.5,
        key: str = "val/predictions",
        seed: int = 0,
        output_transform: str | Callable[[Any], Any] | None = None,
        batch_transform: str | Callable[[Any], Any] | None = None,
        dataloader_idx: int = 0,
        nrow: int | None = None,
        background_class: int | None = None,
        display_min_size: int = 128,
        display_max_size: int = 256,
        output_fn: str | Callable[[Any, Any], Any] | None = None,
        worst_mistakes: bool = True,
    ) -> None:
        super().__init__()
        self.task = _checks.check_task(_WHO, task)
        self.num_samples = _checks.check_int(_WHO, "num_samples", num_samples)
        self.every_n_epochs = _checks.check_int(_WHO, "every_n_epochs", every_n_epochs)
        self.nrow = _checks.check_int(_WHO, "nrow", nrow, allow_none=True)
        self.display_min_size = _checks.check_int(_WHO, "display_min_size", display_min_size)
        self.display_max_size = _checks.check_int(_WHO, "display_max_size", display_max_size)
        if self.display_max_size < self.display_min_size:
            raise ValueError(
                f"{_WHO}: `display_max_size` ({display_max_size}) must be >= `display_min_size` ({display_min_size})."
            )
        _checks.check_number(_WHO, "score_threshold", score_threshold, 0, 1, fix="e.g. score_threshold=0.5")
        _checks.check_int(_WHO, "dataloader_idx", dataloader_idx, 0, fix="e.g. dataloader_idx=0")
        _checks.check_text(_WHO, "key", key, fix="e.g. key='val/predictions'")
        class_names = _checks.check_names(
            _WHO, "class_names", class_names, must="a list of names (one per class id) or None",
            fix="e.g. class_names=['cat', 'dog']",
        )  # fmt: skip
        self.worst_mistakes = _checks.check_bool(
            _WHO, "worst_mistakes", worst_mistakes, fix="worst_mistakes=False to log only the fixed samples"
        )
        self.mean, self.std = _checks.check_mean_std(_WHO, mean, std)
        self.class_names = class_names
        self.score_threshold = float(score_threshold)
        self.key = key
        self.seed = int(seed)
        self.output_transform = _checks.resolve_callable(_WHO, "output_transform", output_transform)
        self.batch_transform = _checks.resolve_callable(_WHO, "batch_transform", batch_transform)
        self.output_fn = _tasks.load_output_fn(output_fn, _WHO)
        if self.output_fn is not None and self.output_transform is not None:
            raise ValueError(
                f"{_WHO}: pass `output_fn` or `output_transform`, not both. Fix: keep `output_fn` (it maps "
                "(outputs, batch) to the task's dict with predictions and targets)."
            )
        self.dataloader_idx = dataloader_idx
        self.background_class = background_class
        self.indices: list[int] | None = None
        self._samples: tuple[Any, Any, Any] | None = None
        self._worst: _samples.WorstK | None = None
        self._worst_opts: PanelOptions | None = None

    @property
    def worst_key(self) -> str:
        """The image series of the worst-mistakes grid: ``<key>_worst_mistakes``."""
        return f"{self.key}_worst_mistakes"

    # -----------------------------------------------------------------------------------------
    # state: the chosen samples survive a resume
    # -----------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # one grid per (task, key, dataloader, sample count): two grids in one Trainer keep their own samples
        return self._generate_state_key(
            task=self.task, key=self.key, dataloader_idx=self.dataloader_idx, num_samples=self.num_samples
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "seed": self.seed, "num_samples": self.num_samples}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("num_samples") == self.num_samples:
            self.indices = state_dict.get("indices")
            self._samples = None

    # -----------------------------------------------------------------------------------------
    # hooks
    # -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        find_mlflow_logger(trainer, who=_WHO)

    def _due(self, trainer: pl.Trainer) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.is_global_zero
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._worst = _samples.WorstK(self.num_samples) if self.worst_mistakes and self._due(trainer) else None
        self._worst_opts = None

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._worst is not None and dataloader_idx == self.dataloader_idx:
            self.collect_worst(trainer, pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        logger = find_mlflow_logger(trainer, who=_WHO)
        grid = self.render(trainer, pl_module)
        if grid is not None:
            logger.log_image(self.key, grid, step=trainer.current_epoch)
        worst = self.render_worst(trainer)
        self._worst = None
        if worst is not None:
            logger.log_image(self.worst_key, worst, step=trainer.current_epoch)

    # -----------------------------------------------------------------------------------------
    # work
    # -----------------------------------------------------------------------------------------
    def _loader(self, trainer: pl.Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if loaders is None:
            return None
        if isinstance(loaders, (list, tuple)):
            if self.dataloader_idx >= len(loaders):
                raise ValueError(
                    f"{_WHO}: `dataloader_idx`={self.dataloader_idx} but there are {len(loaders)} validation "
                    f"dataloaders. Fix: dataloader_idx in 0..{len(loaders) - 1}."
                )
            return loaders[self.dataloader_idx]
        if isinstance(loaders, dict):
            return list(loaders.values())[self.dataloader_idx]
        return loaders

    def samples(self, trainer: pl.Trainer) -> tuple[Any, Any, Any] | None:
        """The fixed ``(images, targets, batch)`` (picked on first use, then cached on the CPU)."""
        if self._samples is None:
            loader = self._loader(trainer)
            if loader is None:
                return None
            batch, self.indices = _samples.fixed_batch(loader, self.num_samples, self.seed, self.indices)
            x, y = _samples.split_batch(_WHO, self.batch_transform(batch) if self.batch_transform else batch)
            if self.indices is None and self.output_fn is None:
                x, y = x[: self.num_samples], y[: self.num_samples]
            self._samples = (x, y, batch)
        return self._samples

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """Run the model on the fixed samples (eval, no grad) and return the grid as ``uint8`` ``(3, H, W)``."""
        got = self.samples(trainer)
        if got is None:
            return None
        x, y, batch = got
        images = _samples.images_of(x)
        n = len(images)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                out = pl_module(move_data_to_device(x, pl_module.device))
        finally:
            pl_module.train(was_training)
        task = _tasks.get_task(self.task, _WHO)
        if self.output_fn is not None:
            out = _tasks.adapt_outputs(self.task, out, batch, self.output_fn, None, _WHO)
        else:
            if self.output_transform is not None:
                out = self.output_transform(out)
            out = _tasks.check_model_outputs(self.task, out, y, n, _WHO)
        out = task.to_cpu(out)
        mean, std, opts = self._display(trainer, images[0])
        panels = []
        for i in range(min(n, self.num_samples)):
            img = _pixels.to_display(images[i], mean, std, self.display_min_size, self.display_max_size)
            panels.append(task.panel(img, (images[i].shape[-2], images[i].shape[-1]), out, i, opts))
        return _panels.make_image_grid(panels, nrow=self.nrow)

    def _display(self, trainer: pl.Trainer, image: torch.Tensor) -> tuple[Any, Any, PanelOptions]:
        """``(mean, std, panel options)``: the arguments, else the datamodule's attributes; the caption size from
        the tile size of ``image``."""
        mean = self.mean if self.mean is not None else _datamodule_attr(trainer, "mean")
        std = self.std if self.std is not None else _datamodule_attr(trainer, "std")
        if (mean is None) != (std is None):
            mean = std = None
        names = self.class_names if self.class_names is not None else _datamodule_attr(trainer, "class_names")
        tile = _pixels.display_size(image.shape[-2], image.shape[-1], self.display_min_size, self.display_max_size)
        threshold = None
        if self.task == "anomaly-detection":  # the decision threshold CVMetricsCallback last logged, if any
            value = trainer.callback_metrics.get("val/best_threshold")
            threshold = float(value) if value is not None and bool(torch.isfinite(torch.as_tensor(value))) else None
        font = _pixels.font_size_for(max(tile))
        opts = PanelOptions(
            names, self.score_threshold, self.background_class, font_size=font, decision_threshold=threshold
        )
        return mean, std, opts

    def _step_outputs(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> tuple[Any, list[torch.Tensor]]:
        """The checked outputs of one validation batch and its images: ``validation_step``'s return value when
        it follows the task's convention (through ``output_fn`` when given), else ``forward`` on the batch."""
        task = _tasks.get_task(self.task, _WHO)
        x, y = _samples.split_batch(_WHO, self.batch_transform(batch) if self.batch_transform else batch)
        images = _samples.images_of(x)
        if self.output_fn is not None:
            return _tasks.adapt_outputs(self.task, outputs, batch, self.output_fn, None, _WHO), images
        if isinstance(outputs, Mapping) and task.pred_key in outputs and "targets" in outputs:
            return _tasks.check_outputs(self.task, outputs, None, _WHO), images
        with torch.no_grad():
            preds = pl_module(x)
        if self.output_transform is not None:
            preds = self.output_transform(preds)
        return _tasks.check_model_outputs(self.task, preds, y, len(images), _WHO), images

    def collect_worst(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        """Offer one validation batch to the running top-k of worst predictions (only its entrants are copied
        to the CPU)."""
        if self._worst is None:
            return
        task = _tasks.get_task(self.task, _WHO)
        out, images = self._step_outputs(pl_module, outputs, batch)
        if self._worst_opts is None:
            self._worst_opts = self._display(trainer, images[0])[2]

        def keep(idx: list[int]) -> list[tuple[torch.Tensor, Any]]:
            return [(images[i].detach().cpu(), task.to_cpu(task.take(out, [i]))) for i in idx]

        self._worst.push(task.badness(out, self._worst_opts), keep)

    def render_worst(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """The grid of the epoch's worst predictions collected so far, worst first, each captioned with its rank
        and badness (``uint8`` ``(3, H, W)``); None when there were no mistakes."""
        if self._worst is None or not len(self._worst):
            return None
        task = _tasks.get_task(self.task, _WHO)
        items = self._worst.items()
        mean, std, opts = self._display(trainer, items[0][1][0])
        if self._worst_opts is not None:
            opts = self._worst_opts
        panels = []
        for rank, (bad, (image, out)) in enumerate(items, start=1):
            img = _pixels.to_display(image, mean, std, self.display_min_size, self.display_max_size)
            panel = task.panel(img, tuple(image.shape[-2:]), out, 0, opts)
            panels.append(_pixels.caption(panel, [f"#{rank} {task.badness_name} {bad:.3g}"], font_size=opts.font_size))
        return _panels.make_image_grid(panels, nrow=self.nrow)
