"""MLflowCVCLI: LightningCLI with MLflowCVLogger and MLflowSaveConfigCallback as defaults."""

from __future__ import annotations

import sys
from typing import Any

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
        *args: As ``LightningCLI``.
        save_config_callback: As ``LightningCLI``; default ``MLflowSaveConfigCallback``.
        trainer_defaults: As ``LightningCLI``; a ``logger`` entry replaces the MLflowCVLogger default.
        **kwargs: As ``LightningCLI``.

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
        *args: Any,
        save_config_callback: type[SaveConfigCallback] | None = MLflowSaveConfigCallback,
        trainer_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from jsonargparse import lazy_instance

        from lightning_mlflow_cv.logger import MLflowCVLogger

        defaults = {"logger": lazy_instance(MLflowCVLogger)}
        defaults.update(trainer_defaults or {})
        if kwargs.get("args") is not None and list(kwargs["args"]) == sys.argv[1:]:
            kwargs["args"] = None  # the console script passes sys.argv itself; avoid LightningCLI's "both given" warning
        super().__init__(*args, save_config_callback=save_config_callback, trainer_defaults=defaults, **kwargs)
