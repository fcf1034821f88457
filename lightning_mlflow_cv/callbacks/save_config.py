"""MLflowSaveConfigCallback: the resolved LightningCLI config, redacted, as an artifact and as params of the run."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

from lightning_mlflow_cv._facts.redact import redact
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["MLflowSaveConfigCallback", "flatten_config"]

_WHO = "MLflowSaveConfigCallback"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"a/b/c": value}``; lists of mappings (e.g. ``trainer.callbacks``) by index.

    Empty mappings and lists, and lists of scalars, stay values.

    Example::

        >>> flatten_config({"trainer": {"max_epochs": 3, "callbacks": [{"class_path": "X"}]}, "seed": 1})
        {'trainer/max_epochs': 3, 'trainer/callbacks/0/class_path': 'X', 'seed': 1}
    """
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten_config(v, key))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Mapping) for x in v):
            for i, item in enumerate(v):
                out.update(flatten_config(item, f"{key}/{i}"))
        else:
            out[key] = v
    return out


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Log the resolved LightningCLI config into the MLflow run itself: ``configs/config.yaml`` plus params.

    Unlike Lightning's ``SaveConfigCallback`` (which writes ``config.yaml`` into ``trainer.log_dir``, i.e.
    ``./mlruns/...`` or a directory shared between runs, and fails when a previous run's file is there), the
    config goes through the :class:`~lightning_mlflow_cv.MLflowCVLogger` as an artifact of this run only, so
    it works with a remote tracking server, never touches ``./mlruns`` and cannot clash with another run.

    - ``configs/<config_filename>``: the full resolved config (``parser.dump``), secrets redacted (keys such as
      password, token, secret, api_key, credentials; ``user:pass@`` inside URLs).
    - params, by ``log_params``: ``"summary"`` (default) logs only ``config/model/class_path`` and
      ``config/data/class_path`` (what was trained on what); the model's and datamodule's arguments already
      arrive as params through Lightning's ``save_hyperparameters``, and the Trainer's settings through
      ``ReproducibilityCallback``, so flattening the whole config would log each value twice and the logger's
      and callbacks' internals besides (MLflow's UI lists every param above the run's images). ``True`` logs
      the whole flattened config as ``<params_prefix>/<key>`` (e.g. ``config/model/init_args/lr``); ``False``
      none. Redacted, truncated to MLflow's param length limit by the logger (whole values kept in
      ``params/full_values.json``).

    Without an ``MLflowCVLogger`` (e.g. ``--trainer.logger false``) it warns once and logs nothing. A resumed
    fit (same run) keeps the first file and adds ``configs/config.resumed-<UTC time>.yaml``. Logged once per
    process (``SaveConfigCallback.already_saved``), so it holds no checkpoint state.

    Args:
        parser: The CLI's parser (passed by LightningCLI).
        config: The parsed config (passed by LightningCLI).
        config_filename: Artifact file name (``.yaml`` or ``.yml``) under ``artifact_dir``.
        overwrite: Accepted for compatibility with ``SaveConfigCallback``; each run has its own file.
        multifile: Accepted for compatibility; one resolved file is logged.
        save_to_log_dir: Also write Lightning's copy into ``trainer.log_dir`` (off: that is the shared local
            directory this callback avoids).
        artifact_dir: Artifact directory of the config file.
        log_params: ``"summary"`` (the model's and datamodule's class paths), ``True`` (the whole flattened
            config) or ``False`` (no params; the config artifact only).
        params_prefix: Key prefix of those params.

    Raises:
        ValueError: a ``config_filename`` not ending in ``.yaml``/``.yml`` or containing ``/``, or an empty
            ``artifact_dir``/``params_prefix``.

    Example::

        from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

        # MLflowCVCLI uses this callback by default; with a plain LightningCLI:
        from lightning.pytorch.cli import LightningCLI
        from lightning_mlflow_cv.callbacks.save_config import MLflowSaveConfigCallback

        LightningCLI(save_config_callback=MLflowSaveConfigCallback)
    """

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = False,
        artifact_dir: str = "configs",
        log_params: bool | Literal["summary"] = "summary",
        params_prefix: str = "config",
    ) -> None:
        if (
            not isinstance(config_filename, str)
            or not config_filename.endswith((".yaml", ".yml"))
            or "/" in config_filename
        ):
            raise ValueError(
                f"{_WHO}: `config_filename` must be a file name ending in .yaml or .yml (no directories), got "
                f"{config_filename!r}. Fix: config_filename='config.yaml'; put the folder in `artifact_dir`."
            )
        for arg, value in (("artifact_dir", artifact_dir), ("params_prefix", params_prefix)):
            if not isinstance(value, str) or not value.strip("/"):
                raise ValueError(
                    f"{_WHO}: `{arg}` must be a non-empty string, got {value!r}. "
                    f"Fix: leave the default ({'configs' if arg == 'artifact_dir' else 'config'!r})."
                )
        super().__init__(
            parser,
            config,
            config_filename=config_filename,
            overwrite=overwrite,
            multifile=multifile,
            save_to_log_dir=save_to_log_dir,
        )
        self.artifact_dir = artifact_dir.strip("/")
        _checks.check_choice(
            _WHO, "log_params", log_params, ("summary", True, False),
            fix="leave the default 'summary' (class paths only; the full config is the configs/config.yaml artifact)",
        )  # fmt: skip
        self.log_params = log_params
        self.params_prefix = params_prefix.strip("/")

    @property
    def artifact_file(self) -> str:
        """``<artifact_dir>/<config_filename>``, e.g. ``configs/config.yaml``."""
        return f"{self.artifact_dir}/{self.config_filename}"

    def _artifact_file_for(self, resumed: bool) -> str:
        if not resumed:
            return self.artifact_file
        # a resumed fit continues the same run: keep the first config, add this one next to it
        import time

        stem, ext = self.config_filename.rsplit(".", 1)
        return f"{self.artifact_dir}/{stem}.resumed-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.{ext}"

    def config_dict(self) -> dict[str, Any]:
        """The resolved config as a plain dict, secrets redacted."""
        import yaml

        text = self.parser.dump(self.config, skip_none=False)
        data = yaml.safe_load(text) or {}
        return redact(data)

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the config artifact and params (rank zero only; called by ``SaveConfigCallback.setup``)."""
        try:
            logger = find_mlflow_logger(trainer, _WHO)
        except RuntimeError as err:
            warnings.warn(f"{err} The config is not logged.", UserWarning, stacklevel=2)
            return
        data = self.config_dict()
        logger.log_dict(data, self._artifact_file_for(bool(getattr(logger, "resumed", False))))
        if self.log_params:
            flat = flatten_config(data, self.params_prefix)
            if self.log_params == "summary":
                wanted = {f"{self.params_prefix}/{part}/class_path" for part in ("model", "data")}
                flat = {k: v for k, v in flat.items() if k in wanted}
            # a resumed run with a changed value gets the logger's "params cannot change" warning
            logger.log_hyperparams(flat)
