"""AugmentationSamplesCallback: a grid of augmented training samples, as the model sees them, before training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv import tasks as _tasks
from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.callbacks import _checks, _samples
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.callbacks._samples import Task
from lightning_mlflow_cv.tasks import PanelOptions

if TYPE_CHECKING:
    import lightning.pytorch as pl

_WHO = "AugmentationSamplesCallback"


class AugmentationSamplesCallback(Callback):
    """Log a grid of augmented training samples, exactly as the model receives them, once per fit.

    The images come from the first training batches themselves (``on_train_batch_start``), so the callback
    costs no extra data loading and does not shift the data order or the augmentation random streams: the grid
    is logged before the first optimisation step when the first batch holds ``num_samples`` images, otherwise
    as soon as enough batches were seen (or at the end of the first epoch with what there is). Images are
    de-normalised with ``mean``/``std`` and tiny ones enlarged.

    With ``task`` the targets are drawn too, as the task draws the ground truth in the prediction grid
    (:meth:`lightning_mlflow_cv.tasks.CVTask.target_panel`), which checks that geometric augmentations move labels
    with the pixels: class names (classification), ground-truth boxes (object-detection), mask overlays
    (semantic-segmentation), instance masks and boxes (instance-segmentation), the normal/anomalous label
    (anomaly-detection) or the colour-mapped depth target (depth-estimation).

    Args:
        num_samples: Images in the grid.
        mean: Per-channel mean of the input normalisation; default ``trainer.datamodule.mean`` when it exists.
        std: Per-channel std of the input normalisation; default ``trainer.datamodule.std`` when it exists.
        artifact_file: Artifact path of the PNG in the run.
        task: Draw targets as for this task; None shows images only.
        class_names: Names for class ids; default ``trainer.datamodule.class_names`` when it exists.
        num_classes: Segmentation: number of classes for overlays (default: largest id in each mask + 1).
        background_class: Segmentation: a class id left uncoloured in overlays (e.g. 0 for background).
        batch_transform: A callable, or its import path ``"pkg.module:function"``, mapping a training batch to
            ``(images, targets)``.
        nrow: Images per grid row; default: the fewest that make the grid at least 1.4x wider than tall.
        display_min_size: Smaller images are enlarged until their longer side reaches this many pixels.
        display_max_size: Larger images are shrunk to this many pixels on their longer side.

    Raises:
        ValueError: on invalid arguments, or a batch or targets not in the expected format.
        RuntimeError: at setup, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.augmentation_samples import AugmentationSamplesCallback

        aug = AugmentationSamplesCallback(num_samples=16, mean=(0.2662,), std=(0.3830,))
        Trainer(logger=MLflowCVLogger(), callbacks=[aug]).fit(model, datamodule=dm)
        # -> artifact augmentations/train_samples.png
    """

    def __init__(
        self,
        num_samples: int = 16,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        artifact_file: str = "augmentations/train_samples.png",
        task: Task | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        background_class: int | None = None,
        batch_transform: str | Callable[[Any], Any] | None = None,
        nrow: int | None = None,
        display_min_size: int = 96,
        display_max_size: int = 256,
    ) -> None:
        super().__init__()
        _checks.check_int(_WHO, "num_samples", num_samples)
        self.num_samples = num_samples
        self.mean, self.std = _checks.check_mean_std(_WHO, mean, std)
        if not isinstance(artifact_file, str) or not artifact_file.lower().endswith(".png"):
            raise ValueError(
                f"{_WHO}: `artifact_file` must be a path ending in .png, got {artifact_file!r}. "
                "Fix: e.g. artifact_file='augmentations/train_samples.png'."
            )
        self.task = None if task is None else _checks.check_task(_WHO, task)
        self.class_names = _checks.check_names(
            _WHO, "class_names", class_names, must="a list of names or None", fix="e.g. class_names=['cat', 'dog']"
        )
        self.num_classes = _checks.check_int(_WHO, "num_classes", num_classes, allow_none=True)
        self.background_class = background_class
        self.batch_transform = _checks.resolve_callable(_WHO, "batch_transform", batch_transform)
        self.nrow = _checks.check_int(_WHO, "nrow", nrow, allow_none=True)
        _checks.check_int(_WHO, "display_min_size", display_min_size)
        self.display_min_size = display_min_size
        _checks.check_int(_WHO, "display_max_size", display_max_size)
        self.display_max_size = display_max_size
        self.artifact_file = artifact_file.strip("/")
        self.logged = False
        self._images: list[torch.Tensor] = []
        self._targets: list[Any] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        find_mlflow_logger(trainer, who=_WHO)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged = False
        self._images, self._targets = [], []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.logged or not trainer.is_global_zero:
            return
        self.collect(batch)
        if len(self._images) >= self.num_samples:
            self._log(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.logged and self._images and trainer.is_global_zero:
            self._log(trainer)

    def collect(self, batch: Any) -> None:
        """Keep images (and targets) of ``batch`` on the CPU until ``num_samples`` are held."""
        x, y = _samples.split_batch(_WHO, self.batch_transform(batch) if self.batch_transform else batch)
        try:
            images = _samples.images_of(x)
        except ValueError as e:
            raise ValueError(
                f"{_WHO}: {e}. Fix: pass `batch_transform='pkg.mod:fn'` returning (images, targets)."
            ) from None
        take = self.num_samples - len(self._images)
        images = images[:take]
        if self.task is not None:
            y = _samples.check_targets(_WHO, self.task, y, len(_samples.images_of(x)))
            self._targets.extend(y[: len(images)])
        self._images.extend(t.detach().cpu() for t in images)

    def render(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The grid of the collected samples as ``uint8`` ``(3, H, W)``."""
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        mean = self.mean if self.mean is not None else getattr(dm, "mean", None)
        std = self.std if self.std is not None else getattr(dm, "std", None)
        if (mean is None) != (std is None):
            mean = std = None
        names = self.class_names if self.class_names is not None else getattr(dm, "class_names", None)
        task = _tasks.get_task(self.task, _WHO) if self.task is not None else None
        opts = PanelOptions(class_names=names, background_class=self.background_class, num_classes=self.num_classes)
        panels = []
        for i, x in enumerate(self._images):
            img = _pixels.to_display(x, mean, std, self.display_min_size, self.display_max_size)
            if task is not None:  # the ground truth as the prediction grid draws it (lightning_mlflow_cv.tasks)
                img = task.target_panel(img, (x.shape[-2], x.shape[-1]), self._targets[i], opts)
            panels.append(img)
        return _panels.make_image_grid(panels, nrow=self.nrow)

    def _log(self, trainer: pl.Trainer) -> None:
        from PIL import Image

        grid = self.render(trainer)
        logger = find_mlflow_logger(trainer, who=_WHO)
        pil = Image.fromarray(grid.permute(1, 2, 0).numpy())
        # rendered straight into the logger's spool (same delivery and failure policy as log_dict/log_text)
        logger.log_image_artifact(pil, self.artifact_file)
        self.logged = True
        self._images, self._targets = [], []
