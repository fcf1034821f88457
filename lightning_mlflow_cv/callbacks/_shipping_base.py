"""What the three fit-end shipping callbacks share: one best-weights copy per fit, released at teardown, and a
``state_key`` made of the arguments that tell two instances apart.

Base of :class:`~lightning_mlflow_cv.callbacks.onnx_export.ONNXExportCallback`,
:class:`~lightning_mlflow_cv.callbacks.inference_latency.InferenceLatencyCallback` and
:class:`~lightning_mlflow_cv.callbacks.model_registry.ModelRegistryCallback`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._shipping import export as _export

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ShippingCallback(Callback):
    """A callback that ships the trained model at fit end (export, timing, registration).

    The weights to ship are one CPU copy per trainer and fit state (:func:`lightning_mlflow_cv._shipping.export.best_module`),
    shared by every shipping callback on the Trainer and dropped at ``teardown``. Subclasses name the arguments
    that distinguish two instances in :meth:`_state_key_fields`, so several can coexist in one Trainer and
    resume from a checkpoint each with its own state (as ``EarlyStopping`` does).
    """

    #: What the last shipping run was for (see :meth:`_first_time`).
    _done_key: tuple[Any, ...] | None = None

    def _first_time(self, trainer: pl.Trainer, *extra: Any) -> bool:
        """``True`` the first time per trainer and global step (and ``extra``), then ``False``: the work runs once
        per fit end, however many hooks and sibling callbacks ask for it."""
        key = (id(trainer), trainer.global_step, *extra)
        if self._done_key == key:
            return False
        self._done_key = key
        return True

    def _state_key_fields(self) -> dict[str, Any]:
        """The arguments that tell two instances of this callback apart."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_fields())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _export.release(trainer)
