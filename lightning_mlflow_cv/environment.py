"""The environment a run happened in: framework versions, hardware, the Python packages and the git state.

Pure extractors, usable and testable without a Trainer or a store: :class:`~lightning_mlflow_cv.MLflowCVLogger`
reads the ``hardware`` and ``git_commit`` tags here, :class:`~lightning_mlflow_cv.ReproducibilityCallback` the
version params, ``environment/requirements.txt``, ``environment/system.json`` and the git tags and diff, and
:class:`~lightning_mlflow_cv.ModelRegistryCallback` the model card's versions and the servable model's pinned
requirements (all through :func:`framework_versions`). What the values are read from is said per function;
everything that could hold a secret is redacted.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata as importlib_metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_mlflow_cv._facts.redact import redact, redact_argv, redact_text

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "CARD_FRAMEWORKS",
    "ENV_PREFIXES",
    "ENV_TAG_PREFIX",
    "FRAMEWORKS",
    "environment_tags",
    "framework_params",
    "framework_versions",
    "git_commit",
    "git_state",
    "hardware_summary",
    "requirements_txt",
    "system_info",
    "trainer_params",
]

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

# ----------------------------------------------------------------------------------------------
# framework versions and hardware
# ----------------------------------------------------------------------------------------------
#: The frameworks a run depends on, by distribution name, with the module that reports the version.
FRAMEWORKS: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "mlflow": "mlflow",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "numpy": "numpy",
    "lightning-mlflow-cv": "lightning_mlflow_cv",
}
#: What a model card lists by default.
CARD_FRAMEWORKS = (
    "python",
    "torch",
    "torchvision",
    "lightning",
    "mlflow",
    "onnx",
    "onnxruntime",
    "lightning-mlflow-cv",
)


def framework_versions(names: Iterable[str] = CARD_FRAMEWORKS, *, local: bool = True) -> dict[str, str]:
    """``{name: version}`` of the interpreter (``"python"``) and each installed framework in ``names``, in order.

    A framework's version is what its imported module reports (``torch.__version__``, with a local build label
    such as ``+cu130`` that the package metadata lacks); a name outside :data:`FRAMEWORKS` is read from the
    package metadata. A framework that is not installed is left out.

    Args:
        names: Distribution names (keys of :data:`FRAMEWORKS`, or any installed distribution) and ``"python"``.
        local: Keep the local build label; ``False`` drops it (``2.14.1+cu130`` -> ``2.14.1``), what a pinned
            requirement needs.

    Example::

        >>> v = framework_versions(("python", "torch"), local=False)
        >>> list(v), "+" in v["torch"]
        (['python', 'torch'], False)
    """
    out: dict[str, str] = {}
    for name in names:
        if name == "python":
            version: str | None = platform.python_version()
        elif name in FRAMEWORKS:
            try:
                version = str(importlib.import_module(FRAMEWORKS[name]).__version__)
            except (ImportError, AttributeError):
                version = None
        else:
            try:
                version = importlib_metadata.version(name)
            except importlib_metadata.PackageNotFoundError:
                version = None
        if version is not None:
            out[name] = version if local else version.split("+", 1)[0]
    return out


def _cudnn_version() -> int | None:
    import torch

    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def hardware_summary(trainer: pl.Trainer | None = None) -> str:
    """What the run trains on, for the ``hardware`` tag: ``"cpu"``, the GPU model, or ``"<n>x <GPU model>"``.

    A Trainer that does not use CUDA gives ``"cpu"`` even where a GPU is present.
    """
    import torch

    use_cuda = torch.cuda.is_available()
    if trainer is not None:
        use_cuda = use_cuda and trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
    if use_cuda:
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        return f"{n}x {name}" if n > 1 else name
    return "cpu"


#: Prefix of the environment tags (:func:`environment_tags`): facts about where a run ran, not hyperparameters.
ENV_TAG_PREFIX = "environment."


def environment_tags(trainer: pl.Trainer | None = None) -> dict[str, str]:
    """Where the run ran, as run tags under :data:`ENV_TAG_PREFIX`: ``environment.python_version``,
    ``environment.pytorch_version``, ``environment.torchvision_version``, ``environment.lightning_version``,
    ``environment.mlflow_version`` and, when CUDA is available and the Trainer does not run on the CPU,
    ``environment.cuda_version``, ``environment.cudnn_version``, ``environment.gpu_model``,
    ``environment.num_gpus``.

    These are facts about the machine and the installed packages, not choices that define the experiment, so
    they are tags (searchable: ``tags."environment.pytorch_version" = '2.14.1'``) and stay out of the params that
    MLflow's UI lists beside every run (the image cards print all params above the image).

    Example::

        >>> tags = environment_tags()
        >>> sorted(tags)[:2], all(k.startswith(ENV_TAG_PREFIX) for k in tags)
        (['environment.lightning_version', 'environment.mlflow_version'], True)
    """
    import torch

    v = framework_versions(("python", "torch", "torchvision", "lightning", "mlflow"))
    out = {
        "python_version": v["python"],
        "pytorch_version": v["torch"],
        "torchvision_version": v.get("torchvision", "not installed"),
        "lightning_version": v["lightning"],
        "mlflow_version": v["mlflow"],
    }
    acc = type(trainer.accelerator).__name__ if trainer is not None else ""
    # a CPU run gets no CUDA/GPU tags (system.json still lists the GPUs)
    if torch.cuda.is_available() and acc != "CPUAccelerator":
        out.update(
            cuda_version=str(torch.version.cuda or "none"),
            cudnn_version=str(_cudnn_version() or "none"),
            gpu_model=torch.cuda.get_device_name(0),
            num_gpus=str(torch.cuda.device_count()),
        )
    return {ENV_TAG_PREFIX + k: val for k, val in out.items()}


def trainer_params(trainer: pl.Trainer) -> dict[str, str]:
    """The Trainer's settings that shape the result, as params: ``world_size``, ``num_nodes``, ``precision``,
    ``strategy``, ``accelerator``."""
    acc = type(trainer.accelerator).__name__
    return {
        "world_size": str(trainer.world_size),
        "num_nodes": str(trainer.num_nodes),
        "precision": str(trainer.precision),
        "strategy": str(getattr(trainer.strategy, "strategy_name", None) or type(trainer.strategy).__name__),
        "accelerator": acc[: -len("Accelerator")].lower() if acc.endswith("Accelerator") else acc,
    }


def framework_params(trainer: pl.Trainer | None = None) -> dict[str, str]:
    """Environment facts and Trainer settings in one flat dict, unprefixed (``python_version``, ...,
    ``world_size``): :func:`environment_tags` without its prefix plus :func:`trainer_params`.
    :class:`~lightning_mlflow_cv.callbacks.ReproducibilityCallback` logs the first as tags, the second as params.
    """
    out = {k[len(ENV_TAG_PREFIX) :]: v for k, v in environment_tags(trainer).items()}
    if trainer is not None:
        out.update(trainer_params(trainer))
    return out


# ----------------------------------------------------------------------------------------------
# Python packages, system, git
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
    return list(dict.fromkeys(found))  # first occurrence of each, in order


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
            import psutil

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
            "cudnn_version": _cudnn_version(),
        },
        "python": {
            "version": sys.version,
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "argv": redact_argv(sys.argv),
        "environment": env,
    }
    return redact(info)


def _git(args: list[str], cwd: str | os.PathLike[str] | None, timeout: float = 30) -> str | None:
    """``git ARGS`` in ``cwd`` (``None``: the working directory): its stdout, or ``None`` when it fails."""
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
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


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit to tag a run with: ``GIT_COMMIT_SHA`` when set (CI), else ``HEAD`` of the git work tree
    containing ``path`` (default: the working directory); ``None`` outside a work tree or without git."""
    sha = os.environ.get("GIT_COMMIT_SHA")
    if sha:
        return sha
    return (_git(["rev-parse", "HEAD"], path, timeout=5) or "").strip() or None
