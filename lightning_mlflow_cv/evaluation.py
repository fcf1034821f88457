"""``evaluate``: ``mlflow.models.evaluate`` (or the task's own metrics) on a logged or registered servable model.

It loads the pyfunc that :class:`~lightning_mlflow_cv.ModelRegistryCallback` logs, runs it over a test dataloader
exactly as it serves (raw ``uint8`` images in, post-processed outputs out) and logs the task's metrics to a run.
Deciding what to do with a version (gates, champion alias) is :mod:`lightning_mlflow_cv.promotion`'s job.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _raw_batches(dataloader: Iterable[Any], cfg: Mapping[str, Any]) -> Iterable[tuple[Any, Any]]:
    """(raw uint8 images in the model's layout, targets) per batch; float images are de-normalised with the
    model's own mean/std."""
    import numpy as np
    import torch

    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    for batch in dataloader:
        if isinstance(batch, Mapping):
            x = batch.get("images", batch.get("image"))
            y = batch.get("targets", batch.get("target", batch.get("labels", batch.get("label"))))
        else:
            x, y = batch[0], batch[1]
        if x.is_floating_point():
            x = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        if cfg["layout"] == "NHWC":
            x = x.permute(0, 2, 3, 1)
        yield np.ascontiguousarray(x.cpu().numpy()), y


def evaluate(
    model_uri: str,
    dataloader: Iterable[Any],
    *,
    task: str = "classification",
    class_names: Sequence[str] | None = None,
    run_id: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, float]:
    """Evaluate a logged or registered servable model (``models:/...`` or ``runs:/...``) over a dataloader.

    The dataloader yields ``(images, targets)`` (or dicts with ``images``/``targets``). Float images are taken
    as normalised with the model's own mean and std (what the training dataloaders yield) and turned back into
    raw ``uint8`` images, so the model runs exactly as it serves.

    - ``classification``: builds a predictions table (``label``, ``prediction``, ``prob_<class>``), logs it as
      ``eval/predictions.json``, and calls ``mlflow.models.evaluate(model_type="classifier")`` with the model's
      ``model_id`` so the metrics (macro precision / recall / F1, confusion matrix, ...) show in MLflow's
      evaluation view linked to the model. Adds ``roc_auc_macro`` (torchmetrics) from the probabilities.
    - ``segmentation``: mean IoU and pixel accuracy (torchmetrics) of the predicted masks.
    - ``detection``: mAP and mAP50 (torchmetrics ``MeanAveragePrecision``; targets are lists of dicts).
    - ``instance-segmentation``: ``mask_AP``, ``bbox_AP``, ``mask_AP50``, ``bbox_AP50`` (targets: lists of dicts
      with ``boxes``, ``labels``, ``masks``).
    - ``anomaly-detection``: ``AUROC``, ``AUPRC``, ``F1_at_best_threshold``, ``best_threshold`` (targets ``(N,)``).
    - ``depth-estimation``: ``AbsRel``, ``SqRel``, ``RMSE``, ``RMSE_log``, ``delta_1..3`` (targets: depth maps,
      0/NaN invalid; predictions are resized to the targets' size).

    Every task of :mod:`lightning_mlflow_cv.tasks` is accepted, by its name or short name.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``models:/<model_id>`` or ``runs:/...``.
        dataloader: Batches of images and targets.
        task: What the model predicts.
        class_names: Class names for the table (default: ``0..C-1``).
        run_id: Run to log into (default: the model's source run, else a new run in ``experiment_name``).
        experiment_name: Experiment of a new run.
        tracking_uri: Tracking URI (default: MLflow's current one).

    Returns:
        The metrics logged.

    Raises:
        ValueError: on an unknown ``task`` or a model that was not logged by ``ModelRegistryCallback``.

    Example::

        from lightning_mlflow_cv import evaluate

        metrics = evaluate("models:/digits-cnn@champion", dm.test_dataloader())
        print(metrics["accuracy_score"], metrics["f1_score"])
    """
    import mlflow
    import numpy as np
    import torch

    from lightning_mlflow_cv import tasks as _tasks

    cv_task = _tasks.get_task(task, "evaluate")
    previous_uri = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        try:
            impl = model.unwrap_python_model()
        except Exception:  # noqa: BLE001 - a loader_module model (MLflow < 2.13) is not a PythonModel
            impl = getattr(model, "_model_impl", None)
        cfg = getattr(impl, "config", None)
        if not isinstance(cfg, Mapping) or "mean" not in cfg:
            raise ValueError(
                f"evaluate: {model_uri!r} is not a model logged by ModelRegistryCallback (no preprocess config). "
                "Log it with ModelRegistryCallback, or call mlflow.models.evaluate yourself."
            )
        meta = model.metadata
        model_id = getattr(meta, "model_id", None)
        run_id = run_id or getattr(meta, "run_id", None)
        ys: list[Any] = []
        preds: list[Any] = []
        for raw, y in _raw_batches(dataloader, cfg):
            preds.append(model.predict(raw))
            ys.append(y)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()
        if run_id is None:
            exp = mlflow.set_experiment(experiment_name or "evaluation")
            run_id = client.create_run(exp.experiment_id, run_name="evaluate").info.run_id
        if cv_task.name == "classification":
            return _evaluate_classifier(
                client,
                run_id,
                model_id,
                np.concatenate(preds),
                torch.cat([torch.as_tensor(t) for t in ys]),
                class_names,
            )
        metrics = cv_task.served_metrics(preds, ys, class_names)
        client.log_batch(run_id, metrics=_metric_entities(metrics))
        return metrics
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous_uri)


def _metric_entities(metrics: Mapping[str, float], prefix: str = "eval/") -> list[Any]:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(f"{prefix}{k}", float(v), ts, 0) for k, v in metrics.items()]


def _evaluate_classifier(
    client: Any, run_id: str, model_id: str | None, probs: Any, targets: Any, class_names: Sequence[str] | None
) -> dict[str, float]:
    import mlflow
    import pandas as pd
    import torch
    from torchmetrics.functional.classification import multiclass_auroc

    from lightning_mlflow_cv._compat import mlflow_api as _compat

    num_classes = probs.shape[1]
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    df = pd.DataFrame({"label": targets.numpy().astype(int), "prediction": probs.argmax(1).astype(int)})
    for i, n in enumerate(names):
        df[f"prob_{n}"] = probs[:, i]
    uri = client._tracking_client.tracking_uri
    with_model = _compat.logged_models_supported(client, uri)
    model_kw: dict[str, Any] = {"model_id": model_id} if with_model and model_id else {}
    import inspect

    takes = inspect.signature(mlflow.start_run).parameters
    # MLflow >= 2.8 can start system metrics with the run; this short evaluation run wants none
    no_sysmetrics: dict[str, Any] = {"log_system_metrics": False} if "log_system_metrics" in takes else {}
    with mlflow.start_run(run_id=run_id, **no_sysmetrics) as run:
        if with_model:
            mlflow.log_table(df, "eval/predictions.json", run_id=run.info.run_id)
        else:  # log_table's logged-model path needs MLflow 3 on both sides: the same file and tag, written here
            _log_table_file(client, run.info.run_id, df, "eval/predictions.json")
        auc = float(
            multiclass_auroc(torch.from_numpy(probs).float(), targets.long(), num_classes=num_classes, average="macro")
        )
        if _compat.evaluate_takes_predictions():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = mlflow.models.evaluate(
                    data=df[["label", "prediction"]],
                    targets="label",
                    predictions="prediction",
                    model_type="classifier",
                    evaluators=["default"],
                    **model_kw,
                )
            metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        else:
            _compat.warn_once(
                "evaluate-predictions",
                f"evaluate: MLflow {_compat.version_string()} cannot evaluate a predictions table "
                "(mlflow.models.evaluate(predictions=...) needs MLflow >= 2.8); the classifier metrics are computed "
                "with torchmetrics under MLflow's names and logged to the run, without MLflow's evaluation artifacts.",
            )
            metrics = classifier_metrics(df["prediction"].to_numpy(), df["label"].to_numpy(), num_classes)
            client.log_batch(run.info.run_id, metrics=_metric_entities(metrics, prefix=""))
        mlflow.log_metric("roc_auc_macro", auc, **model_kw)
        metrics["roc_auc_macro"] = auc
    return metrics


def classifier_metrics(pred: Any, target: Any, num_classes: int) -> dict[str, float]:
    """The metrics MLflow's default classifier evaluator logs for a multiclass predictions table (weighted
    averages, as its default ``average="weighted"``), from torchmetrics."""
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    p, t = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
    n = max(int(num_classes), int(p.max()) + 1, int(t.max()) + 1)
    kw: dict[str, Any] = {"num_classes": n, "average": "weighted"}
    return {
        "example_count": float(len(t)),
        "accuracy_score": float((p == t).float().mean()),
        "recall_score": float(multiclass_recall(p, t, **kw)),
        "precision_score": float(multiclass_precision(p, t, **kw)),
        "f1_score": float(multiclass_f1_score(p, t, **kw)),
    }


def _log_table_file(client: Any, run_id: str, df: Any, artifact_file: str) -> None:
    """What ``MlflowClient.log_table`` stores for a JSON table (``orient="split"`` and the run's
    ``mlflow.loggedArtifacts`` tag, so the UI lists it), uploaded with the run's tracking URI."""
    import posixpath
    import tempfile
    from pathlib import Path

    from lightning_mlflow_cv._compat import mlflow_api as _compat

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / posixpath.basename(artifact_file)
        df.to_json(path, orient="split", index=False, date_format="iso")
        _compat.log_artifact(client, run_id, str(path), posixpath.dirname(artifact_file) or None)
    tag = "mlflow.loggedArtifacts"
    current = json.loads(client.get_run(run_id).data.tags.get(tag, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in current:
        client.set_tag(run_id, tag, json.dumps(current + [entry]))
