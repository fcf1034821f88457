"""GradCAMCallback: Grad-CAM overlays (captum's ``LayerGradCam``) on a few fixed samples, for debugging runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.callbacks import _checks, _samples
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger

if TYPE_CHECKING:
    import lightning.pytorch as pl

_WHO = "GradCAMCallback"
INSTALL_HINT = 'pip install "lightning-mlflow-cv[captum]"'


def _layer_gradcam() -> Any:
    """captum's ``LayerGradCam``, or an ImportError that gives the install command."""
    try:
        from captum.attr import LayerGradCam
    except ImportError as e:
        raise ImportError(
            f"{_WHO} needs the optional dependency captum, which is not installed ({e}). "
            f"Fix: {INSTALL_HINT}  (or: pip install captum)."
        ) from e
    return LayerGradCam


class GradCAMCallback(Callback):
    """Log Grad-CAM overlays of a classification model on a few fixed validation samples.

    Grad-CAM comes from captum (``captum.attr.LayerGradCam``, an optional extra:
    ``pip install "lightning-mlflow-cv[captum]"``). ``target_layer`` is checked when the fit sets up, with
    close matches listed when it does not exist. Each panel shows the image beside the heat map of the
    predicted (or true) class over it, with the prediction and the label; wrong predictions are framed red.
    The grid is logged with ``MLflowCVLogger.log_image`` under ``key`` at ``step=epoch``.

    The model must follow the classification convention (logits ``(N, C)`` in eval mode) or be mapped to it
    with ``output_transform``. The model runs in eval mode and is put back in its former mode afterwards;
    parameter ``.grad`` buffers are not touched.

    Args:
        target_layer: Dotted module path inside the LightningModule, e.g. ``"features.3"`` (usually the last
            conv layer; see ``[n for n, _ in model.named_modules()]``).
        num_samples: Validation samples to explain.
        every_n_epochs: Log at the end of every n-th training epoch; None logs once, at the end of the fit.
        target: Explain the ``"predicted"`` class or the ``"true"`` class.
        class_names: Names for class ids; default ``trainer.datamodule.class_names`` when it exists.
        mean: Per-channel mean of the input normalisation; default ``trainer.datamodule.mean`` when it exists.
        std: Per-channel std of the input normalisation; default ``trainer.datamodule.std`` when it exists.
        key: Image series name; default ``"gradcam/<target_layer>"``.
        seed: Seed of the sample choice.
        output_transform: A callable, or its import path ``"pkg.module:function"``, mapping the model output to
            logits ``(N, C)``.
        batch_transform: A callable, or its import path, mapping a batch to ``(images, targets)``.
        alpha: Opacity of the heat map over the image, in (0, 1].
        display_min_size: Smaller images are enlarged until their longer side reaches this many pixels.
        display_max_size: Larger images are shrunk to this many pixels on their longer side.

    Raises:
        ImportError: at construction, when captum is not installed (gives the install command).
        ValueError: on invalid arguments; at setup, when ``target_layer`` is not a submodule; at the first
            overlay, when the model output is not logits ``(N, C)``.
        RuntimeError: at setup, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.gradcam import GradCAMCallback

        cam = GradCAMCallback("features.3", num_samples=4)  # DigitsClassifier's last conv layer
        Trainer(logger=MLflowCVLogger(), callbacks=[cam], max_epochs=5).fit(model, datamodule=dm)
        # -> images/gradcam~features.3+step+4+...png
    """

    def __init__(
        self,
        target_layer: str,
        num_samples: int = 4,
        every_n_epochs: int | None = None,
        target: Literal["predicted", "true"] = "predicted",
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        key: str | None = None,
        seed: int = 0,
        output_transform: str | Callable[[Any], Any] | None = None,
        batch_transform: str | Callable[[Any], Any] | None = None,
        alpha: float = 0.5,
        display_min_size: int = 96,
        display_max_size: int = 256,
    ) -> None:
        super().__init__()
        self._gradcam_cls = _layer_gradcam()
        if not isinstance(target_layer, str) or not target_layer.strip():
            raise ValueError(
                f"{_WHO}: `target_layer` must be a dotted module path (str), got {target_layer!r}. "
                "Fix: e.g. target_layer='features.3'; list names with `[n for n, _ in model.named_modules()]`."
            )
        self.target_layer = target_layer
        _checks.check_int(_WHO, "num_samples", num_samples)
        self.num_samples = num_samples
        self.every_n_epochs = _checks.check_int(_WHO, "every_n_epochs", every_n_epochs, allow_none=True)
        self.target = _checks.check_choice(_WHO, "target", target, ("predicted", "true"))
        self.class_names = _checks.check_names(
            _WHO, "class_names", class_names, must="a list of names or None", fix="e.g. class_names=['cat', 'dog']"
        )
        self.mean, self.std = _checks.check_mean_std(_WHO, mean, std)
        _checks.check_text(_WHO, "key", key, allow_none=True, fix="e.g. key='gradcam/features.3', or None")
        self.key = key or f"gradcam/{target_layer}"
        self.seed = int(seed)
        self.output_transform = _checks.resolve_callable(_WHO, "output_transform", output_transform)
        self.batch_transform = _checks.resolve_callable(_WHO, "batch_transform", batch_transform)
        _checks.check_number(_WHO, "alpha", alpha, 0, 1, above=True, fix="e.g. alpha=0.5")
        self.alpha = float(alpha)
        _checks.check_int(_WHO, "display_min_size", display_min_size)
        self.display_min_size = display_min_size
        _checks.check_int(_WHO, "display_max_size", display_max_size)
        self.display_max_size = display_max_size
        self.indices: list[int] | None = None
        self._samples: tuple[Any, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        # one per (layer, key, sample count): two Grad-CAM grids in one Trainer keep their own samples
        return self._generate_state_key(target_layer=self.target_layer, key=self.key, num_samples=self.num_samples)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "num_samples": self.num_samples}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("num_samples") == self.num_samples:
            self.indices = state_dict.get("indices")
            self._samples = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _checks.resolve_module(_WHO, pl_module, self.target_layer)
        find_mlflow_logger(trainer, who=_WHO)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._log(trainer, pl_module, step=trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None:
            # the last completed epoch (current_epoch has moved past it by now)
            self._log(trainer, pl_module, step=max(trainer.current_epoch - 1, 0))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not trainer.is_global_zero:
            return
        grid = self.render(trainer, pl_module)
        if grid is not None:
            find_mlflow_logger(trainer, who=_WHO).log_image(self.key, grid, step=step)

    def _samples_of(self, trainer: pl.Trainer) -> tuple[Any, Any] | None:
        if self._samples is None:
            loader = trainer.val_dataloaders
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is None:
                loader = trainer.train_dataloader
            if loader is None:
                return None
            x, y, self.indices = _samples.fixed_samples(
                _WHO, loader, self.num_samples, self.seed, self.indices, self.batch_transform
            )
            self._samples = (x, y)
        return self._samples

    def _logits(self, pl_module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
        out = pl_module(x)
        return self.output_transform(out) if self.output_transform is not None else out

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """Grad-CAM overlays of the fixed samples as one ``uint8`` ``(3, H, W)`` grid."""
        got = self._samples_of(trainer)
        if got is None:
            return None
        x, y = got
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(
                f"{_WHO}: expected images as a Tensor (N, C, H, W), got {_samples.describe(x)}. Fix: pass "
                "`batch_transform='pkg.mod:fn'` returning (images, class ids)."
            )
        n = x.shape[0]
        layer = _checks.resolve_module(_WHO, pl_module, self.target_layer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                xin = x.detach().clone().to(pl_module.device).requires_grad_(True)
                with torch.no_grad():
                    logits = _samples.check_outputs(_WHO, "classification", self._logits(pl_module, xin), n)
                yy = _samples.check_targets(_WHO, "classification", y, n)
                probs = logits.softmax(-1)
                preds = probs.argmax(-1)
                explain = preds if self.target == "predicted" else yy
                gc = self._gradcam_cls(lambda inp: self._logits(pl_module, inp), layer)
                cams = gc.attribute(xin, target=[int(t) for t in explain], relu_attributions=True)
        finally:
            pl_module.train(was_training)
        dm = getattr(trainer, "datamodule", None)
        mean = self.mean if self.mean is not None else getattr(dm, "mean", None)
        std = self.std if self.std is not None else getattr(dm, "std", None)
        if (mean is None) != (std is None):
            mean = std = None
        names = self.class_names if self.class_names is not None else getattr(dm, "class_names", None)
        panels = []
        for i in range(n):
            img = _pixels.to_display(x[i], mean, std, self.display_min_size, self.display_max_size)
            cam = cams[i].detach().float().cpu().sum(0)
            pair = _pixels.hstack([img, _pixels.heatmap_overlay(img, cam, self.alpha)])
            p = int(preds[i])
            panels.append(_panels.classification_panel(pair, int(yy[i]), p, float(probs[i, p]), names))
        return _panels.make_image_grid(panels)
