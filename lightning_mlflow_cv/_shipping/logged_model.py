"""The servable model's place in MLflow: the LoggedModel of the run, its metrics and its registered versions.

MLflow 3 keeps a model as a LoggedModel (``models:/<model_id>``) with its own metrics and a link to each
registered version; MLflow 2.x (client or server) has none, and the model is the run artifact ``model``. Used by
:class:`~lightning_mlflow_cv.callbacks.model_registry.ModelRegistryCallback`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_mlflow_cv._compat import mlflow_api as _compat

SaveModel = Callable[[Path, Any], None]
"""Writes the MLflow model directory (path, ``mlflow.models.Model`` metadata or ``None``)."""


def log_logged_model(
    client: Any, run: Any, name: str, model_type: str, model_dir: Path, save: SaveModel, step: int
) -> str:
    """MLflow 3 on both sides: save the model as a LoggedModel of ``run``; returns its ``model_id``."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    lm = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name.replace("/", "_")[:200],
        source_run_id=run_id,
        model_type=model_type,
        tags={"mlflow.source.run_id": run_id},
    )
    save(
        model_dir,
        Model(artifact_path=lm.artifact_location, run_id=run_id, model_uuid=lm.model_id, model_id=lm.model_id),
    )
    client.log_model_artifacts(lm.model_id, str(model_dir))
    client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=step)])
    return str(lm.model_id)


def log_run_model(client: Any, run_id: str, model_dir: Path, save: SaveModel) -> None:
    """No logged-model API (MLflow 2.x client or server): the model is the run artifact ``model``
    (``runs:/<run>/model``), as ``mlflow.pyfunc.log_model`` stores it on MLflow 2."""
    from mlflow.models import Model

    save(model_dir, Model(artifact_path="model", run_id=run_id))
    _compat.log_artifacts(client, run_id, str(model_dir), "model")


def metrics_take_model_id() -> bool:
    """The client's ``Metric`` carries a ``model_id`` (MLflow 3): metrics can be linked to a LoggedModel."""
    from mlflow.entities import Metric

    return "model_id" in inspect.signature(Metric.__init__).parameters


def link_run_metrics(client: Any, run_id: str, model_id: str, keys: Any = None) -> int:
    """Link the run's final metrics to the LoggedModel, so its page lists them (MLflow's model "Metrics").

    The last point (highest step, then latest) of each metric in ``keys`` (default: all but ``system/*``) is
    logged again with ``model_id``, as ``mlflow.<flavor>.log_model`` does for the metrics of its step. The
    point is identical, so the run's history does not grow (the store keeps one copy). Returns how many metrics
    were linked; 0 on an MLflow without ``Metric.model_id``.
    """
    if not metrics_take_model_id():
        return 0
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    if keys is None:
        keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    points = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            points.append(Metric(last.key, last.value, last.timestamp, last.step, model_id=model_id, run_id=run_id))
    for i in range(0, len(points), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=points[i : i + MAX_METRICS_PER_BATCH])
    return len(points)


def create_version(client: Any, uri: str, name: str, model_id: str, run_id: str, tags: dict[str, str]) -> Any:
    """A model version whose source is ``models:/<model_id>`` (so MLflow links it to the LoggedModel).

    A local SQL store resolves that source with the *global* tracking URI (an MLflow TODO), so the URI is
    pinned for the call with MLflow's own scoped helper; without that helper, the artifact location is the
    source (the version still loads, without the UI link).
    """
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow
        source = client.get_logged_model(model_id).artifact_location
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
    with _use_tracking_uri(uri):
        return client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
        )


def link_version(client: Any, model_id: str, name: str, version: Any) -> None:
    """Tag the LoggedModel with its version (``mlflow.modelVersions``), as ``mlflow.register_model`` does.

    ``create_model_version(..., model_id=...)`` does not set that tag on a SQL store, and without it the UI's
    model page says "Not registered". Existing entries are kept; a version already listed is not repeated.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    entry = {"name": name, "version": version}  # the version as the store returned it, as register_model keeps it
    existing = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    entries = json.loads(existing) if existing else []
    if entry not in entries:
        entries.append(entry)
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})
