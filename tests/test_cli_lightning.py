"""MLflowCVCLI takes LightningCLI's arguments the way LightningCLI does, positional ones included."""

from __future__ import annotations

from lightning.pytorch import Trainer

from lightning_mlflow_cv.callbacks.save_config import MLflowSaveConfigCallback
from lightning_mlflow_cv.cli_lightning import MLflowCVCLI
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger


def test_positional_arguments_keep_lightningcli_meaning(tracking_uri: str) -> None:
    # LightningCLI(model_class, datamodule_class, save_config_callback, save_config_kwargs, trainer_class,
    # trainer_defaults): a subclass that took *args and these as keywords raised "multiple values" here
    cli = MLflowCVCLI(
        DigitsClassifier,
        DigitsDataModule,
        MLflowSaveConfigCallback,
        None,
        Trainer,
        {"max_epochs": 1, "enable_progress_bar": False},
        run=False,
        args=[f"--trainer.logger.init_args.tracking_uri={tracking_uri}"],
    )
    assert isinstance(cli.model, DigitsClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    assert cli.save_config_callback is MLflowSaveConfigCallback
    assert cli.trainer.max_epochs == 1  # the positional trainer_defaults ...
    assert isinstance(cli.trainer.logger, MLflowCVLogger)  # ... merged with the MLflowCVLogger default
