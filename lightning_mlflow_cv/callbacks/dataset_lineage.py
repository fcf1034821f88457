"""DatasetLineageCallback: an MLflow dataset input per dataloader, SHA-256 digests of dataset files.

Pure parts, usable without a Trainer: :func:`sha256_file` (streamed), :class:`DigestCache` (by path, size,
mtime), :func:`hash_path` (a file or a directory tree), :func:`describe_dataset` (what a dataset is backed by).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger

if TYPE_CHECKING:
    from lightning_mlflow_cv.logger import MLflowCVLogger

__all__ = [
    "CONTEXTS",
    "DatasetLineageCallback",
    "DatasetDescription",
    "DigestCache",
    "HashStats",
    "default_cache_path",
    "describe_dataset",
    "hash_path",
    "sha256_file",
]

_WHO = "DatasetLineageCallback"
Context = Literal["training", "validation", "testing"]
#: MLflow's dataset contexts, in the order the callback logs them.
CONTEXTS: tuple[Context, ...] = ("training", "validation", "testing")
#: MLflow's SQL stores keep at most 36 characters of a dataset digest; the full SHA-256 goes in a param.
_MLFLOW_DIGEST_CHARS = 32
_PATH_ATTRS = ("root", "path", "data_path", "root_dir", "data_dir", "directory", "file", "filename", "archive")
_FILE_LIST_ATTRS = ("samples", "imgs", "files", "paths", "image_paths", "file_list")
_FEATURE_ATTRS = ("data", "images", "x", "inputs", "features", "X")
_TARGET_ATTRS = ("targets", "labels", "y", "target", "label", "Y")


def default_cache_path() -> Path:
    """``$LIGHTNING_MLFLOW_CV_CACHE_DIR/dataset_digests.json``, else ``~/.cache/lightning_mlflow_cv/dataset_digests.json``."""
    env = os.environ.get("LIGHTNING_MLFLOW_CV_CACHE_DIR")
    if env:
        return Path(env) / "dataset_digests.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_mlflow_cv" / "dataset_digests.json"


# ----------------------------------------------------------------------------------------------
# hashing
# ----------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed in ``chunk_size`` chunks into one reused buffer (constant memory).

    Example::

        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> sha256_file(f.name)[:16]
        'ba7816bf8f01cfea'
        >>> os.unlink(f.name)
    """
    h = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


@dataclass
class HashStats:
    """What one :func:`hash_path` call did."""

    files: int = 0
    hashed_files: int = 0
    cached_files: int = 0
    hashed_bytes: int = 0
    total_bytes: int = 0


class DigestCache:
    """Per-file SHA-256 digests keyed by absolute path, valid while the file's size and mtime are unchanged.

    Stored as JSON at ``path`` (written atomically; concurrent writers each keep a consistent file).
    ``path=None`` keeps the cache in memory only.

    Example::

        cache = DigestCache("~/.cache/lightning_mlflow_cv/dataset_digests.json")
        digest, stats = hash_path("/data/imagenet/train", cache)
        cache.save()
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict) and data.get("version") == 1:
                    self._entries = dict(data.get("files", {}))
            except (OSError, ValueError) as err:
                warnings.warn(
                    f"{_WHO}: the digest cache {self.path} is unreadable ({err}); files are hashed again and the "
                    "cache is rewritten.",
                    UserWarning,
                    stacklevel=2,
                )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The cached digest of ``path`` when its size and mtime are still ``size``/``mtime_ns``."""
        e = self._entries.get(path)
        if e and e[0] == size and e[1] == mtime_ns:
            return str(e[2])
        return None

    def put(self, path: str, size: int, mtime_ns: int, digest: str) -> None:
        with self._lock:
            self._entries[path] = [size, mtime_ns, digest]
            self._dirty = True

    def save(self) -> None:
        """Write the cache (atomically) when it changed. Failures warn; hashing never fails the fit."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # merge with what another process wrote meanwhile
            on_disk: dict[str, Any] = {}
            if self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    on_disk = dict(data.get("files", {})) if isinstance(data, dict) else {}
                except (OSError, ValueError):
                    on_disk = {}
            on_disk.update(self._entries)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "files": on_disk}, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as err:
            warnings.warn(
                f"{_WHO}: could not write the digest cache {self.path} ({err}); the next run hashes again. "
                "Fix: pass a writable `cache_path=` (or cache_path=None to keep it in memory).",
                UserWarning,
                stacklevel=2,
            )


def _iter_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / n for n in sorted(filenames))
    return files


def hash_path(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    cache: DigestCache | None = None,
    chunk_size: int = 1 << 20,
) -> tuple[str, HashStats]:
    """SHA-256 of a file, a directory tree, or a list of files, using ``cache`` for unchanged files.

    A single file gives its own SHA-256 (so it equals ``sha256sum FILE``). A directory or a list gives the
    SHA-256 of the manifest ``"<sha256>  <relative path>\\n"`` per file, sorted by path (the format of
    ``sha256sum``'s output), so renaming, adding or changing any file changes the digest.

    Raises:
        FileNotFoundError: a path does not exist.

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("abc")
        >>> digest, stats = hash_path(d)
        >>> len(digest), stats.hashed_files
        (64, 1)
    """
    cache = cache if cache is not None else DigestCache(None)
    stats = HashStats()
    single = isinstance(paths, (str, os.PathLike))
    roots = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    entries: list[tuple[str, str]] = []
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        raise FileNotFoundError(f"{_WHO}: dataset path(s) {missing[:5]} do not exist.")
    common = os.path.commonpath([os.path.abspath(r if r.is_dir() else r.parent) for r in roots]) if roots else ""
    for root in roots:
        base = os.path.abspath(root if root.is_dir() else root.parent) if single else common
        for f in _iter_files(root):
            st = f.stat()
            key = str(f.resolve())
            stats.files += 1
            stats.total_bytes += st.st_size
            digest = cache.get(key, st.st_size, st.st_mtime_ns)
            if digest is None:
                digest = sha256_file(f, chunk_size)
                cache.put(key, st.st_size, st.st_mtime_ns, digest)
                stats.hashed_files += 1
                stats.hashed_bytes += st.st_size
            else:
                stats.cached_files += 1
            rel = Path(os.path.relpath(os.path.abspath(f), base)).as_posix()
            entries.append((rel, digest))
    if single and len(entries) == 1 and roots[0].is_file():
        return entries[0][1], stats
    manifest = "".join(f"{d}  {p}\n" for p, d in sorted(entries))
    return hashlib.sha256(manifest.encode()).hexdigest(), stats


# ----------------------------------------------------------------------------------------------
# what a dataset is backed by
# ----------------------------------------------------------------------------------------------
@dataclass
class DatasetDescription:
    """How a dataset is backed: ``kind`` is ``"arrays"``, ``"files"`` or ``"unknown"``."""

    kind: Literal["arrays", "files", "unknown"]
    name: str
    features: Any = None
    targets: Any = None
    paths: list[Path] = field(default_factory=list)
    root: Path | None = None


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _is_array(x: Any) -> bool:
    import numpy as np

    return (hasattr(x, "detach") and hasattr(x, "shape")) or isinstance(x, np.ndarray)


def _unwrap(dataset: Any) -> tuple[Any, Any]:
    """(innermost dataset, row indices or None) through ``Subset`` chains."""
    indices = None
    depth = 0
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices") and depth < 8:
        idx = list(dataset.indices)
        indices = idx if indices is None else [idx[i] for i in indices]
        dataset = dataset.dataset
        depth += 1
    return dataset, indices


def _local_path(value: Any) -> Path | None:
    if isinstance(value, (str, os.PathLike)) and value:
        s = str(value)
        if "://" in s and not s.startswith("file://"):
            return None
        p = Path(s.removeprefix("file://")).expanduser()
        if p.exists():
            return p
    return None


def describe_dataset(dataset: Any) -> DatasetDescription:
    """Classify a dataset: tensor/array backed (``TensorDataset``, or array attributes whose first dimension is
    the dataset length, e.g. ``images``/``labels``), file backed (a ``root``/``path`` attribute that exists, or a
    list of sample files as in ``ImageFolder.samples``), or unknown. Looks through ``Subset``.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> describe_dataset(TensorDataset(torch.zeros(4, 2), torch.ones(4))).kind
        'arrays'
    """
    base, indices = _unwrap(dataset)
    name = type(base).__name__
    try:
        n = len(base)
    except TypeError:
        n = None
    tensors = getattr(base, "tensors", None)
    features = targets = None
    if isinstance(tensors, (list, tuple)) and tensors and all(_is_array(t) for t in tensors):
        features = tensors[0]
        targets = tensors[1] if len(tensors) > 1 else None
    else:
        attrs = (
            {k: v for k, v in vars(base).items() if _is_array(v) and getattr(v, "ndim", 0) >= 1}
            if hasattr(base, "__dict__")
            else {}
        )
        if n is not None:
            attrs = {k: v for k, v in attrs.items() if v.shape[0] == n}
        features = next((attrs[k] for k in _FEATURE_ATTRS if k in attrs), None)
        targets = next((attrs[k] for k in _TARGET_ATTRS if k in attrs), None)
        if features is not None and targets is None and n is not None:  # e.g. CIFAR10: `targets` is a list of ints
            lists = {k: getattr(base, k, None) for k in _TARGET_ATTRS}
            targets = next(
                (
                    v
                    for v in lists.values()
                    if isinstance(v, list) and len(v) == n and v and isinstance(v[0], (int, float))
                ),
                None,
            )
        if features is None and targets is not None:
            features, targets = targets, None
    if features is not None:
        feats, targs = _to_numpy(features), (_to_numpy(targets) if targets is not None else None)
        if indices is not None:
            feats = feats[indices]
            targs = targs[indices] if targs is not None else None
        root = next((p for p in (_local_path(getattr(base, a, None)) for a in _PATH_ATTRS) if p is not None), None)
        return DatasetDescription("arrays", name, features=feats, targets=targs, root=root)
    for attr in _PATH_ATTRS:
        p = _local_path(getattr(base, attr, None))
        if p is not None:
            listed = _listed_files(base)
            if indices is not None and listed:
                listed = [listed[i] for i in indices]
                return DatasetDescription("files", name, paths=listed, root=p)
            return DatasetDescription("files", name, paths=[p], root=p)
    listed = _listed_files(base)
    if listed:
        if indices is not None:
            listed = [listed[i] for i in indices]
        common = Path(os.path.commonpath([str(x) for x in listed])) if listed else None
        return DatasetDescription("files", name, paths=listed, root=common)
    return DatasetDescription("unknown", name)


def _listed_files(base: Any) -> list[Path]:
    for attr in _FILE_LIST_ATTRS:
        items = getattr(base, attr, None)
        if isinstance(items, (list, tuple)) and items:
            first = items[0]
            pick = (lambda x: x[0]) if isinstance(first, (list, tuple)) else (lambda x: x)
            if _local_path(pick(first)) is not None:
                return [Path(pick(x)) for x in items]
    return []


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------
class DatasetLineageCallback(Callback):
    """Record which data a run saw: one MLflow dataset input per dataloader, and SHA-256 digests of dataset files.

    For the train, val and test dataloaders (contexts ``training``, ``validation``, ``testing``):

    - tensor- or array-backed datasets (``TensorDataset``, or a dataset holding arrays such as
      ``images``/``labels`` whose first dimension is its length, also through ``Subset``) are logged with
      MLflow's own ``mlflow.data.from_numpy`` (digest, schema and profile computed by MLflow);
    - file-backed datasets (a ``root``/``path`` attribute naming a local file, directory or archive, or a list
      of sample files as in ``ImageFolder.samples``) are hashed with SHA-256, streamed in chunks; the digest is
      logged as the param ``<context>_dataset_sha256`` and (its first 32 characters, MLflow's limit) as the
      dataset input's digest. Per-file digests are cached on disk by (path, size, mtime), so an unchanged large
      dataset is not read again;
    - other datasets get an input with their name and source only (and one warning).

    Sources are redacted (``user:pass@`` in URLs). Inputs go through the logger's spool like everything else.

    Args:
        sources: Source URI or path per context, e.g. ``{"training": "s3://bucket/train"}``; default: the
            dataset's root path (or, for arrays, the code that built them).
        names: Dataset name per context; default: the root directory's name, else the dataset class name.
        hash_files: Hash file-backed datasets (set False for huge remote mounts).
        cache_path: The digest cache file; default ``$LIGHTNING_MLFLOW_CV_CACHE_DIR/dataset_digests.json`` or
            ``~/.cache/lightning_mlflow_cv/dataset_digests.json``; ``None`` keeps it in memory only.
        chunk_size_mb: Read size for hashing, in MiB.
        contexts: Which contexts to log.

    Raises:
        ValueError: an unknown context in ``sources``, ``names`` or ``contexts``, or a non-positive
            ``chunk_size_mb``.
        RuntimeError: at the first logged dataloader, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks.dataset_lineage import DatasetLineageCallback

        lineage = DatasetLineageCallback(sources={"training": "s3://datasets/pets/v3/train"})
        Trainer(logger=MLflowCVLogger(), callbacks=[lineage]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        sources: Mapping[str, str] | None = None,
        names: Mapping[str, str] | None = None,
        hash_files: bool = True,
        cache_path: str | os.PathLike[str] | None | Literal["default"] = "default",
        chunk_size_mb: float = 1.0,
        contexts: Iterable[Context] = CONTEXTS,
    ) -> None:
        super().__init__()
        for arg, value in (("sources", sources), ("names", names)):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"{_WHO}: `{arg}` must be a mapping from context to string, with contexts in {list(CONTEXTS)}, "
                    f"got {type(value).__name__} {value!r}. Fix: {arg}={{'training': '...'}}."
                )
            bad = [k for k in value if k not in CONTEXTS]
            if bad:
                raise ValueError(
                    f"{_WHO}: `{arg}` has unknown context(s) {bad}; allowed: {list(CONTEXTS)}. "
                    f"Fix: use MLflow's context names, e.g. {arg}={{'training': ...}} (not 'train')."
                )
        contexts = tuple(contexts)
        bad_ctx = [c for c in contexts if c not in CONTEXTS]
        if bad_ctx or not contexts:
            raise ValueError(
                f"{_WHO}: `contexts` must be a non-empty subset of {list(CONTEXTS)}, got {list(contexts)}. "
                "Fix: e.g. contexts=['training', 'validation']."
            )
        _checks.check_number(
            _WHO, "chunk_size_mb", chunk_size_mb, 0, above=True, must="a positive number of MiB",
            fix="leave the default (1.0) or pass e.g. chunk_size_mb=4",
        )  # fmt: skip
        self.sources = dict(sources or {})
        self.names = dict(names or {})
        self.hash_files = bool(hash_files)
        self.cache_path = default_cache_path() if cache_path == "default" else cache_path
        self.chunk_size = max(4096, int(chunk_size_mb * (1 << 20)))
        self.contexts = contexts
        #: context -> {"name", "digest", "sha256"?, "run_id"} of what was logged (kept in checkpoints).
        self.logged: dict[str, dict[str, str]] = {}
        #: context -> HashStats of the last hashing (for inspection and benchmarks).
        self.last_stats: dict[str, HashStats] = {}

    # -- hooks --------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, "training", trainer.train_dataloader)
        self._log(trainer, "validation", trainer.val_dataloaders)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.validate(...)`, or a fit whose val loaders were not loaded yet at train start
        if not trainer.sanity_checking:
            self._log(trainer, "validation", trainer.val_dataloaders)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, "testing", trainer.test_dataloaders)

    # -- work ---------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, context: str, loaders: Any) -> None:
        if context not in self.contexts or loaders is None:
            return
        logger = find_mlflow_logger(trainer, _WHO)
        if not trainer.is_global_zero:
            return
        if isinstance(loaders, Mapping):
            items = list(loaders.values())
        elif isinstance(loaders, (list, tuple)):
            items = list(loaders)
        else:
            items = [loaders]
        datasets = [getattr(dl, "dataset", None) for dl in items]
        datasets = [d for d in datasets if d is not None]
        if not datasets:
            return
        run_id = str(logger.run_id)
        if self.logged.get(context, {}).get("run_id") == run_id:
            return
        self.log_datasets(logger, context, datasets)

    def log_datasets(self, logger: MLflowCVLogger, context: str, datasets: list[Any]) -> dict[str, str]:
        """Describe, hash and log ``datasets`` (one dataloader's, or several) for ``context``; returns what was logged."""
        params: dict[str, str] = {}
        record: dict[str, str] = {"run_id": str(logger.run_id)}
        for i, ds in enumerate(datasets):
            suffix = "" if len(datasets) == 1 else f"_{i}"
            desc = describe_dataset(ds)
            mlflow_ds, sha = self._mlflow_dataset(context, desc, suffix)
            if sha is not None:
                params[f"{context}{suffix}_dataset_sha256"] = sha
                record[f"sha256{suffix}"] = sha
            if mlflow_ds is not None:
                logger.log_dataset(mlflow_ds, context=context)
                record[f"name{suffix}"] = mlflow_ds.name
                record[f"digest{suffix}"] = mlflow_ds.digest
        if params:
            logger.log_params_dict(params)
        self.logged[context] = record
        return record

    def _source(self, context: str, desc: DatasetDescription) -> Any:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        raw = self.sources.get(context)
        if raw is None and desc.root is not None:
            raw = str(desc.root.resolve())
        if raw is None:
            return None
        raw = redact_text(str(raw))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return resolve_dataset_source(raw)
        except Exception:  # noqa: BLE001 - MLflow has no resolver for this scheme: keep it as a plain tag
            return CodeDatasetSource({"uri": raw})

    def _mlflow_dataset(self, context: str, desc: DatasetDescription, suffix: str) -> tuple[Any, str | None]:
        from mlflow.data.numpy_dataset import from_numpy

        from lightning_mlflow_cv._compat.mlflow_api import meta_dataset

        source = self._source(context, desc)
        name = self.names.get(context)
        if name and suffix:
            name = f"{name}{suffix}"
        if desc.kind == "arrays":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = from_numpy(desc.features, targets=desc.targets, source=source, name=name or desc.name)
            return ds, None
        if desc.kind == "files":
            default_name = desc.root.name if desc.root is not None and desc.root.name else desc.name
            sha = None
            if self.hash_files:
                cache = DigestCache(self.cache_path)
                paths: Any = desc.paths[0] if len(desc.paths) == 1 else desc.paths
                try:
                    sha, stats = hash_path(paths, cache, self.chunk_size)
                except OSError as err:
                    warnings.warn(
                        f"{_WHO}: could not hash the {context} dataset at {desc.root} ({err}); its input is logged "
                        "without a content digest. Fix the path or permissions, or pass hash_files=False.",
                        UserWarning,
                        stacklevel=3,
                    )
                else:
                    cache.save()
                    self.last_stats[context + suffix] = stats
            if source is None:
                from mlflow.data.code_dataset_source import CodeDatasetSource

                source = CodeDatasetSource({"dataset": desc.name})
            ds = meta_dataset(source, name=name or default_name, digest=sha[:_MLFLOW_DIGEST_CHARS] if sha else None)
            return ds, sha
        warnings.warn(
            f"{_WHO}: cannot tell what the {context} dataset ({desc.name}) is backed by: it is neither "
            "tensor/array backed (TensorDataset, or arrays such as `images`/`labels`) nor file backed (a `root` or "
            "`path` attribute, or `samples`). It is logged by name and source only. Fix: give it a `root` attribute, "
            f"or pass sources={{'{context}': '<uri>'}}.",
            UserWarning,
            stacklevel=3,
        )
        if source is None:
            from mlflow.data.code_dataset_source import CodeDatasetSource

            source = CodeDatasetSource({"dataset": desc.name})
        return meta_dataset(source, name=name or desc.name), None

    # -- state --------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # one per set of contexts: each keeps what it logged
        return self._generate_state_key(contexts=tuple(self.contexts))

    @override
    def state_dict(self) -> dict[str, Any]:
        """What was logged per context (run id, name, digest, sha256), so a resumed fit does not log it again."""
        return {"logged": {k: dict(v) for k, v in self.logged.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged.update({k: dict(v) for k, v in (state_dict.get("logged") or {}).items()})
