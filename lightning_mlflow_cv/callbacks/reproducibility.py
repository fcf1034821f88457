"""ReproducibilityCallback: seeds, hardware, framework versions, pip freeze, git state and implicit hyperparameters.

The pure parts (transform flattening, optimizer/scheduler/dataloader extraction, system information, the
requirements list, git state) are plain functions, usable and testable without a Trainer. The callback's
hooks are a guard plus one call each.
"""

from __future__ import annotations

import configparser
import enum
import importlib.metadata as importlib_metadata
import inspect
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._context import find_mlflow_logger
from lightning_mlflow_cv._params import drop_repeated
from lightning_mlflow_cv._redact import REDACTED, is_secret_key, redact, redact_text

if TYPE_CHECKING:
    from lightning_mlflow_cv.logger import MLflowCVLogger

__all__ = [
    "ReproducibilityCallback",
    "callback_params",
    "dataloader_params",
    "find_train_transform",
    "framework_params",
    "git_state",
    "optimizer_params",
    "requirements_txt",
    "scheduler_params",
    "system_info",
    "trainer_params",
    "transform_params",
]

_WHO = "ReproducibilityCallback"
#: Environment variables (by prefix) worth keeping in ``environment/system.json``; values are redacted.
ENV_PREFIXES = (
    "CUDA",
    "CUBLAS",
    "CUDNN",
    "NCCL",
    "NVIDIA",
    "OMP_",
    "MKL_",
    "KMP_",
    "PYTORCH",
    "TORCH",
    "PL_",
    "LIGHTNING",
    "MLFLOW",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PYTHONHASHSEED",
    "SLURM_JOB",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
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
            out[f"{key}/type"] = f"{type(child).__module__}.{type(child).__qualname__}" if not inspect.isfunction(
                child
            ) else _str(child)
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
# optimizers, schedulers, dataloaders, trainer, callbacks
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
    if hasattr(sampler, "shuffle"):  # DistributedSampler and friends
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


def framework_params(trainer: pl.Trainer | None = None) -> dict[str, str]:
    """python/pytorch/torchvision/lightning/mlflow versions; CUDA/cuDNN versions, GPU model and count when CUDA is
    available and the Trainer does not run on the CPU; the Trainer's world_size, num_nodes, precision, strategy
    and accelerator.
    """
    import lightning
    import mlflow
    import torch

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv = "not installed"
    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out = {
        "python_version": platform.python_version(),
        "pytorch_version": torch.__version__,
        "torchvision_version": tv,
        "lightning_version": lightning.__version__,
        "mlflow_version": mlflow.__version__,
    }
    acc = type(trainer.accelerator).__name__ if trainer is not None else ""
    if cuda and acc != "CPUAccelerator":  # a CPU run gets no CUDA/GPU params (system.json still lists the GPUs)
        out.update(
            cuda_version=str(torch.version.cuda or "none"),
            cudnn_version=str(cudnn or "none"),
            gpu_model=torch.cuda.get_device_name(0),
            num_gpus=str(torch.cuda.device_count()),
        )
    if trainer is not None:
        out.update(
            world_size=str(trainer.world_size),
            num_nodes=str(trainer.num_nodes),
            precision=str(trainer.precision),
            strategy=str(getattr(trainer.strategy, "strategy_name", None) or type(trainer.strategy).__name__),
            accelerator=acc[: -len("Accelerator")].lower() if acc.endswith("Accelerator") else acc,
        )
    return out


# ----------------------------------------------------------------------------------------------
# environment: requirements, system, git
# ----------------------------------------------------------------------------------------------
def _pip_config_urls() -> list[tuple[str, str]]:
    """(option, url) for index-url / extra-index-url from ``PIP_*`` variables and pip's config files."""
    found: list[tuple[str, str]] = []
    for env, opt in (("PIP_INDEX_URL", "--index-url"), ("PIP_EXTRA_INDEX_URL", "--extra-index-url")):
        for url in os.environ.get(env, "").split():
            found.append((opt, url))
    files = [Path("/etc/pip.conf"), Path.home() / ".pip" / "pip.conf", Path.home() / ".config" / "pip" / "pip.conf"]
    if os.environ.get("VIRTUAL_ENV"):
        files.append(Path(os.environ["VIRTUAL_ENV"]) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    for f in files:
        if not f.is_file():
            continue
        cp = configparser.ConfigParser()
        try:
            cp.read(f)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            for key, opt in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url")):
                for url in cp.get(section, key, fallback="").split():
                    found.append((opt, url))
    seen: set[tuple[str, str]] = set()
    return [x for x in found if not (x in seen or seen.add(x))]


def requirements_txt() -> str:
    """What ``pip freeze`` reports, from ``importlib.metadata`` (no subprocess), secrets redacted.

    Lines are ``name==version`` sorted by name; packages installed from a URL or VCS are
    ``name @ url`` (editable installs are marked); the package indexes pip is configured with come first
    as ``--index-url``/``--extra-index-url`` lines. Credentials in any URL become ``***REDACTED***``.

    Example::

        >>> "torch==" in requirements_txt()
        True
    """
    lines: dict[str, str] = {}
    for dist in importlib_metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in lines:
            continue
        line = f"{name}=={dist.version}"
        try:
            direct = dist.read_text("direct_url.json")
        except OSError:
            direct = None
        if direct:
            try:
                info = json.loads(direct)
            except ValueError:
                info = {}
            url = info.get("url")
            if url:
                vcs = info.get("vcs_info") or {}
                if vcs.get("vcs"):
                    url = f"{vcs['vcs']}+{url}@{vcs.get('commit_id', '')}".rstrip("@")
                editable = (info.get("dir_info") or {}).get("editable")
                line = f"{name} @ {url}" + ("  # editable" if editable else "")
        lines[key] = line
    header = [f"{opt} {url}" for opt, url in _pip_config_urls()]
    body = [lines[k] for k in sorted(lines)]
    return redact_text("\n".join([f"# python {platform.python_version()} ({sys.executable})", *header, *body]) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        try:
            import psutil  # type: ignore[import-not-found]

            return int(psutil.virtual_memory().total)
        except ImportError:
            return None


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    driver = None
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if res.returncode == 0 and res.stdout.strip():
            driver = res.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_total_mb": round(p.total_memory / 2**20),
                "compute_capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
                "driver_version": driver,
            }
        )
    return out


def system_info() -> dict[str, Any]:
    """OS, CPU, RAM, the GPU list (memory, driver), the Python interpreter, the command line and the relevant
    environment variables (``CUDA*``, ``NCCL*``, ``OMP_*``, ``PL_*``, ``MLFLOW*``, ...), all redacted.

    Example::

        >>> info = system_info()
        >>> sorted(info["cpu"])[:2], isinstance(info["gpus"], list)
        (['logical_cores', 'model'], True)
    """
    import torch

    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    ram = _ram_bytes()
    info = {
        "os": {
            "platform": platform.platform(),
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "hostname": platform.node(),
        },
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "ram": {"total_bytes": ram, "total_gb": round(ram / 2**30, 2) if ram else None},
        "gpus": _gpus(),
        "cuda": {
            "available": torch.cuda.is_available(),
            "version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "python": {
            "version": sys.version,
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "argv": [redact_text(a) for a in sys.argv],
        "environment": env,
    }
    return redact(info)


def _git(args: list[str], cwd: str | os.PathLike[str]) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Commit, branch, dirty flag and (when dirty) the diff of the git work tree containing ``path`` (default cwd).

    Returns ``{}`` outside a git work tree (or without git). ``GIT_COMMIT_SHA``/``GIT_BRANCH`` from the
    environment fill in when there is no work tree (CI checkouts without ``.git``). The diff (tracked files
    against ``HEAD``) is redacted.
    """
    cwd = Path(path or os.getcwd())
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    if top is None:
        out: dict[str, Any] = {}
        if os.environ.get("GIT_COMMIT_SHA"):
            out["git_commit"] = os.environ["GIT_COMMIT_SHA"]
        if os.environ.get("GIT_BRANCH"):
            out["git_branch"] = os.environ["GIT_BRANCH"]
        return out
    commit = (_git(["rev-parse", "HEAD"], cwd) or "").strip() or None
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], cwd) or "").strip() or None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    dirty = bool(status and status.strip())
    out = {"git_commit": commit or "none (no commits)", "git_branch": branch or "none", "git_dirty": str(dirty).lower()}
    if dirty:
        diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], cwd) if commit else _git(["diff", "--cached"], cwd)
        out["diff"] = redact_text(diff or "")
    untracked = _git(["ls-files", "--others", "--exclude-standard"], cwd)
    if untracked and untracked.strip():
        out["untracked"] = untracked.strip().splitlines()
    return out


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------
class ReproducibilityCallback(Callback):
    """Capture what it takes to rerun a fit: seeds, versions, hardware, environment, git state and the
    hyperparameters that live in objects rather than in the config.

    At setup (stage ``fit``), when ``seed`` is given, seeds Python, NumPy, torch (CPU and CUDA) and the
    dataloader workers (``lightning.seed_everything(seed, workers=True)``). The callback also seeds when it
    is built, so a model created after it gets seeded weights.

    At fit start it logs, through the :class:`~lightning_mlflow_cv.MLflowCVLogger`:

    - params ``global_seed`` (the given seed, else the one already set by ``seed_everything``, if any),
      ``python_version``, ``pytorch_version``, ``torchvision_version``, ``lightning_version``,
      ``mlflow_version``, ``world_size``, ``num_nodes``, ``precision``, ``strategy``, ``accelerator`` and, on a
      GPU run only, ``cuda_version``, ``cudnn_version``, ``gpu_model``, ``num_gpus``;
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
    logged again, see :func:`lightning_mlflow_cv._params.drop_repeated`.

    Everything is redacted (keys such as password/token/secret/api_key, and ``user:pass@`` in URLs) by the
    logger before it is written. Only global rank zero logs.

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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1):
            raise ValueError(
                f"ReproducibilityCallback: `seed` must be an integer in [0, 2**32 - 1] or None, got {seed!r}. "
                "Fix: pass e.g. seed=42, or seed=None to keep the RNG state that is already set."
            )
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
        pl.seed_everything(self.seed, workers=True, verbose=False)
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
        params = framework_params(trainer)
        params["global_seed"] = self.global_seed()
        if "cuda_version" in params:  # a GPU run: cuDNN's setting matters
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
        params: dict[str, str] = {}
        params.update(optimizer_params(trainer.optimizers))
        if trainer.lr_scheduler_configs:
            params.update(scheduler_params(trainer.lr_scheduler_configs))
        params.update(trainer_params(trainer))
        params.update(dataloader_params(trainer.train_dataloader, "train_dataloader"))
        params.update(dataloader_params(trainer.val_dataloaders, "val_dataloader"))
        params.update(callback_params(trainer.callbacks))
        params.update(_hparams(pl_module, "model"))
        params.update(_hparams(getattr(trainer, "datamodule", None), "data"))
        transform = self.transform if self.transform is not None else find_train_transform(trainer)
        if transform is not None:
            params.update(transform_params(transform, self.transform_prefix))
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


def _hparams(obj: Any, prefix: str) -> dict[str, str]:
    hp = getattr(obj, "hparams", None)
    if not hp:
        return {}
    from lightning_mlflow_cv._keys import flatten

    # LightningCLI adds private entries (``_instantiator``, ``_class_path``); they are not hyperparameters
    flat = flatten({k: v for k, v in dict(hp).items() if not str(k).startswith("_")})
    return {f"{prefix}/{k}": (REDACTED if is_secret_key(k) else _str(v)) for k, v in flat.items()}
