"""Implicit hyperparameters: the settings that live in objects rather than in a config, read from the live objects.

The optimizer and every param-group setting, the LR scheduler, the dataloaders, the Trainer's loop and precision
settings, EarlyStopping/ModelCheckpoint, the model's and datamodule's ``hparams`` and the training transform
pipeline, each as flat ``{key: str}`` params. Pure functions, usable without a store;
:class:`~lightning_mlflow_cv.ReproducibilityCallback` logs :func:`implicit_hyperparameters` at train start.
"""

from __future__ import annotations

import collections
import enum
import inspect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning_mlflow_cv._facts.redact import REDACTED, is_secret_key

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "callback_params",
    "dataloader_params",
    "find_train_transform",
    "hparams_params",
    "implicit_hyperparameters",
    "optimizer_params",
    "scheduler_params",
    "trainer_params",
    "transform_params",
]

#: Scheduler constructor arguments that are run state or plumbing, not settings.
_SCHEDULER_SKIP = {"optimizer", "last_epoch", "verbose"}


# ----------------------------------------------------------------------------------------------
# value rendering
# ----------------------------------------------------------------------------------------------
def _render(value: Any) -> Any:
    """A readable, stable form of ``value`` for a param (enums by value, functions by name, tensors as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # tensor / ndarray
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_render(v) for v in value)
    if isinstance(value, collections.defaultdict) and not value and value.default_factory is not None:
        # one value for every input type: what the user passed (torchvision 0.15's v2 `ToDtype(dtype)`, `fill`)
        return _render(value.default_factory())
    if isinstance(value, Mapping):
        return {str(k): _render(v) for k, v in value.items()}
    if inspect.isbuiltin(value):
        return ".".join(x for x in (getattr(value, "__module__", None), value.__name__) if x)
    if inspect.isfunction(value) or inspect.ismethod(value):
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value)
    if inspect.isclass(value):
        return value.__qualname__
    return str(value)


def _str(value: Any) -> str:
    return str(_render(value))


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
def _children(transform: Any) -> list[Any] | None:
    """Sub-transforms of a container transform (Compose, RandomApply, nn.Sequential, ...), else None."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)) and not isinstance(inner, str):
        return list(inner)
    if type(transform).__name__ == "Sequential" and hasattr(transform, "children"):
        return list(transform.children())
    return None


def _init_settings(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Constructor arguments of ``obj`` that it keeps as attributes of the same name (the live values)."""
    skip = set(skip) | {"self", "transforms"}
    try:
        sig = inspect.signature(type(obj).__init__)
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hasattr(obj, name):
            out[name] = getattr(obj, name)
    return out


def transform_params(transform: Any, prefix: str = "augment") -> dict[str, str]:
    """Flatten a torchvision transform pipeline (v1 ``Compose``, v2 pipelines, nested containers) into params.

    Each transform becomes ``<prefix>/<ClassName>/<setting>`` with the value read from the live object
    (so ``RandomAffine(degrees=10)`` gives ``augment/RandomAffine/degrees = [-10.0, 10.0]``). A class that
    appears twice gets a suffix (``RandomCrop_2``); containers nest (``augment/RandomApply/p``,
    ``augment/RandomApply/ColorJitter/brightness``). ``<prefix>/pipeline`` lists the top-level order.

    Args:
        transform: A transform, a container of transforms, or a plain callable.
        prefix: Key prefix.

    Returns:
        Flat ``{key: str value}``.

    Example::

        >>> from torchvision.transforms import v2
        >>> p = transform_params(v2.Compose([v2.RandomAffine(degrees=10), v2.RandomHorizontalFlip(p=0.3)]))
        >>> p["augment/RandomAffine/degrees"], p["augment/RandomHorizontalFlip/p"], p["augment/pipeline"]
        ('[-10.0, 10.0]', '0.3', 'RandomAffine > RandomHorizontalFlip')
    """
    out: dict[str, str] = {}
    children = _children(transform)
    if children is None:
        children = [transform]
    else:
        for k, v in _init_settings(transform).items():
            out[f"{prefix}/{k}"] = _str(v)
    seen: dict[str, int] = {}
    names: list[str] = []
    for child in children:
        name = type(child).__name__ if not inspect.isfunction(child) else child.__name__
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}_{seen[name]}"
        names.append(label)
        key = f"{prefix}/{label}"
        if _children(child) is not None:
            out.update(transform_params(child, key))
            continue
        settings = _init_settings(child)
        if not settings:
            out[f"{key}/type"] = (
                f"{type(child).__module__}.{type(child).__qualname__}" if not inspect.isfunction(child) else _str(child)
            )
        for k, v in settings.items():
            out[f"{key}/{k}"] = _str(v)
    if len(children) > 1 or _children(transform) is not None:
        out[f"{prefix}/pipeline"] = " > ".join(names)
    return out


def _unwrap_datasets(dataset: Any, depth: int = 0) -> Iterable[Any]:
    """The dataset and every dataset it wraps (Subset.dataset, ConcatDataset.datasets, ...)."""
    if dataset is None or depth > 8:
        return
    yield dataset
    inner = getattr(dataset, "dataset", None)
    if inner is not None and inner is not dataset:
        yield from _unwrap_datasets(inner, depth + 1)
    for d in getattr(dataset, "datasets", None) or []:
        yield from _unwrap_datasets(d, depth + 1)


def find_train_transform(trainer: pl.Trainer | None = None, dataset: Any = None, datamodule: Any = None) -> Any:
    """The training transform: the train dataset's ``transform``/``transforms`` (looking through wrappers), else
    the datamodule's ``train_transform``/``train_transforms``/``transform``. ``None`` when there is none.
    """
    if dataset is None and trainer is not None:
        loader = getattr(trainer, "train_dataloader", None)
        loader = loader[0] if isinstance(loader, (list, tuple)) and loader else loader
        dataset = getattr(loader, "dataset", None)
    if datamodule is None and trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
    for ds in _unwrap_datasets(dataset):
        for attr in ("transform", "transforms"):
            t = getattr(ds, attr, None)
            if t is not None and callable(t):
                return t
    for attr in ("train_transform", "train_transforms", "transform"):
        t = getattr(datamodule, attr, None)
        if t is not None and callable(t):
            return t
    return None


# ----------------------------------------------------------------------------------------------
# optimizers, schedulers, dataloaders, trainer, callbacks, hparams
# ----------------------------------------------------------------------------------------------
#: Param-group entries that choose an implementation, not the optimisation (left out of the params).
_OPTIMIZER_IMPL = frozenset({"foreach", "fused", "capturable", "differentiable"})


def optimizer_params(optimizers: Any) -> dict[str, str]:
    """The optimizer class and every param-group setting (lr, weight_decay, betas, momentum, ...).

    Entries that only pick an implementation (``foreach``, ``fused``, ``capturable``, ``differentiable``)
    are left out, and so is ``initial_lr`` (an LR scheduler's copy of ``lr``).

    One optimizer with one param group gives ``optimizer/name``, ``optimizer/lr``, ...; several param groups
    give ``optimizer/group_<i>/<setting>``; several optimizers give ``optimizer_<j>/...``.

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        >>> p = optimizer_params([opt])
        >>> p["optimizer/name"], p["optimizer/lr"], p["optimizer/momentum"]
        ('SGD', '0.1', '0.9')
    """
    opts = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    out: dict[str, str] = {}
    for j, opt in enumerate(opts):
        base = "optimizer" if len(opts) == 1 else f"optimizer_{j}"
        out[f"{base}/name"] = type(opt).__name__
        groups = getattr(opt, "param_groups", [])
        for i, group in enumerate(groups):
            gkey = base if len(groups) == 1 else f"{base}/group_{i}"
            for k, v in group.items():
                if k in ("params", "initial_lr") or k in _OPTIMIZER_IMPL:  # initial_lr: the scheduler's copy of lr
                    continue
                out[f"{gkey}/{k}"] = _str(v)
        if len(groups) > 1:
            out[f"{base}/num_param_groups"] = str(len(groups))
    return out


def scheduler_params(configs: Any) -> dict[str, str]:
    """The LR scheduler class, its settings (from the live object) and its interval/frequency/monitor.

    Args:
        configs: ``trainer.lr_scheduler_configs`` (objects with ``scheduler``, ``interval``, ``frequency``,
            ``monitor``) or bare schedulers (interval then unknown).

    Example::

        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> p = scheduler_params([torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)])
        >>> p["lr_scheduler/name"], p["lr_scheduler/step_size"], p["lr_scheduler/gamma"]
        ('StepLR', '5', '0.5')
    """
    items = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    out: dict[str, str] = {}
    for i, cfg in enumerate(items):
        sched = getattr(cfg, "scheduler", cfg)
        base = "lr_scheduler" if len(items) == 1 else f"lr_scheduler_{i}"
        out[f"{base}/name"] = type(sched).__name__
        for k, v in _init_settings(sched, _SCHEDULER_SKIP).items():
            out[f"{base}/{k}"] = _str(v)
        if hasattr(sched, "lr_lambdas"):  # LambdaLR/MultiplicativeLR keep `lr_lambda` as a list
            fns = [_render(f) for f in sched.lr_lambdas]
            out[f"{base}/lr_lambda"] = str(fns[0] if len(set(fns)) == 1 else fns)
        # settings kept only in the optimizer's param groups (OneCycleLR's max_lr); `initial_lr` is left out,
        # it is the optimizer's lr when the scheduler was made (logged as optimizer/lr or the `lr` hparam)
        for k in ("max_lr",):
            groups = getattr(getattr(sched, "optimizer", None), "param_groups", None) or []
            vals = [g[k] for g in groups if k in g]
            if vals and f"{base}/{k}" not in out:
                out[f"{base}/{k}"] = _str(vals[0] if len(set(map(str, vals))) == 1 else vals)
        if sched is not cfg:
            for k in ("interval", "frequency", "monitor"):
                v = getattr(cfg, k, None)
                if v is not None:
                    out[f"{base}/{k}"] = _str(v)
    return out


def _shuffles(loader: Any) -> bool | None:
    from torch.utils.data import RandomSampler, SequentialSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if getattr(loader, "batch_size", 1) is None and batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", sampler)
    if isinstance(sampler, RandomSampler):
        return True
    if isinstance(sampler, SequentialSampler):
        return False
    if sampler is not None and hasattr(sampler, "shuffle"):  # DistributedSampler and friends
        return bool(sampler.shuffle)
    inner = getattr(sampler, "_sampler", None) or getattr(sampler, "sampler", None)  # wrappers
    if inner is not None and inner is not sampler:
        return _shuffles(type("L", (), {"sampler": inner, "batch_size": 1})())
    return None


def dataloader_params(loaders: Any, name: str) -> dict[str, str]:
    """batch_size, num_workers, pin_memory, shuffle, drop_last (and the sampler, unless a plain Random/Sequential one) of one or more dataloaders.

    Keys are ``<name>/<setting>``; several loaders give ``<name>_<i>/<setting>``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> dl = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2, shuffle=True)
        >>> p = dataloader_params(dl, "train_dataloader")
        >>> p["train_dataloader/batch_size"], p["train_dataloader/shuffle"]
        ('2', 'True')
    """
    if loaders is None:
        return {}
    if isinstance(loaders, Mapping):
        items = list(loaders.items())
    elif isinstance(loaders, (list, tuple)):
        items = [(str(i), dl) for i, dl in enumerate(loaders)]
    else:
        items = [("", loaders)]
    out: dict[str, str] = {}
    for i, (label, dl) in enumerate(items):
        base = name if len(items) == 1 else f"{name}_{label or i}"
        batch_size = getattr(dl, "batch_size", None)
        if batch_size is None:
            batch_size = getattr(getattr(dl, "batch_sampler", None), "batch_size", None)
        out[f"{base}/batch_size"] = _str(batch_size)
        out[f"{base}/num_workers"] = _str(getattr(dl, "num_workers", None))
        out[f"{base}/pin_memory"] = _str(getattr(dl, "pin_memory", None))
        out[f"{base}/shuffle"] = _str(_shuffles(dl))
        out[f"{base}/drop_last"] = _str(getattr(dl, "drop_last", None))
        sampler = getattr(dl, "sampler", None)
        if sampler is not None and type(sampler).__name__ not in ("RandomSampler", "SequentialSampler"):
            out[f"{base}/sampler"] = type(sampler).__name__  # the plain two are what `shuffle` already says
    return out


def trainer_params(trainer: pl.Trainer) -> dict[str, str]:
    """max_epochs, max_steps, accumulate_grad_batches, gradient clipping (value and algorithm), precision."""
    clip_alg = getattr(trainer, "gradient_clip_algorithm", None)
    precision = str(trainer.precision)
    return {
        "max_epochs": _str(trainer.max_epochs),
        "max_steps": _str(trainer.max_steps),
        "accumulate_grad_batches": _str(trainer.accumulate_grad_batches),
        "gradient_clip_val": _str(trainer.gradient_clip_val),
        "gradient_clip_algorithm": _str(clip_alg),
        "precision": precision,
        "amp": str("mixed" in precision),
        "deterministic_algorithms": str(_deterministic()),
    }


def _deterministic() -> bool:
    import torch

    return bool(torch.are_deterministic_algorithms_enabled())


def callback_params(callbacks: Iterable[Any]) -> dict[str, str]:
    """EarlyStopping and ModelCheckpoint monitor, mode and patience (and a few related settings)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    out: dict[str, str] = {}
    counts: dict[str, int] = {}
    spec = {
        EarlyStopping: ("early_stopping", ("monitor", "mode", "patience", "min_delta", "stopping_threshold")),
        ModelCheckpoint: ("model_checkpoint", ("monitor", "mode", "save_top_k", "every_n_epochs", "save_last")),
    }
    for cb in callbacks:
        for cls, (name, attrs) in spec.items():
            if isinstance(cb, cls):
                counts[name] = counts.get(name, 0) + 1
                base = name if counts[name] == 1 else f"{name}_{counts[name]}"
                for a in attrs:
                    if hasattr(cb, a):
                        v = getattr(cb, a)
                        if a == "min_delta" and hasattr(cb, "mode"):
                            v = abs(float(v))  # EarlyStopping stores it signed by mode
                        out[f"{base}/{a}"] = _str(v)
    return out


def hparams_params(obj: Any, prefix: str) -> dict[str, str]:
    """A module's or datamodule's ``hparams`` as ``<prefix>/<key>`` params (flattened; secret keys redacted;
    LightningCLI's private ``_...`` entries left out). ``{}`` for an object without ``hparams``."""
    hp = getattr(obj, "hparams", None)
    if not hp:
        return {}
    from lightning_mlflow_cv._facts.keys import flatten

    # LightningCLI adds private entries (``_instantiator``, ``_class_path``); they are not hyperparameters
    flat = flatten({k: v for k, v in dict(hp).items() if not str(k).startswith("_")})
    return {f"{prefix}/{k}": (REDACTED if is_secret_key(k) else _str(v)) for k, v in flat.items()}


def implicit_hyperparameters(
    trainer: pl.Trainer, pl_module: pl.LightningModule, transform: Any = None, transform_prefix: str = "augment"
) -> dict[str, str]:
    """Every implicit hyperparameter of a fit whose optimizers, schedulers and dataloaders exist (train start).

    ``optimizer/*``, ``lr_scheduler/*``, the Trainer's settings, ``train_dataloader/*``, ``val_dataloader/*``,
    ``early_stopping/*``, ``model_checkpoint/*``, ``model/*`` and ``data/*`` (the ``hparams``) and
    ``<transform_prefix>/*`` (``transform``, default: the one :func:`find_train_transform` finds).
    """
    params: dict[str, str] = {}
    params.update(optimizer_params(trainer.optimizers))
    if trainer.lr_scheduler_configs:
        params.update(scheduler_params(trainer.lr_scheduler_configs))
    params.update(trainer_params(trainer))
    params.update(dataloader_params(trainer.train_dataloader, "train_dataloader"))
    params.update(dataloader_params(trainer.val_dataloaders, "val_dataloader"))
    params.update(callback_params(getattr(trainer, "callbacks", [])))
    params.update(hparams_params(pl_module, "model"))
    params.update(hparams_params(getattr(trainer, "datamodule", None), "data"))
    transform = transform if transform is not None else find_train_transform(trainer)
    if transform is not None:
        params.update(transform_params(transform, transform_prefix))
    return params
