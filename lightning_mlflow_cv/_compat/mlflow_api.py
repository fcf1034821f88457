"""Which MLflow this process runs and which features its tracking store has: one place for feature detection.

The package runs with MLflow 2.4 to 3.x as the client and against 2.x or 3.x servers. Every gap is detected
here (never by catching ``ImportError`` somewhere deep) and degrades with one warning, never a crash:

==============================  =========  ==========================================================
feature                         since      without it
==============================  =========  ==========================================================
logged-model API (client)       3.0        the servable model is logged as run artifacts
                                           (``runs:/<run>/model``) and registered from there
logged-model API (server)       3.0        same; detected once per store (404 ``ENDPOINT_NOT_FOUND``)
``mlflow.tracking.multimedia``  2.12       step-aware images are written in the same layout here
``MetaDataset``                 2.10       the dataset input entity is built here
models from code                2.13       the pyfunc is a ``loader_module`` with ``data_path``
``evaluate(predictions=...)``   2.8        classifier metrics from torchmetrics, same names
``mlflow.system_metrics``       2.8        ``SystemMetricsCallback`` logs the same ``system/...`` metrics;
                                           the UI shows them among the run's charts (one warning)
artifact repo takes the URI     3.0        uploads resolve ``mlflow-artifacts:`` against the
                                           run's tracking URI here (not the global one)
==============================  =========  ==========================================================
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import threading
import urllib.request
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from PIL import Image

_lock = threading.Lock()
_warned: set[str] = set()
#: tracking URI -> (server lacks the logged-model API, server's MLflow version or None)
_server_cache: dict[str, tuple[bool, str | None]] = {}


@functools.cache
def mlflow_version() -> tuple[int, int, int]:
    """The installed MLflow version as ``(major, minor, patch)``."""
    import mlflow

    parts = []
    for p in mlflow.__version__.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def version_string() -> str:
    import mlflow

    return str(mlflow.__version__)


@functools.cache
def has_logged_model_api() -> bool:
    """The client has LoggedModels (``create_logged_model``, ``LoggedModelOutput``, ``model_id=``): MLflow 3."""
    import mlflow.entities
    from mlflow import MlflowClient

    return hasattr(mlflow.entities, "LoggedModelOutput") and hasattr(MlflowClient, "create_logged_model")


@functools.cache
def has_multimedia() -> bool:
    """``mlflow.tracking.multimedia`` (step-aware image logging, MLflow 2.12)."""
    return _has_module("mlflow.tracking.multimedia")


@functools.cache
def has_system_metrics() -> bool:
    """``mlflow.system_metrics`` (MLflow 2.8): MLflow's own monitor, and the UI's System metrics tab."""
    return _has_module("mlflow.system_metrics")


@functools.cache
def has_meta_dataset() -> bool:
    """``mlflow.data.meta_dataset.MetaDataset`` (MLflow 2.10/2.11)."""
    return _has_module("mlflow.data.meta_dataset")


@functools.cache
def has_models_from_code() -> bool:
    """``pyfunc.save_model(python_model=<script path>)``: models from code (MLflow 2.13)."""
    return mlflow_version() >= (2, 13, 0)


@functools.cache
def evaluate_takes_predictions() -> bool:
    """``mlflow.models.evaluate(predictions=...)`` evaluates a predictions table without a model (MLflow 2.8)."""
    import mlflow.models

    return "predictions" in inspect.signature(mlflow.models.evaluate).parameters


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def warn_once(key: str, msg: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> bool:
    """Warn ``msg`` once per process for ``key``; returns whether it warned."""
    with _lock:
        if key in _warned:
            return False
        _warned.add(key)
    warnings.warn(msg, category, stacklevel=stacklevel)
    return True


def _is_http(uri: str | None) -> bool:
    return (uri or "").split(":", 1)[0].lower() in ("http", "https")


def server_version(uri: str, timeout: float = 5.0) -> str | None:
    """The MLflow version a tracking server reports at ``/version`` (``None`` when it does not say)."""
    if not _is_http(uri):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/version", timeout=timeout) as r:
            text = r.read(64).decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - auth, proxies, old servers: the version is only informative
        return None
    return text if text and len(text) < 32 and text[0].isdigit() else None


def is_endpoint_not_found(err: BaseException) -> bool:
    """An MLflow error saying the server has no such endpoint (an older server)."""
    code = getattr(err, "error_code", None)
    return code == "ENDPOINT_NOT_FOUND" or "ENDPOINT_NOT_FOUND" in str(err)[:2000]


def logged_models_supported(client: MlflowClient, uri: str) -> bool:
    """Whether LoggedModels work on this client and store. Cached per store after one probe.

    The client must be MLflow 3; an HTTP store must answer ``logged-models/search`` (a 2.x server answers
    404 ``ENDPOINT_NOT_FOUND`` at once). Any other failure (store down, auth) is not taken as an answer and
    the API is assumed present (the call that follows reports that failure).
    """
    if not has_logged_model_api():
        return False
    if not _is_http(uri):
        return True
    with _lock:
        cached = _server_cache.get(uri)
    if cached is not None:
        return not cached[0]
    try:
        client.search_logged_models(experiment_ids=["0"], max_results=1)
    except Exception as err:  # noqa: BLE001 - only a missing endpoint is an answer
        if not is_endpoint_not_found(err):
            return True
        mark_server_lacks_logged_models(uri)
        return False
    with _lock:
        _server_cache[uri] = (False, None)
    return True


def mark_server_lacks_logged_models(uri: str) -> None:
    """Remember that the server at ``uri`` answered 404 ``ENDPOINT_NOT_FOUND`` for the logged-model API."""
    version = server_version(uri)
    with _lock:
        _server_cache[uri] = (True, version)


def server_limit(uri: str) -> str:
    """``"MLflow 2.22.5"`` (what the server reports) or ``"MLflow < 3.0"`` for a store without LoggedModels."""
    with _lock:
        cached = _server_cache.get(uri)
    if cached is not None and cached[1]:
        return f"MLflow {cached[1]}"
    return "MLflow < 3.0"


def no_logged_models_reason(uri: str) -> str:
    """One line: why the model is logged as run artifacts (client or server too old for LoggedModels)."""
    from lightning_mlflow_cv._facts.redact import safe_uri

    if not has_logged_model_api():
        return f"this MLflow {version_string()} client has no logged-model API (MLflow >= 3.0)"
    return (
        f"the tracking server {safe_uri(uri)} ({server_limit(uri)}) has no logged-model API "
        "(404 ENDPOINT_NOT_FOUND; MLflow >= 3.0 servers have it)"
    )


# -- artifacts -------------------------------------------------------------------------------------------
_repo_cache: dict[tuple[str, str], ArtifactRepository] = {}


def _client_uri(client: MlflowClient) -> str | None:
    tc = getattr(client, "_tracking_client", None)
    return getattr(tc, "tracking_uri", None)


def artifact_repo(client: MlflowClient, run_id: str) -> ArtifactRepository:
    """The run's artifact repository, resolved against the *client's* tracking URI.

    MLflow 2.x resolves a proxied (``mlflow-artifacts:``) artifact location with the global tracking URI,
    so a client made with an explicit HTTP URI fails ("the tracking URI must be a valid http or https URI");
    MLflow 3 passes the client's URI. This does what MLflow 3 does, on every version.
    """
    uri = _client_uri(client) or ""
    key = (uri, run_id)
    with _lock:
        repo = _repo_cache.get(key)
    if repo is not None:
        return repo
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    artifact_uri = client.get_run(run_id).info.artifact_uri
    if artifact_uri.startswith("mlflow-artifacts:") and _is_http(uri):
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
        from mlflow.store.artifact.mlflow_artifacts_repo import (
            MlflowArtifactsRepository,
        )

        repo = HttpArtifactRepository(MlflowArtifactsRepository.resolve_uri(artifact_uri, uri))
    else:
        repo = get_artifact_repository(artifact_uri)
    with _lock:
        if len(_repo_cache) > 256:
            _repo_cache.clear()
        _repo_cache[key] = repo
    return repo


def log_artifact(client: MlflowClient, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    """``client.log_artifact`` that uses the client's tracking URI on every MLflow version."""
    if mlflow_version() >= (3, 0, 0):
        client.log_artifact(run_id, local_path, artifact_path)
        return
    artifact_repo(client, run_id).log_artifact(local_path, artifact_path)


def log_artifacts(client: MlflowClient, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    """``client.log_artifacts`` that uses the client's tracking URI on every MLflow version."""
    if mlflow_version() >= (3, 0, 0):
        client.log_artifacts(run_id, local_dir, artifact_path)
        return
    artifact_repo(client, run_id).log_artifacts(local_dir, artifact_path)


# -- images and datasets -----------------------------------------------------------------------------------
COMPRESSED_IMAGE_SIZE = 256  # MLflow's own value (mlflow.tracking.multimedia.COMPRESSED_IMAGE_SIZE)


def compress_image_size(image: Image.Image) -> Image.Image:
    """The UI's thumbnail: MLflow's ``compress_image_size`` where it exists, the same resize otherwise."""
    if has_multimedia():
        from mlflow.tracking.multimedia import compress_image_size as mlflow_compress

        return mlflow_compress(image)
    width, height = image.size
    if width > height:
        new_w, new_h = COMPRESSED_IMAGE_SIZE, int(height * (COMPRESSED_IMAGE_SIZE / width))
    else:
        new_h, new_w = COMPRESSED_IMAGE_SIZE, int(width * (COMPRESSED_IMAGE_SIZE / height))
    return image.resize((new_w, new_h))


def meta_dataset(source: Any, name: str, digest: str | None = None) -> Any:
    """A dataset with a name, a source and an optional digest: MLflow's ``MetaDataset`` where it exists;
    on older MLflow (< 2.10) the ``Dataset`` entity it would produce (same fields and digest)."""
    if has_meta_dataset():
        from mlflow.data.meta_dataset import MetaDataset

        # MLflow leaves Dataset.profile abstract on MetaDataset, but Dataset has no ABCMeta: it instantiates.
        return MetaDataset(source, name=name, digest=digest)  # type: ignore[abstract]
    from mlflow.entities import Dataset

    config = {"name": name, "source": source.to_json(), "source_type": source._get_source_type(), "schema": ""}
    if digest is None:  # MetaDataset._compute_digest, for a dataset without a schema
        digest = hashlib.sha256(json.dumps(config).encode("utf-8")).hexdigest()[:8]
    return Dataset(name=name, digest=digest, source_type=config["source_type"], source=config["source"])
