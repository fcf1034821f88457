"""MLflowCVCLI: LightningCLI with MLflowCVLogger and MLflowSaveConfigCallback as defaults."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_mlflow_cv.callbacks.save_config import MLflowSaveConfigCallback

__all__ = ["MLflowCVCLI"]


class MLflowCVCLI(LightningCLI):
    """``LightningCLI`` where every run goes to MLflow by default, so ``fit --config x.yaml`` just works.

    Differences from ``LightningCLI`` (everything else, including every argument, is the same):

    - ``trainer.logger`` defaults to :class:`~lightning_mlflow_cv.MLflowCVLogger` (embedded
      ``sqlite:///mlflow.db`` unless ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` says otherwise); a YAML
      ``trainer.logger`` entry replaces it.
    - ``save_config_callback`` defaults to
      :class:`~lightning_mlflow_cv.callbacks.save_config.MLflowSaveConfigCallback`: the resolved config,
      redacted, becomes ``configs/config.yaml`` and ``config/...`` params of the run, and nothing is written
      to ``./mlruns`` or a directory shared between runs.

    It backs the ``lightning-mlflow-cv`` console script's ``fit``/``validate``/``test``/``predict``.

    Args:
        model_class: As ``LightningCLI``.
        datamodule_class: As ``LightningCLI``.
        save_config_callback: As ``LightningCLI``; default ``MLflowSaveConfigCallback``.
        save_config_kwargs: As ``LightningCLI``.
        trainer_class: As ``LightningCLI``.
        trainer_defaults: As ``LightningCLI``; a ``logger`` entry replaces the MLflowCVLogger default.
        **kwargs: As ``LightningCLI`` (``args``, ``run``, ``parser_kwargs``, ...).

    Example::

        # train.py
        from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

        if __name__ == "__main__":
            MLflowCVCLI()

        # shell
        python train.py fit --config examples/digits/config.yaml
        lightning-mlflow-cv fit --config examples/digits/config.yaml --trainer.max_epochs 3
    """

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule] | None = None,
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule] | None = None,
        save_config_callback: type[SaveConfigCallback] | None = MLflowSaveConfigCallback,
        save_config_kwargs: dict[str, Any] | None = None,
        trainer_class: type[Trainer] | Callable[..., Trainer] = Trainer,
        trainer_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:  # LightningCLI's first six parameters, in its order, so positional calls keep their meaning
        from jsonargparse import lazy_instance

        from lightning_mlflow_cv.logger import MLflowCVLogger

        defaults = {"logger": lazy_instance(MLflowCVLogger)}
        defaults.update(trainer_defaults or {})
        if kwargs.get("args") is not None and list(kwargs["args"]) == sys.argv[1:]:
            kwargs["args"] = (
                None  # the console script passes sys.argv itself; avoid LightningCLI's "both given" warning
            )
        super().__init__(
            model_class,
            datamodule_class,
            save_config_callback=save_config_callback,
            save_config_kwargs=save_config_kwargs,
            trainer_class=trainer_class,
            trainer_defaults=defaults,
            **kwargs,
        )
