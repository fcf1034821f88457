"""ReproducibilityCallback: seeds, hardware, framework versions, pip freeze, git state and implicit hyperparameters.

The callback seeds and logs; what it logs is read by pure functions elsewhere:
:mod:`lightning_mlflow_cv.environment` (versions, hardware, ``requirements.txt``, ``system.json``, git state) and
:mod:`lightning_mlflow_cv.hyperparameters` (optimizer, scheduler, dataloader, Trainer, callback, ``hparams`` and
transform settings read from the live objects). Its hooks are a guard plus one call each.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv._facts.params import drop_repeated
from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.environment import (
    ENV_TAG_PREFIX,
    environment_tags,
    git_state,
    requirements_txt,
    system_info,
    trainer_params,
)
from lightning_mlflow_cv.hyperparameters import implicit_hyperparameters

if TYPE_CHECKING:
    from lightning_mlflow_cv.logger import MLflowCVLogger

__all__ = ["ReproducibilityCallback"]

_WHO = "ReproducibilityCallback"


class ReproducibilityCallback(Callback):
    """Capture what it takes to rerun a fit: seeds, versions, hardware, environment, git state and the
    hyperparameters that live in objects rather than in the config.

    At setup (stage ``fit``), when ``seed`` is given, seeds Python, NumPy, torch (CPU and CUDA) and the
    dataloader workers (``lightning.seed_everything(seed, workers=True)``). The callback also seeds when it
    is built, so a model created after it gets seeded weights.

    At fit start it logs, through the :class:`~lightning_mlflow_cv.MLflowCVLogger`:

    - params ``global_seed`` (the given seed, else the one already set by ``seed_everything``, if any),
      ``world_size``, ``num_nodes``, ``precision``, ``strategy``, ``accelerator`` (and ``cudnn_deterministic``
      on a GPU run): choices that shape the result;
    - tags ``environment.python_version``, ``environment.pytorch_version``, ``environment.torchvision_version``,
      ``environment.lightning_version``, ``environment.mlflow_version`` and, on a GPU run only,
      ``environment.cuda_version``, ``environment.cudnn_version``, ``environment.gpu_model``,
      ``environment.num_gpus``: facts about where the run ran, so they do not crowd the params MLflow's UI lists
      beside every run (see :func:`lightning_mlflow_cv.environment.environment_tags`);
    - tags ``git_commit``, ``git_branch``, ``git_dirty``;
    - artifacts ``environment/requirements.txt`` (pip freeze, redacted), ``environment/system.json``
      (OS, CPU, RAM, GPUs with memory and driver) and, when the work tree is dirty,
      ``environment/git_diff.patch`` (redacted).

    At train start (when the optimizers, schedulers and dataloaders exist) it logs the implicit
    hyperparameters, read from the live objects: ``optimizer/*`` (class and every param-group setting),
    ``lr_scheduler/*`` (class, settings, interval), ``max_epochs``, ``max_steps``, ``accumulate_grad_batches``,
    ``gradient_clip_val``, ``gradient_clip_algorithm``, ``amp``, ``train_dataloader/*`` and
    ``val_dataloader/*`` (batch_size, num_workers, pin_memory, shuffle), ``early_stopping/*`` and
    ``model_checkpoint/*`` (monitor, mode, patience), ``model/*`` and ``data/*`` (the model's and
    datamodule's ``hparams``), and ``augment/*`` (the training transform, flattened:
    ``augment/RandomResizedCrop/size``). One key per value: a value already logged under the same name (the
    ``lr``/``batch_size``/``seed`` that Lightning logs from ``hparams``) is not
    logged again, see :func:`lightning_mlflow_cv._facts.params.drop_repeated`.

    Everything is redacted by the logger before it is written: values under keys such as
    password/token/secret/api_key, ``user:pass@`` in URLs, the value after a secret-named flag on the command line
    (``--password X``) and credential shapes under any name (private keys, cloud keys, GitHub/Hugging Face/Slack
    tokens, JWTs, ``Authorization`` values; see :mod:`lightning_mlflow_cv._facts.redact`). Only global rank zero logs.

    Args:
        seed: Seed for everything; ``None`` leaves the RNGs alone and logs the seed already set (if any).
        deterministic_cudnn: Also set ``torch.backends.cudnn.deterministic=True`` and ``benchmark=False``.
        log_environment: Log ``requirements.txt`` and ``system.json``.
        log_git: Log git tags and the diff of a dirty tree.
        transform: The training transform to flatten; default: found on the train dataset
            (``transform``/``transforms``, through ``Subset``/``ConcatDataset``) or the datamodule
            (``train_transform``).
        transform_prefix: Key prefix of the flattened transform params.
        git_dir: Directory inside the git work tree to describe; default: the working directory.

    Raises:
        ValueError: a seed outside ``[0, 2**32 - 1]`` or of the wrong type, or an empty ``transform_prefix``.
        RuntimeError: at fit start, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks.reproducibility import ReproducibilityCallback

        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[ReproducibilityCallback(seed=42)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        seed: int | None = None,
        deterministic_cudnn: bool = False,
        log_environment: bool = True,
        log_git: bool = True,
        transform: Any = None,
        transform_prefix: str = "augment",
        git_dir: str | None = None,
    ) -> None:
        super().__init__()
        _checks.check_int(
            _WHO, "seed", seed, 0, 2**32 - 1, allow_none=True, must="an integer in [0, 2**32 - 1] or None",
            fix="pass e.g. seed=42, or seed=None to keep the RNG state that is already set",
        )  # fmt: skip
        if not isinstance(transform_prefix, str) or not transform_prefix.strip("/"):
            raise ValueError(
                f"ReproducibilityCallback: `transform_prefix` must be a non-empty key prefix such as 'augment', got "
                f"{transform_prefix!r}. Fix: pass transform_prefix='augment'."
            )
        if transform is not None and not callable(transform):
            raise ValueError(
                f"ReproducibilityCallback: `transform` must be a callable transform (e.g. a torchvision Compose) or "
                f"None to find it on the train dataset, got {type(transform).__name__}. Fix: pass the transform object."
            )
        self.seed = seed
        self.deterministic_cudnn = bool(deterministic_cudnn)
        self.log_environment = bool(log_environment)
        self.log_git = bool(log_git)
        self.transform = transform
        self.transform_prefix = transform_prefix.strip("/")
        self.git_dir = git_dir
        #: (run id, phase) pairs already logged; a resumed fit of the same run does not log them again.
        self._logged: set[tuple[str, str]] = set()
        if seed is not None:
            self._seed()

    def _seed(self) -> None:
        _compat_frameworks.seed_everything(self.seed, workers=True)
        if self.deterministic_cudnn:
            import torch

            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def global_seed(self) -> str:
        """The seed to log: ``seed``, else the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else ``"none"``."""
        seed = self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED")
        return str(seed) if seed is not None else "none"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.seed is not None:
            self._seed()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = find_mlflow_logger(trainer, _WHO)
        if trainer.is_global_zero and self._first(logger, "fit_start"):
            self._log_fit_start(trainer, logger)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = find_mlflow_logger(trainer, _WHO)
        if trainer.is_global_zero and self._first(logger, "train_start"):
            self._log_train_start(trainer, pl_module, logger)

    def _first(self, logger: MLflowCVLogger, phase: str) -> bool:
        key = (str(logger.run_id), phase)
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    # -- the two logging steps ---------------------------------------------------------------
    def _log_fit_start(self, trainer: pl.Trainer, logger: MLflowCVLogger) -> None:
        # where the run ran (versions, GPU) is a fact about the machine: tags; what shapes the result: params
        env = environment_tags(trainer)
        logger.set_tags(env)
        params = trainer_params(trainer)
        params["global_seed"] = self.global_seed()
        if f"{ENV_TAG_PREFIX}cuda_version" in env:  # a GPU run: cuDNN's setting matters
            params["cudnn_deterministic"] = str(self.deterministic_cudnn)
        logger.log_hyperparams(params)
        if self.log_environment:
            logger.log_text(requirements_txt(), "environment/requirements.txt")
            logger.log_dict(system_info(), "environment/system.json")
        if self.log_git:
            state = git_state(self.git_dir)
            diff = state.pop("diff", None)
            untracked = state.pop("untracked", None)
            if state:
                logger.set_tags(state)
            if diff:
                logger.log_text(diff, "environment/git_diff.patch")
            if untracked:
                logger.log_text(redact_text("\n".join(untracked)) + "\n", "environment/git_untracked.txt")

    def _log_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logger: MLflowCVLogger) -> None:
        params = implicit_hyperparameters(trainer, pl_module, self.transform, self.transform_prefix)
        # one key per value: what Lightning's hparams (or this run) already hold is not logged again
        logger.log_hyperparams(drop_repeated(params, getattr(logger, "logged_params", {})))

    # -- state ------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # one per transform prefix: each keeps its own logged transforms and seed
        return self._generate_state_key(transform_prefix=self.transform_prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The seed and the runs already described, so a resumed fit of the same run does not log again
        (its optimizer then holds the scheduled, not the initial, learning rate)."""
        return {"seed": self.seed, "logged": sorted([list(x) for x in self._logged])}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged |= {(str(r), str(p)) for r, p in state_dict.get("logged", [])}
        if self.seed is None and state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
