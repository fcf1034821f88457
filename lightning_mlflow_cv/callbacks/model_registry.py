"""ModelRegistryCallback: log a servable pyfunc model at fit end, register it, write its model card, then gate it.

The gates, the champion/challenger rule and the alias move are not here: the callback calls
:func:`lightning_mlflow_cv.promotion.promote` (the module that promotes, also behind ``lightning-mlflow-cv promote``),
so a fit and a later CI job apply one rule.
"""

from __future__ import annotations

import inspect
import json
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv import _compat, _export, _http, _pyfunc
from lightning_mlflow_cv import tasks as _tasks
from lightning_mlflow_cv._context import find_mlflow_logger
from lightning_mlflow_cv._summary import NOTE_TAG, run_description
from lightning_mlflow_cv.environment import framework_versions
from lightning_mlflow_cv.promotion import Decision, parse_gates, promote, transition_stage

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from mlflow import MlflowClient

_NAME = "ModelRegistryCallback"
_CARD_KEYS = ("intended_use", "limitations")


def card_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a model card lists: one row per quantity (``train/acc``, not also ``train/acc_step`` and
    ``train/acc_epoch``), no ``system/*`` figures and no ``epoch`` counter.

    Example::

        >>> card_metrics({"train/acc": 0.9, "train/acc_step": 0.8, "train/acc_epoch": 0.9, "epoch": 3.0,
        ...               "val/acc": 0.95, "system/cpu_utilization_percentage": 50.0})
        {'train/acc': 0.9, 'val/acc': 0.95}
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k == "epoch" or k.startswith("system/") or k.endswith("_step"):
            continue
        if k.endswith("_epoch") and k[: -len("_epoch")] in metrics:
            continue
        out[k[: -len("_epoch")] if k.endswith("_epoch") else k] = v
    return out


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    """Markdown table lines of :func:`card_metrics`, sorted by name."""
    shown = card_metrics(metrics)
    return ["| metric | value |", "|---|---|"] + [f"| `{k}` | {float(shown[k]):.6g} |" for k in sorted(shown)]


def model_card_markdown(
    model_name: str,
    *,
    run_id: str,
    weights: str,
    intended_use: str | None,
    limitations: str | None,
    metrics: Mapping[str, float],
    params: Mapping[str, str],
    tags: Mapping[str, str],
    datasets: Sequence[tuple[str, str, str]] = (),
    io: Mapping[str, Any] | None = None,
    extra: Mapping[str, str] | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The ``MODEL_CARD.md`` text (pure: everything comes in as arguments).

    Args:
        model_name: Registered model name.
        run_id: The training run.
        weights: Where the shipped weights came from.
        intended_use: What the model is for (``None``: says it was not stated).
        limitations: Known limitations (``None``: says they were not stated).
        metrics: The run's final metric values.
        params: The run's params; those whose key contains ``sha256`` or ``dataset`` are listed as lineage.
        tags: The run's tags (``hardware``, ``git_commit``, ``latency.device`` are shown).
        datasets: ``(name, digest, context)`` of the run's dataset inputs.
        io: The serving input/output contract.
        extra: More sections, ``{title: text}``.
        versions: Package versions (default: the installed ones).

    Example::

        text = model_card_markdown("digits", run_id="abc", weights="final weights", intended_use="demo",
                                   limitations="8x8 digits only", metrics={"val/acc": 0.97}, params={}, tags={})
    """
    not_stated = "_Not stated. Pass `model_card={{'{}': '...'}}` to ModelRegistryCallback._"
    lines = [
        f"# Model card: {model_name}",
        "",
        f"- Training run: `{run_id}`",
        f"- Weights: {weights}",
        f"- Git commit: `{tags.get('git_commit', 'unknown')}`",
        "",
        "## Intended use",
        "",
        intended_use or not_stated.format("intended_use"),
        "",
        "## Limitations",
        "",
        limitations or not_stated.format("limitations"),
        "",
        "## Training data",
        "",
    ]
    lineage = [(k, v) for k, v in sorted(params.items()) if "sha256" in k.lower() or "dataset" in k.lower()]
    if not datasets and not lineage:
        lines.append("_No dataset lineage recorded (add DatasetLineageCallback)._")
    for name, digest, ctx in datasets:
        lines.append(f"- dataset `{name}` ({ctx or 'unknown context'}), digest `{digest}`")
    for k, v in lineage:
        lines.append(f"- `{k}`: `{v}`")
    lines += ["", "## Metrics", ""]
    lines += metrics_table(metrics)
    if io:
        lines += ["", "## Input and output", ""]
        lines += [f"- {k}: `{v}`" for k, v in io.items()]
    lines += [
        "",
        "## Hardware",
        "",
        f"- Training: {tags.get('hardware', 'unknown')}",
        f"- Latency measured on: {tags.get('latency.device', 'not measured')}",
        f"- Host: {platform.platform()}",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in (versions or framework_versions()).items()]
    for title, text in (extra or {}).items():
        lines += ["", f"## {title}", "", str(text)]
    return "\n".join(lines) + "\n"


def _create_version(client: Any, uri: str, name: str, lm: Any, run_id: str, tags: dict[str, str]) -> Any:
    """A model version whose source is ``models:/<model_id>`` (so MLflow links it to the LoggedModel).

    A local SQL store resolves that source with the *global* tracking URI (an MLflow TODO), so the URI is
    pinned for the call with MLflow's own scoped helper; without that helper, the artifact location is the
    source (the version still loads, without the UI link).
    """
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow
        return client.create_model_version(name, source=lm.artifact_location, run_id=run_id, tags=tags, model_id=lm.model_id)
    with _use_tracking_uri(uri):
        return client.create_model_version(
            name, source=f"models:/{lm.model_id}", run_id=run_id, tags=tags, model_id=lm.model_id
        )


def _link_version(client: Any, model_id: str, name: str, version: Any) -> None:
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


def _registry_client(logger: Any) -> MlflowClient:
    """A client on the logger's store, used as the registry too."""
    from mlflow import MlflowClient

    uri = logger.tracking_uri
    return MlflowClient(uri, registry_uri=uri)


def _fail_fast(logger: Any) -> Any:
    """MLflow calls without minutes of retries: a down store fails in seconds (the logger's timeout, >= 5 s)."""
    return _http.fail_fast(max(float(getattr(logger, "request_timeout_s", 10.0)), 5.0))


class ModelRegistryCallback(Callback):
    """Log a servable MLflow model at fit end, register a new version, gate and promote it, write its card.

    On global rank 0 when training ends (``on_train_end``):

    1. **Dependencies first**: an ``ONNXExportCallback`` and a ``fit_end`` ``InferenceLatencyCallback`` on the
       same Trainer are run first (once), so gates can use ``onnx/max_abs_err`` or ``latency/torch/p95_ms`` whatever
       the callback order.
    2. **The model**: an MLflow pyfunc bundling preprocessing (resize to the training size, scale to [0, 1],
       normalise with ``mean``/``std``), the network, and postprocessing (``softmax``/``sigmoid``
       probabilities, ``boxes`` with NMS, argmax ``masks``). The network is a ``torch.export`` archive
       (``network_format="pt2"``, default) or ONNX; the pyfunc is "models from code". Loading it unpickles
       nothing and needs no user code: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)``.
    3. **Input layout**: ``uint8`` images ``(N, H, W, C)`` in [0, 255] (``layout="NHWC"``, as PIL / OpenCV
       decode them; ``(N, H, W)`` is read as grayscale) or ``(N, C, H, W)`` with ``layout="NCHW"``. Any
       ``H, W``: images are resized to the training size. Signature and input example are two real
       validation images (de-normalised back to ``uint8``).
    4. **Registration**: the model is a LoggedModel of the run (``models:/<model_id>``); a new version of
       ``registered_model_name`` is created from it and gets ``alias``. Where the client or the tracking server
       has no logged-model API (MLflow 2.x), the model is the run artifact ``model`` and the version's source is
       ``runs:/<run>/model`` (one warning; the version tag ``lmc.model_source`` says why).
    5. **Gates and champion**: metrics are read from the run after ``logger.flush()``. The version is promoted
       (``champion_alias`` moves to it, so exactly one champion exists) when every gate passes (a missing
       metric fails) and it beats the current champion on ``compare_metric`` by ``min_improvement``.
       The decision is stored as version tags and in the version description, see
       :func:`~lightning_mlflow_cv.promotion.promote`.
    6. **Model card**: ``MODEL_CARD.md`` (intended use, limitations, dataset lineage from the run's dataset
       inputs and ``*sha256*``/``*dataset*`` params, metrics, hardware, versions), logged as a run artifact,
       bundled with the model and set as the version description (below the decision).

    Registry calls are synchronous. When the store fails, one warning names the error and the local
    directory where the saved model is kept (``<default_root_dir>/unregistered_models/<run id>``); the fit
    never crashes. Run tags ``registry.status`` (``registered`` or ``failed``), ``registry.version`` and
    ``registry.decision`` record the outcome.

    Args:
        registered_model_name: Name in the Model Registry.
        preprocess: ``{"mean": [...], "std": [...], "size": (H, W), "layout": "NHWC"}``; ``mean``/``std`` are
            those the training data was normalised with after scaling to [0, 1] (default: the datamodule's
            ``mean``/``std`` attributes); ``size`` defaults to the training images' size.
        postprocess: ``"softmax"``, ``"sigmoid"``, ``"boxes"``, ``"masks"``, ``"instances"``, ``"anomaly"``,
            ``"depth"`` or ``"none"`` (see :mod:`lightning_mlflow_cv._pyfunc`); default: the post-processing of
            ``task``, else ``"softmax"``.
        alias: Alias set on every new version.
        gates: ``{metric: "<op><number>"}``, e.g. ``{"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50"}``.
        champion_alias: Alias of the champion.
        compare_metric: Metric compared with the champion's (``None``: gates only).
        min_improvement: Least gain over the champion on ``compare_metric``.
        model_card: ``{"intended_use": ..., "limitations": ...}`` plus any extra ``{title: text}`` sections.
        compare_mode: ``"max"`` (higher is better) or ``"min"``.
        use_stages: Legacy stages: ``Staging`` for a new version, ``Production`` with
            ``archive_existing_versions=True`` when promoted (deprecated by MLflow; aliases are set as well).
        network_format: ``"pt2"`` (``torch.export``) or ``"onnx"``.
        class_names: Class names recorded in the model card and the pyfunc config (default: the datamodule's
            ``class_names`` attribute, when it has one).
        postprocess_options: For ``boxes``: ``score_threshold`` (0.05), ``iou_threshold`` (0.5),
            ``max_detections`` (100); for ``instances``: ``score_threshold`` (0.5), ``mask_threshold`` (0.5),
            ``max_detections`` (100).
        task: A task of :mod:`lightning_mlflow_cv.tasks` (or a short name): its served post-processing is the
            default ``postprocess`` (classification: softmax probabilities; detection: boxes; segmentation:
            class-id masks; instance segmentation: instances with masks; anomaly detection: scores (and maps);
            depth estimation: depth maps). Gates name its metrics, e.g. ``{"val/mask_AP": ">=0.5"}`` or
            ``{"val/AbsRel": "<=0.1"}``.

    Raises:
        ValueError: on an invalid argument (at construction) or, at fit start, when no ``mean``/``std`` is
            given and the datamodule has none, or when the tracking store has no Model Registry (a store that
            is down is not an error: the model is kept on disk at fit end).
        RuntimeError: at fit start, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback

        registry = ModelRegistryCallback(
            "digits-cnn",
            preprocess={"mean": [0.2662], "std": [0.3830]},
            gates={"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50"},
            compare_metric="val/acc",
            min_improvement=0.002,
            model_card={"intended_use": "8x8 handwritten digits", "limitations": "grayscale, centred digits"},
        )
        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[ONNXExportCallback(), InferenceLatencyCallback(), registry])
        trainer.fit(model, datamodule=dm)
        mlflow.pyfunc.load_model("models:/digits-cnn@champion").predict(uint8_images_nhwc)
    """

    def __init__(
        self,
        registered_model_name: str,
        preprocess: Mapping[str, Any] | None = None,
        postprocess: Literal["softmax", "sigmoid", "boxes", "masks", "instances", "anomaly", "depth", "none"] | None = None,
        alias: str = "challenger",
        gates: Mapping[str, str] | None = None,
        champion_alias: str = "champion",
        compare_metric: str | None = None,
        min_improvement: float = 0.0,
        model_card: Mapping[str, str] | None = None,
        *,
        compare_mode: Literal["max", "min"] = "max",
        use_stages: bool = False,
        network_format: Literal["pt2", "onnx"] = "pt2",
        class_names: Sequence[str] | None = None,
        postprocess_options: Mapping[str, float] | None = None,
        task: str | None = None,
    ) -> None:
        if not isinstance(registered_model_name, str) or not registered_model_name.strip():
            raise ValueError(
                f"{_NAME}: `registered_model_name` must be a non-empty string, got {registered_model_name!r}. "
                "Example: ModelRegistryCallback('digits-cnn')."
            )
        if "/" in registered_model_name or ":" in registered_model_name:
            raise ValueError(
                f"{_NAME}: `registered_model_name` cannot contain '/' or ':' (MLflow's rule), got "
                f"{registered_model_name!r}. Example: 'team-digits-cnn'."
            )
        self.preprocess = self._check_preprocess(preprocess)
        #: The CV task (canonical name) whose served post-processing is the default ``postprocess``.
        self.task = None if task is None else _tasks.normalize_task(task, _NAME)
        if postprocess is None:
            postprocess = _tasks.get_task(self.task).postprocess if self.task is not None else "softmax"
        if postprocess not in _pyfunc.POSTPROCESS:
            raise ValueError(
                f"{_NAME}: `postprocess` must be one of {_pyfunc.POSTPROCESS}, got {postprocess!r}. Use 'softmax' for "
                "single-label classification, 'sigmoid' for multi-label, 'boxes' for detection, 'masks' for segmentation."
            )
        for arg, value in (("alias", alias), ("champion_alias", champion_alias)):
            if not isinstance(value, str) or not value.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"{_NAME}: `{arg}` must be an alias of letters, digits, '_' or '-', got {value!r}. "
                    "Example: alias='challenger', champion_alias='champion'."
                )
        if alias == champion_alias:
            raise ValueError(
                f"{_NAME}: `alias` and `champion_alias` must differ, both are {alias!r}; the champion alias only "
                "moves when gates pass. Example: alias='challenger', champion_alias='champion'."
            )
        try:
            self.gates = parse_gates(gates)
        except ValueError as err:
            raise ValueError(f"{_NAME}: `gates`: {err}") from err
        if compare_mode not in ("max", "min"):
            raise ValueError(f"{_NAME}: `compare_mode` must be 'max' or 'min', got {compare_mode!r}. Use 'min' for losses.")
        if isinstance(min_improvement, bool) or not isinstance(min_improvement, (int, float)) or min_improvement < 0:
            raise ValueError(f"{_NAME}: `min_improvement` must be a number >= 0, got {min_improvement!r}. Example: 0.005.")
        if compare_metric is not None and (not isinstance(compare_metric, str) or not compare_metric):
            raise ValueError(f"{_NAME}: `compare_metric` must be a metric name or None, got {compare_metric!r}.")
        if model_card is not None and (
            not isinstance(model_card, Mapping) or not all(isinstance(v, str) for v in model_card.values())
        ):
            raise ValueError(
                f"{_NAME}: `model_card` must map section names to text, got {model_card!r}. "
                "Example: model_card={'intended_use': '...', 'limitations': '...'}."
            )
        if network_format not in ("pt2", "onnx"):
            raise ValueError(f"{_NAME}: `network_format` must be 'pt2' or 'onnx', got {network_format!r}.")
        self.registered_model_name = registered_model_name
        self.postprocess = postprocess
        self.alias = alias
        self.champion_alias = champion_alias
        self.compare_metric = compare_metric
        self.min_improvement = float(min_improvement)
        self.model_card = dict(model_card or {})
        self.compare_mode = compare_mode
        self.use_stages = bool(use_stages)
        self.network_format = network_format
        self.class_names = list(class_names) if class_names is not None else None
        self.postprocess_options = dict(postprocess_options or {})
        #: The registered version (str) of the last fit, ``None`` before or on failure.
        self.version: str | None = None
        #: The promotion :class:`~lightning_mlflow_cv.promotion.Decision` of the last fit.
        self.decision: Decision | None = None
        #: LoggedModel id of the last fit's model (``models:/<model_id>``).
        self.model_id: str | None = None
        #: Where the saved model was kept when registration failed.
        self.kept_model_dir: Path | None = None
        self._done_key: tuple[int, int] | None = None

    @staticmethod
    def _check_preprocess(pre: Mapping[str, Any] | None) -> dict[str, Any]:
        if pre is None:
            return {"layout": "NHWC"}
        if not isinstance(pre, Mapping):
            raise ValueError(f"{_NAME}: `preprocess` must be a mapping, got {pre!r}. Example: {{'mean': [0.5], 'std': [0.25]}}.")
        unknown = set(pre) - {"mean", "std", "size", "layout"}
        if unknown:
            raise ValueError(
                f"{_NAME}: `preprocess` has unknown keys {sorted(unknown)}; allowed: mean, std, size, layout."
            )
        out = {"layout": pre.get("layout", "NHWC")}
        if out["layout"] not in _pyfunc.LAYOUTS:
            raise ValueError(f"{_NAME}: `preprocess['layout']` must be one of {_pyfunc.LAYOUTS}, got {out['layout']!r}.")
        for k in ("mean", "std"):
            if k in pre:
                v = pre[k]
                v = [v] if isinstance(v, (int, float)) else v
                if not isinstance(v, Sequence) or not v or not all(isinstance(x, (int, float)) for x in v):
                    raise ValueError(f"{_NAME}: `preprocess['{k}']` must be a number or a list of numbers (one per channel), got {pre[k]!r}.")
                if k == "std" and any(x <= 0 for x in v):
                    raise ValueError(f"{_NAME}: `preprocess['std']` must be > 0, got {pre[k]!r}.")
                out[k] = [float(x) for x in v]
        if ("mean" in out) != ("std" in out):
            raise ValueError(f"{_NAME}: `preprocess` needs both 'mean' and 'std' (or neither), got {dict(pre)!r}.")
        if "size" in pre and pre["size"] is not None:
            s = pre["size"]
            if not isinstance(s, Sequence) or len(s) != 2 or not all(isinstance(x, int) and x > 0 for x in s):
                raise ValueError(f"{_NAME}: `preprocess['size']` must be (H, W) positive ints, got {s!r}.")
            out["size"] = [int(s[0]), int(s[1])]
        return out

    def _norm(self, trainer: pl.Trainer) -> tuple[list[float], list[float]]:
        if "mean" in self.preprocess:
            return self.preprocess["mean"], self.preprocess["std"]
        dm = getattr(trainer, "datamodule", None)
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        if mean is None or std is None:
            raise ValueError(
                f"{_NAME}: no normalisation known: pass preprocess={{'mean': [...], 'std': [...]}} (the values the "
                "training images were normalised with after scaling to [0, 1]), or give the datamodule `mean` and "
                f"`std` attributes (found datamodule {type(dm).__name__ if dm is not None else None})."
            )
        def as_list(v: Any) -> list[float]:
            return [float(x) for x in (v if isinstance(v, Sequence) else [v])]

        return as_list(mean), as_list(std)

    def _class_names(self, trainer: pl.Trainer) -> list[str] | None:
        """``class_names``, else the datamodule's ``class_names`` attribute, else ``None``."""
        if self.class_names is not None:
            return self.class_names
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        return [str(n) for n in names] if isinstance(names, Sequence) and not isinstance(names, str) else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            logger = find_mlflow_logger(trainer, _NAME)
            self._norm(trainer)
            if trainer.is_global_zero:
                self._check_registry(logger)

    def _check_registry(self, logger: Any) -> None:
        """Fail before training when the store has no Model Registry (a store that is down is not checked)."""
        from lightning_mlflow_cv.promotion import require_registry

        with _fail_fast(logger):
            require_registry(_registry_client(logger), _NAME)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.version = self.decision = self.model_id = self.kept_model_dir = None
        self._card_text: str | None = None
        self._done_key = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.register(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After ``trainer.test``: the test metrics join the model card (version description, MODEL_CARD.md)."""
        if not trainer.is_global_zero or getattr(self, "version", None) is None:
            return
        test = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1
        }
        if not test:
            return
        logger = find_mlflow_logger(trainer, _NAME)
        section = "\n".join(["", "## Test metrics", "", *metrics_table(test), ""])
        try:
            with _fail_fast(logger):
                client = _registry_client(logger)
                mv = client.get_model_version(self.registered_model_name, self.version)
                text = (mv.description or "").split("\n## Test metrics\n", 1)[0].rstrip() + "\n" + section
                client.update_model_version(self.registered_model_name, self.version, description=text)
        except Exception as err:  # noqa: BLE001 - tracking failure: the test metrics stay in the run
            warnings.warn(f"{_NAME}: could not add the test metrics to the model card ({err}).", RuntimeWarning, stacklevel=2)
            return
        if getattr(self, "_card_text", None):
            with tempfile.TemporaryDirectory() as tmp:
                card = Path(tmp) / "MODEL_CARD.md"
                card.write_text(self._card_text.rstrip() + "\n" + section)
                logger.log_artifact(card)
                logger.flush()

    # ------------------------------------------------------------------------------------------
    def register(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Decision | None:
        """Log, register, gate and promote once per fit end. Returns the decision (``None`` on failure)."""
        key = (id(trainer), trainer.global_step)
        if self._done_key == key:
            return self.decision
        self._done_key = key
        from lightning_mlflow_cv.callbacks.inference_latency import (
            InferenceLatencyCallback,
        )
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        logger = find_mlflow_logger(trainer, _NAME)
        onnx_cb = _export.find_callback(trainer, ONNXExportCallback)
        if onnx_cb is not None:
            onnx_cb.export(trainer, pl_module)
        lat_cb = _export.find_callback(trainer, InferenceLatencyCallback)
        if lat_cb is not None and lat_cb.when == "fit_end":
            lat_cb.measure(trainer, pl_module)

        module, source = _export.best_module(trainer, pl_module)
        work = Path(tempfile.mkdtemp(prefix="lmc-model-"))
        try:
            bundle = self._bundle(trainer, pl_module, module, work, onnx_cb)
        except Exception as err:  # noqa: BLE001 - never crash the fit
            shutil.rmtree(work, ignore_errors=True)
            reason = f"could not build the servable model: {type(err).__name__}: {' '.join(str(err).split())[:600]}"
            warnings.warn(f"{_NAME}: {reason}. Nothing was registered.", RuntimeWarning, stacklevel=2)
            logger.set_tags({"registry.status": "failed", "registry.error": reason})
            return None
        logger.flush()
        run_id = str(logger.run_id)
        try:
            self._publish(trainer, logger, run_id, source, work, bundle)
        except Exception as err:  # noqa: BLE001 - tracking failure: keep the model on disk
            if not (work / "model" / "MLmodel").is_file():
                try:  # keep a complete, loadable MLflow model (without the registry's ids)
                    self._save_pyfunc(work / "model", bundle, None)
                except Exception:  # noqa: BLE001 - the network file and config are still kept
                    pass
            kept = Path(trainer.default_root_dir).resolve() / "unregistered_models" / run_id
            if kept.exists():
                shutil.rmtree(kept, ignore_errors=True)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(work), str(kept))
            self.kept_model_dir = kept
            if _compat.is_endpoint_not_found(err):  # the store is up but lacks an API: waiting will not help
                from lightning_mlflow_cv._delivery import safe_uri

                uri = getattr(logger, "tracking_uri", "")
                version = _compat.server_version(uri) if uri else None
                then = (
                    f"the store {safe_uri(uri)} (MLflow {version or 'version unknown'}) does not support this call; "
                    "log and register it on a store that does (an MLflow server of this client's major version)"
                )
            else:
                then = "log and register it when the store is back"
            msg = (
                f"{_NAME}: registering {self.registered_model_name!r} failed ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:500]}). The saved model is kept in {kept / 'model'} (it loads with "
                f"mlflow.pyfunc.load_model(path); {then}). The fit result is unaffected."
            )
            print(msg, file=sys.stderr)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.set_tags({"registry.status": "failed", "registry.error": msg[:4000]})
            return None
        shutil.rmtree(work, ignore_errors=True)
        return self.decision

    def _bundle(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: torch.nn.Module, work: Path, onnx_cb: Any
    ) -> dict[str, Any]:
        """Network file, config, input example and signature in ``work``; checks the bundle runs."""
        from mlflow.models.signature import ModelSignature, infer_signature
        from mlflow.types.schema import Schema, TensorSpec

        mean, std = self._norm(trainer)
        sample = _export.sample_input(trainer, pl_module, None, 2)
        channels = int(sample.shape[1])
        if len(mean) == 1 and channels > 1:
            mean, std = mean * channels, std * channels
        layout = self.preprocess["layout"]
        cfg: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "size": self.preprocess.get("size") or [int(sample.shape[-2]), int(sample.shape[-1])],
            "channels": channels,
            "layout": layout,
            "postprocess": self.postprocess,
            "class_names": self._class_names(trainer),
            **self.postprocess_options,
        }
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        raw = ((sample * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
        if layout == "NHWC":
            raw = raw.permute(0, 2, 3, 1)
        raw_np = np.ascontiguousarray(raw.numpy())
        if self.network_format == "onnx":
            if onnx_cb is not None and onnx_cb.onnx_path is not None and onnx_cb.status == "ok":
                source_onnx = onnx_cb.onnx_path
            else:
                source_onnx = _export.export_onnx(module, sample, work / "exported" / "network.onnx")
            if len(_export.onnx_files(source_onnx)) > 1:
                raise ValueError(
                    "the ONNX model keeps its weights in an external-data file (over 2 GB), which the pyfunc "
                    "cannot bundle as one artifact; use network_format='pt2'"
                )
            net = Path(shutil.copy(source_onnx, work / "network.onnx"))
        else:
            net = _export.export_pt2(module, sample, work / "network.pt2")
        config_path = work / _pyfunc.CONFIG_FILE
        config_path.write_text(json.dumps(cfg, indent=2))
        # run the bundle once, exactly as the served model will
        impl = _pyfunc.CVPythonModel()
        impl.config, impl.network = cfg, _pyfunc.Network(net)
        pred = impl.predict(None, raw_np)
        in_shape = (-1, -1, -1, channels) if layout == "NHWC" else (-1, channels, -1, -1)
        inputs = Schema([TensorSpec(np.dtype(np.uint8), in_shape)])
        if isinstance(pred, np.ndarray):
            outputs = infer_signature(raw_np, pred).outputs
            spec = outputs.inputs[0]
            outputs = Schema([TensorSpec(spec.type, (-1, *spec.shape[1:]))])
        elif isinstance(pred, dict) and pred and all(isinstance(v, np.ndarray) for v in pred.values()):
            # task outputs with named arrays (anomaly: scores and maps)
            outputs = Schema([TensorSpec(v.dtype, (-1, *v.shape[1:]), name=k) for k, v in pred.items()])
        else:
            outputs = None
        code = work / "model_code.py"
        code.write_text(_pyfunc.MODEL_CODE)
        bundled = work / "lmc_pyfunc.py"
        shutil.copy(_pyfunc.__file__, bundled)
        return {
            "network": net,
            "config": config_path,
            "code": code,
            "bundled": bundled,
            "example": raw_np,
            "signature": ModelSignature(inputs=inputs, outputs=outputs),
            "cfg": cfg,
        }

    def _save_pyfunc(self, model_dir: Path, b: dict[str, Any], card_path: Path | None, mlflow_model: Any = None) -> None:
        """``mlflow.pyfunc.save_model`` of the bundle (models from code, explicit pinned requirements)."""
        import mlflow

        pins = ["torch", "mlflow", "numpy"]
        if self.postprocess == "boxes":
            pins.append("torchvision")
        if str(b["network"]).endswith(".onnx"):
            pins.append("onnxruntime")
        reqs = [f"{d}=={v}" for d, v in framework_versions(pins, local=False).items()]
        artifacts = {"network": str(b["network"]), "config": str(b["config"])}
        if card_path is not None:
            artifacts["model_card"] = str(card_path)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        if not _compat.has_models_from_code():  # MLflow < 2.13: the pre-models-from-code way, still no pickle
            _compat.warn_once(
                "models-from-code",
                f"{_NAME}: MLflow {_compat.version_string()} has no models from code (MLflow >= 2.13); the servable "
                "model is saved with loader_module='lmc_pyfunc' and its files as data_path (it loads and predicts "
                "the same; nothing is pickled).",
            )
            data = model_dir.parent / _pyfunc.DATA_DIR
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            for f in artifacts.values():
                shutil.copy(f, data / Path(f).name)
            code_kw = "code_paths" if "code_paths" in inspect.signature(mlflow.pyfunc.save_model).parameters else "code_path"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.pyfunc.save_model(
                    path=str(model_dir),
                    loader_module="lmc_pyfunc",
                    data_path=str(data),
                    **{code_kw: [str(b["bundled"])]},
                    signature=b["signature"],
                    input_example=b["example"],
                    mlflow_model=mlflow_model,
                    pip_requirements=reqs,
                )
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                python_model=str(b["code"]),
                artifacts=artifacts,
                code_paths=[str(b["bundled"])],
                signature=b["signature"],
                input_example=b["example"],
                mlflow_model=mlflow_model,
                pip_requirements=reqs,
                # class names where a server or client reads them without loading the model (the MLmodel file)
                metadata={"class_names": b["cfg"]["class_names"]} if b["cfg"].get("class_names") else None,
            )

    def _publish(self, trainer: pl.Trainer, logger: Any, run_id: str, source: str, work: Path, b: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        if run_id.startswith("offline-"):
            raise RuntimeError("the MLflow run was never created (the logger is offline)")
        uri = logger.tracking_uri
        client = _registry_client(logger)
        with _fail_fast(logger):
            run = client.get_run(run_id)  # a down store fails here in seconds, not after minutes of retries
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        metrics.update(run.data.metrics)
        datasets = [
            (d.dataset.name, d.dataset.digest, next((t.value for t in d.tags if t.key == "mlflow.data.context"), ""))
            for d in (run.inputs.dataset_inputs if run.inputs else [])
        ]
        cfg = b["cfg"]
        card_io = {
            "input": f"uint8 {cfg['layout']} images {'(N, H, W, C)' if cfg['layout'] == 'NHWC' else '(N, C, H, W)'}, "
            f"C={cfg['channels']}, any H, W (resized to {tuple(cfg['size'])})",
            "preprocess": f"resize, /255, (x - {cfg['mean']}) / {cfg['std']}",
            "output": self.postprocess,
            "classes": cfg.get("class_names") or "unnamed",
            "network": Path(b["network"]).name,
        }
        extra = {k: v for k, v in self.model_card.items() if k not in _CARD_KEYS}
        card = model_card_markdown(
            self.registered_model_name,
            run_id=run_id,
            weights=source,
            intended_use=self.model_card.get("intended_use"),
            limitations=self.model_card.get("limitations"),
            metrics=metrics,
            params=run.data.params,
            tags={**run.data.tags},
            datasets=datasets,
            io=card_io,
            extra=extra,
        )
        card_path = work / "MODEL_CARD.md"
        card_path.write_text(card)
        self._card_text = card

        with _fail_fast(logger):
            use_logged_model = _compat.logged_models_supported(client, uri)
        version_tags = {"weights": source[:5000], "network_format": self.network_format}
        if use_logged_model:
            try:
                lm = self._log_logged_model(trainer, client, run, work, b, card_path)
            except MlflowException as err:
                if not _compat.is_endpoint_not_found(err):
                    raise
                _compat.mark_server_lacks_logged_models(uri)
                use_logged_model = False
        if not use_logged_model:
            self._log_run_model(client, uri, run_id, work, b, card_path)
            version_tags["lmc.model_source"] = f"run artifacts: {_compat.no_logged_models_reason(uri)}"[:5000]

        name = self.registered_model_name
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if use_logged_model:
            mv = _create_version(client, uri, name, lm, run_id, tags=version_tags)
            _link_version(client, lm.model_id, name, mv.version)
        else:  # no LoggedModel to link (MLflow 2.x client or server): the version's source is the run artifact
            mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=version_tags)
        self.version = str(mv.version)
        client.set_registered_model_alias(name, self.alias, mv.version)
        if self.use_stages:
            transition_stage(client, name, mv.version, "Staging")
        self.decision = promote(
            name,
            mv.version,
            self.gates,
            self.champion_alias,
            self.compare_metric,
            self.min_improvement,
            uri,
            compare_mode=self.compare_mode,
            metrics=metrics,
            use_stages=self.use_stages,
            description_prefix=card,
        )
        logger.log_artifact(card_path)
        heads = [g.metric for g in self.gates] + ([self.compare_metric] if self.compare_metric else [])
        note = run_description(name, metrics, dict.fromkeys(heads), self.decision, f"models:/{name}/{self.version}")
        logger.set_tags(
            {
                NOTE_TAG: note,
                "registry.status": "registered",
                "registry.model": name,
                "registry.version": self.version,
                "registry.model_uri": f"models:/{name}/{self.version}",
                "registry.decision": "promoted" if self.decision.promoted else "rejected",
                "registry.decision_reason": self.decision.reason,
            }
        )
        logger.flush()

    def _log_logged_model(
        self, trainer: pl.Trainer, client: Any, run: Any, work: Path, b: dict[str, Any], card_path: Path
    ) -> Any:
        """MLflow 3 on both sides: the model is a LoggedModel of the run (``models:/<model_id>``)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        run_id = run.info.run_id
        lm = client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=self.registered_model_name.replace("/", "_")[:200],
            source_run_id=run_id,
            model_type=f"lightning-mlflow-cv:{self.postprocess}",
            tags={"mlflow.source.run_id": run_id},
        )
        mlflow_model = Model(artifact_path=lm.artifact_location, run_id=run_id, model_uuid=lm.model_id, model_id=lm.model_id)
        model_dir = work / "model"
        self._save_pyfunc(model_dir, b, card_path, mlflow_model)
        client.log_model_artifacts(lm.model_id, str(model_dir))
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=trainer.global_step)])
        self.model_id = lm.model_id
        return lm

    def _log_run_model(self, client: Any, uri: str, run_id: str, work: Path, b: dict[str, Any], card_path: Path) -> None:
        """No logged-model API (MLflow 2.x client or server): the model is the run artifact ``model``
        (``runs:/<run>/model``), as ``mlflow.pyfunc.log_model`` stores it on MLflow 2."""
        from mlflow.models import Model

        reason = _compat.no_logged_models_reason(uri)
        _compat.warn_once(
            f"no-logged-models:{uri}",
            f"{_NAME}: {reason}; the model is logged as run artifacts (runs:/<run>/model) and registered from there "
            "(aliases, gates, promote and loading by alias work; the run's logged-model view stays empty). "
            "Recorded as the version tag 'lmc.model_source'.",
        )
        mlflow_model = Model(artifact_path="model", run_id=run_id)
        model_dir = work / "model"
        self._save_pyfunc(model_dir, b, card_path, mlflow_model)
        _compat.log_artifacts(client, run_id, str(model_dir), "model")
        self.model_id = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _export.release(trainer)

    @property
    @override
    def state_key(self) -> str:
        # one per (registered model, alias): each keeps its own version
        return self._generate_state_key(registered_model_name=self.registered_model_name, alias=self.alias)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_id": self.model_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a checkpoint saved before registration (e.g. `trainer.test(ckpt_path="best")`) keeps what this fit made
        self.version = state_dict.get("version") or getattr(self, "version", None)
        self.model_id = state_dict.get("model_id") or getattr(self, "model_id", None)
