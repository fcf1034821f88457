"""ModelRegistryCallback: log a servable pyfunc model at fit end, register it, write its model card, then gate it.

The gates, the champion/challenger rule and the alias move are not here: the callback calls
:func:`lightning_mlflow_cv.promotion.promote` (the module that promotes, also behind ``lightning-mlflow-cv promote``),
so a fit and a later CI job apply one rule.

The callback is the sequence; what it ships is built elsewhere: the pyfunc bundle in
:mod:`lightning_mlflow_cv._shipping.packaging` (served code in :mod:`lightning_mlflow_cv._shipping.pyfunc`), the card in
:mod:`lightning_mlflow_cv._shipping.model_card`, the LoggedModel and version links in :mod:`lightning_mlflow_cv._shipping.logged_model`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from typing_extensions import override

from lightning_mlflow_cv import tasks as _tasks
from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._compat.mlflow_api import warn_once
from lightning_mlflow_cv._delivery import http as _http
from lightning_mlflow_cv._facts.summary import NOTE_TAG, run_description
from lightning_mlflow_cv._shipping import export as _export
from lightning_mlflow_cv._shipping import logged_model as _logged_model
from lightning_mlflow_cv._shipping import packaging as _packaging
from lightning_mlflow_cv._shipping import pyfunc as _pyfunc
from lightning_mlflow_cv._shipping.model_card import (
    CARD_KEYS,
    dataset_rows,
    metrics_table,
    model_card_markdown,
    serving_contract,
)
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger
from lightning_mlflow_cv.callbacks._shipping_base import ShippingCallback
from lightning_mlflow_cv.promotion import Decision, parse_gates, promote, transition_stage

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from mlflow import MlflowClient

_NAME = "ModelRegistryCallback"


def _registry_client(logger: Any) -> MlflowClient:
    """A client on the logger's store, used as the registry too."""
    from mlflow import MlflowClient

    uri = logger.tracking_uri
    return MlflowClient(uri, registry_uri=uri)


def _fail_fast(logger: Any) -> Any:
    """MLflow calls without minutes of retries: a down store fails in seconds (the logger's timeout, >= 5 s)."""
    return _http.fail_fast(max(float(getattr(logger, "request_timeout_s", 10.0)), 5.0))


def _one_line(err: BaseException, limit: int) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


class ModelRegistryCallback(ShippingCallback):
    """Log a servable MLflow model at fit end, register a new version, gate and promote it, write its card.

    On global rank 0 when training ends (``on_train_end``):

    1. **Dependencies first**: an ``ONNXExportCallback`` and a ``fit_end`` ``InferenceLatencyCallback`` on the
       same Trainer are run first (once), so gates can use ``onnx/max_abs_err`` or ``latency/torch/p95_ms`` whatever
       the callback order.
    2. **The model**: an MLflow pyfunc bundling preprocessing (resize to the training size, scale to [0, 1],
       normalise with ``mean``/``std``), the network, and postprocessing (``softmax``/``sigmoid``
       probabilities as a DataFrame with one column per class name, ``boxes`` with NMS, argmax ``masks``). The network is a ``torch.export`` archive
       (``network_format="pt2"``, default) or ONNX; the pyfunc is "models from code". Loading it unpickles
       nothing and needs no user code: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)``.
    3. **Input layout**: ``uint8`` images ``(N, H, W, C)`` in [0, 255] (``layout="NHWC"``, as PIL / OpenCV
       decode them; ``(N, H, W)`` is read as grayscale) or ``(N, C, H, W)`` with ``layout="NCHW"``. Any
       ``H, W``: images are resized to the training size. Signature and input example are two real
       validation images (de-normalised back to ``uint8``); for classification the output schema names one
       ``float`` column per class, so ``mlflow models serve`` answers ``[{"cat": 0.9, "dog": 0.1}, ...]``.
    4. **Registration**: the model is a LoggedModel of the run (``models:/<model_id>``) listing the run's final
       metrics (and the test metrics after ``trainer.test``); a new version of
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
            ``"depth"`` or ``"none"`` (see :mod:`lightning_mlflow_cv._shipping.pyfunc`); default: the post-processing of
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
        network_format: ``"pt2"`` (``torch.export``) or ``"onnx"``. Torch without ``torch.export`` (< 2.2) bundles
            ONNX instead, with one warning.
        class_names: One distinct name per class id: the served probability columns and the output schema of
            ``softmax``/``sigmoid`` models, the model card and the ``class_names`` of the MLmodel metadata
            (default: the datamodule's ``class_names`` attribute, else a ``CVMetricsCallback``'s ``class_names``;
            without names the columns are the class ids ``"0"``, ``"1"``, ...). A count that differs from the
            network's classes fails the registration with a warning naming both.
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
        postprocess: Literal["softmax", "sigmoid", "boxes", "masks", "instances", "anomaly", "depth", "none"]
        | None = None,
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
        _checks.check_text(
            _NAME, "registered_model_name", registered_model_name, fix="ModelRegistryCallback('digits-cnn')"
        )
        if "/" in registered_model_name or ":" in registered_model_name:
            raise ValueError(
                f"{_NAME}: `registered_model_name` cannot contain '/' or ':' (MLflow's rule), got "
                f"{registered_model_name!r}. Example: 'team-digits-cnn'."
            )
        self.preprocess = self._check_preprocess(preprocess)
        #: The CV task (canonical name) whose served post-processing is the default ``postprocess``.
        self.task = None if task is None else _tasks.normalize_task(task, _NAME)
        # a task's default is a plain str (TaskSpec.postprocess), checked below as the argument is
        kind: str = (
            postprocess
            if postprocess is not None
            else (_tasks.get_task(self.task).postprocess if self.task is not None else "softmax")
        )
        _checks.check_choice(
            _NAME, "postprocess", kind, _pyfunc.POSTPROCESS, must=f"one of {_pyfunc.POSTPROCESS}",
            fix="'softmax' for single-label classification, 'sigmoid' for multi-label, 'boxes' for detection, "
            "'masks' for segmentation",
        )  # fmt: skip
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
        _checks.check_choice(_NAME, "compare_mode", compare_mode, ("max", "min"), fix="'min' for losses")
        _checks.check_number(_NAME, "min_improvement", min_improvement, 0, fix="e.g. min_improvement=0.005")
        _checks.check_text(
            _NAME, "compare_metric", compare_metric, allow_none=True, strip=False, must="a metric name",
            fix="e.g. compare_metric='val/f1'",
        )  # fmt: skip
        if model_card is not None and (
            not isinstance(model_card, Mapping) or not all(isinstance(v, str) for v in model_card.values())
        ):
            raise ValueError(
                f"{_NAME}: `model_card` must map section names to text, got {model_card!r}. "
                "Example: model_card={'intended_use': '...', 'limitations': '...'}."
            )
        if class_names is not None and (
            isinstance(class_names, str)
            or not isinstance(class_names, Sequence)
            or len({str(n) for n in class_names}) != len(class_names)
        ):
            raise ValueError(
                f"{_NAME}: `class_names` must be a list of distinct names, one per class id, got {class_names!r}. "
                "Example: class_names=['cat', 'dog']."
            )
        _checks.check_choice(_NAME, "network_format", network_format, ("pt2", "onnx"))
        self.registered_model_name = registered_model_name
        self.postprocess = kind
        self.alias = alias
        self.champion_alias = champion_alias
        self.compare_metric = compare_metric
        self.min_improvement = float(min_improvement)
        self.model_card = dict(model_card or {})
        self.compare_mode = compare_mode
        self.use_stages = bool(use_stages)
        if network_format == "pt2" and not _compat_frameworks.has_torch_export():
            warn_once(
                "registry-pt2",
                f"{_NAME}: network_format='pt2' needs torch.export with dynamic shapes (torch >= 2.2); this is "
                f"torch {_compat_frameworks.version('torch')}, so the network is bundled as ONNX (served with "
                "onnxruntime). Fix: pass network_format='onnx' (the same model, no warning) or upgrade torch.",
                RuntimeWarning,
            )
            network_format = "onnx"
        self.network_format = network_format
        self.class_names = [str(n) for n in class_names] if class_names is not None else None
        self.postprocess_options = dict(postprocess_options or {})
        #: The registered version (str) of the last fit, ``None`` before or on failure.
        self.version: str | None = None
        #: The promotion :class:`~lightning_mlflow_cv.promotion.Decision` of the last fit.
        self.decision: Decision | None = None
        #: LoggedModel id of the last fit's model (``models:/<model_id>``).
        self.model_id: str | None = None
        #: Where the saved model was kept when registration failed.
        self.kept_model_dir: Path | None = None

    @staticmethod
    def _check_preprocess(pre: Mapping[str, Any] | None) -> dict[str, Any]:
        if pre is None:
            return {"layout": "NHWC"}
        if not isinstance(pre, Mapping):
            raise ValueError(
                f"{_NAME}: `preprocess` must be a mapping, got {pre!r}. Example: {{'mean': [0.5], 'std': [0.25]}}."
            )
        unknown = set(pre) - {"mean", "std", "size", "layout"}
        if unknown:
            raise ValueError(
                f"{_NAME}: `preprocess` has unknown keys {sorted(unknown)}; allowed: mean, std, size, layout."
            )
        out = {"layout": pre.get("layout", "NHWC")}
        if out["layout"] not in _pyfunc.LAYOUTS:
            raise ValueError(
                f"{_NAME}: `preprocess['layout']` must be one of {_pyfunc.LAYOUTS}, got {out['layout']!r}."
            )
        for k in ("mean", "std"):
            if k in pre:
                v = pre[k]
                v = [v] if isinstance(v, (int, float)) else v
                if not isinstance(v, Sequence) or not v or not all(isinstance(x, (int, float)) for x in v):
                    raise ValueError(
                        f"{_NAME}: `preprocess['{k}']` must be a number or a list of numbers (one per channel), got {pre[k]!r}."
                    )
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
        """``class_names``, else the datamodule's ``class_names`` attribute, else those of a ``CVMetricsCallback``
        on the Trainer (the names its metric keys and plots use), else ``None``."""
        if self.class_names is not None:
            return self.class_names
        from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback

        metrics_cb = _export.find_callback(trainer, CVMetricsCallback)
        for names in (
            getattr(getattr(trainer, "datamodule", None), "class_names", None),
            getattr(metrics_cb, "class_names", None),
        ):
            if isinstance(names, Sequence) and not isinstance(names, str) and names:
                return [str(n) for n in names]
        return None

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
        """After ``trainer.test``: the test metrics join the model card (version description, MODEL_CARD.md) and
        the LoggedModel's metrics."""
        version: str | None = getattr(self, "version", None)
        if not trainer.is_global_zero or version is None:
            return
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1}
        if not test:
            return
        logger = find_mlflow_logger(trainer, _NAME)
        section = "\n".join(["", "## Test metrics", "", *metrics_table(test), ""])
        try:
            with _fail_fast(logger):
                client = _registry_client(logger)
                mv = client.get_model_version(self.registered_model_name, version)
                text = (mv.description or "").split("\n## Test metrics\n", 1)[0].rstrip() + "\n" + section
                client.update_model_version(self.registered_model_name, version, description=text)
        except Exception as err:  # noqa: BLE001 - tracking failure: the test metrics stay in the run
            warnings.warn(
                f"{_NAME}: could not add the test metrics to the model card ({err}).", RuntimeWarning, stacklevel=2
            )
            return
        model_id = getattr(self, "model_id", None)
        if model_id is not None:
            logger.flush()  # the test metrics are in the store before they are linked
            with _fail_fast(logger):
                self._link_metrics(client, str(logger.run_id), model_id, sorted(test))
        card_text: str | None = getattr(self, "_card_text", None)
        if card_text:
            with tempfile.TemporaryDirectory() as tmp:
                card = Path(tmp) / "MODEL_CARD.md"
                card.write_text(card_text.rstrip() + "\n" + section)
                logger.log_artifact(card)
                logger.flush()

    # ------------------------------------------------------------------------------------------
    def register(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Decision | None:
        """Log, register, gate and promote once per fit end. Returns the decision (``None`` on failure)."""
        if not self._first_time(trainer):
            return self.decision
        logger = find_mlflow_logger(trainer, _NAME)
        onnx_cb = self._run_dependencies(trainer, pl_module)
        module, source = _export.best_module(trainer, pl_module)
        work = Path(tempfile.mkdtemp(prefix="lmc-model-"))
        try:
            bundle = self._bundle(trainer, pl_module, module, work, onnx_cb)
        except Exception as err:  # noqa: BLE001 - never crash the fit
            _rmtree(work)
            reason = f"could not build the servable model: {_one_line(err, 600)}"
            warnings.warn(f"{_NAME}: {reason}. Nothing was registered.", RuntimeWarning, stacklevel=2)
            logger.set_tags({"registry.status": "failed", "registry.error": reason})
            return None
        logger.flush()
        run_id = str(logger.run_id)
        try:
            self._publish(trainer, logger, run_id, source, work, bundle)
        except Exception as err:  # noqa: BLE001 - tracking failure: keep the model on disk
            self._keep_unregistered(trainer, logger, run_id, work, bundle, err)
            return None
        _rmtree(work)
        return self.decision

    @staticmethod
    def _run_dependencies(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Run the ONNX export and the fit-end latency first (once), so gates see their metrics; returns the
        ``ONNXExportCallback`` (or ``None``)."""
        from lightning_mlflow_cv.callbacks.inference_latency import InferenceLatencyCallback
        from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback

        onnx_cb = _export.find_callback(trainer, ONNXExportCallback)
        if onnx_cb is not None:
            onnx_cb.export(trainer, pl_module)
        lat_cb = _export.find_callback(trainer, InferenceLatencyCallback)
        if lat_cb is not None and lat_cb.when == "fit_end":
            lat_cb.measure(trainer, pl_module)
        return onnx_cb

    def _bundle(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: torch.nn.Module, work: Path, onnx_cb: Any
    ) -> _packaging.Bundle:
        """The servable model's files in ``work`` (see :func:`lightning_mlflow_cv._shipping.packaging.build_bundle`)."""
        mean, std = self._norm(trainer)
        sample = _export.sample_input(trainer, pl_module, None, 2)
        cfg = _packaging.pyfunc_config(
            mean,
            std,
            self.preprocess.get("size") or sample.shape[-2:],
            int(sample.shape[1]),
            self.preprocess["layout"],
            self.postprocess,
            self._class_names(trainer),
            self.postprocess_options,
        )
        exported = onnx_cb is not None and onnx_cb.onnx_path is not None and onnx_cb.status == "ok"
        onnx_path = onnx_cb.onnx_path if exported else None
        return _packaging.build_bundle(module, sample, work, cfg, self.network_format, onnx_path)

    def _save_pyfunc(
        self, model_dir: Path, b: _packaging.Bundle, card_path: Path | None, mlflow_model: Any = None
    ) -> None:
        _packaging.save_pyfunc(model_dir, b, card_path, mlflow_model)

    # -- publishing: the steps of a registration, in order --------------------------------------
    def _publish(
        self, trainer: pl.Trainer, logger: Any, run_id: str, source: str, work: Path, b: _packaging.Bundle
    ) -> None:
        """Card, model, version, decision, run tags: each step below, in this order."""
        if run_id.startswith("offline-"):
            raise RuntimeError("the MLflow run was never created (the logger is offline)")
        uri = logger.tracking_uri
        client = _registry_client(logger)
        with _fail_fast(logger):
            run = client.get_run(run_id)  # a down store fails here in seconds, not after minutes of retries
        metrics = self._final_metrics(trainer, run)
        card_path = self._write_card(run, metrics, source, work, b)
        with _fail_fast(logger):
            use_logged_model = _compat.logged_models_supported(client, uri)
        self.model_id = self._log_model(trainer, client, uri, run, work, b, card_path, use_logged_model)
        version = self._create_version(client, uri, run_id, self._version_tags(source, uri))
        self.decision = self._gate_and_promote(version, metrics, uri)
        self._record_outcome(logger, card_path, metrics)

    @staticmethod
    def _final_metrics(trainer: pl.Trainer, run: Any) -> dict[str, float]:
        """The fit's scalar metrics, overridden by what the store holds for the run (after ``logger.flush()``)."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        metrics.update(run.data.metrics)
        return metrics

    def _write_card(
        self, run: Any, metrics: Mapping[str, float], source: str, work: Path, b: _packaging.Bundle
    ) -> Path:
        """``MODEL_CARD.md`` in ``work`` (its text kept for the test metrics)."""
        card = model_card_markdown(
            self.registered_model_name,
            run_id=run.info.run_id,
            weights=source,
            intended_use=self.model_card.get("intended_use"),
            limitations=self.model_card.get("limitations"),
            metrics=metrics,
            params=run.data.params,
            tags={**run.data.tags},
            datasets=dataset_rows(run),
            io=serving_contract(b.cfg, self.postprocess, b.network.name),
            extra={k: v for k, v in self.model_card.items() if k not in CARD_KEYS},
        )
        card_path = work / "MODEL_CARD.md"
        card_path.write_text(card)
        self._card_text = card
        return card_path

    def _log_model(
        self,
        trainer: pl.Trainer,
        client: Any,
        uri: str,
        run: Any,
        work: Path,
        b: _packaging.Bundle,
        card_path: Path,
        use_logged_model: bool,
    ) -> str | None:
        """The model as a LoggedModel with the run's metrics linked (MLflow 3 on both sides), else as the run
        artifact ``model`` (one warning). Returns the ``model_id`` (``None`` for a run artifact)."""
        from mlflow.exceptions import MlflowException

        def save(model_dir: Path, mlflow_model: Any) -> None:
            self._save_pyfunc(model_dir, b, card_path, mlflow_model)

        run_id = run.info.run_id
        if use_logged_model:
            try:
                model_id = _logged_model.log_logged_model(
                    client, run, self.registered_model_name, f"lightning-mlflow-cv:{self.postprocess}",
                    work / "model", save, trainer.global_step,
                )  # fmt: skip
            except MlflowException as err:
                if not _compat.is_endpoint_not_found(err):
                    raise
                _compat.mark_server_lacks_logged_models(uri)
            else:
                self._link_metrics(client, run_id, model_id)
                return model_id
        _compat.warn_once(
            f"no-logged-models:{uri}",
            f"{_NAME}: {_compat.no_logged_models_reason(uri)}; the model is logged as run artifacts "
            "(runs:/<run>/model) and registered from there (aliases, gates, promote and loading by alias work; "
            "the run's logged-model view stays empty). Recorded as the version tag 'lmc.model_source'.",
        )
        _logged_model.log_run_model(client, run_id, work / "model", save)
        return None

    @staticmethod
    def _link_metrics(client: Any, run_id: str, model_id: str, keys: Any = None) -> None:
        """The run's final metrics on the LoggedModel's page; a failure here costs the links, not the version."""
        try:
            _logged_model.link_run_metrics(client, run_id, model_id, keys)
        except Exception as err:  # noqa: BLE001 - tracking failure: the metrics stay in the run
            warnings.warn(
                f"{_NAME}: could not link the run's metrics to the logged model {model_id} ({_one_line(err, 300)}); "
                "they stay in the run.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _version_tags(self, source: str, uri: str) -> dict[str, str]:
        tags = {"weights": source[:5000], "network_format": self.network_format}
        if self.model_id is None:
            tags["lmc.model_source"] = f"run artifacts: {_compat.no_logged_models_reason(uri)}"[:5000]
        return tags

    def _create_version(self, client: Any, uri: str, run_id: str, tags: dict[str, str]) -> Any:
        """A new version of the registered model (created when missing), linked to the LoggedModel where there is
        one, with :attr:`alias` (and the ``Staging`` stage with ``use_stages``). Returns the version."""
        from mlflow.exceptions import MlflowException

        name = self.registered_model_name
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if self.model_id is not None:
            mv = _logged_model.create_version(client, uri, name, self.model_id, run_id, tags)
            _logged_model.link_version(client, self.model_id, name, mv.version)
        else:  # no LoggedModel to link (MLflow 2.x client or server): the version's source is the run artifact
            mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags)
        self.version = str(mv.version)
        client.set_registered_model_alias(name, self.alias, mv.version)
        if self.use_stages:
            transition_stage(client, name, mv.version, "Staging")
        return mv.version

    def _gate_and_promote(self, version: Any, metrics: Mapping[str, float], uri: str) -> Decision:
        """Gates and the champion comparison (:func:`~lightning_mlflow_cv.promotion.promote`); the card follows
        the decision in the version description."""
        return promote(
            self.registered_model_name,
            version,
            self.gates,
            self.champion_alias,
            self.compare_metric,
            self.min_improvement,
            uri,
            compare_mode=self.compare_mode,
            metrics=metrics,
            use_stages=self.use_stages,
            description_prefix=self._card_text,
        )

    def _record_outcome(self, logger: Any, card_path: Path, metrics: Mapping[str, float]) -> None:
        """The card as a run artifact; the run's description and ``registry.*`` tags say what happened."""
        assert self.decision is not None
        name, model_uri = self.registered_model_name, f"models:/{self.registered_model_name}/{self.version}"
        logger.log_artifact(card_path)
        heads = [g.metric for g in self.gates] + ([self.compare_metric] if self.compare_metric else [])
        logger.set_tags(
            {
                NOTE_TAG: run_description(name, metrics, dict.fromkeys(heads), self.decision, model_uri),
                "registry.status": "registered",
                "registry.model": name,
                "registry.version": self.version,
                "registry.model_uri": model_uri,
                "registry.decision": "promoted" if self.decision.promoted else "rejected",
                "registry.decision_reason": self.decision.reason,
            }
        )
        logger.flush()

    # -- failure: keep the model ---------------------------------------------------------------
    def _keep_unregistered(
        self, trainer: pl.Trainer, logger: Any, run_id: str, work: Path, b: _packaging.Bundle, err: Exception
    ) -> None:
        """Registration failed: keep a loadable model in ``<default_root_dir>/unregistered_models/<run id>``, say
        where and what to do (stderr and one warning) and tag the run ``registry.status=failed``."""
        if not (work / "model" / "MLmodel").is_file():
            try:  # keep a complete, loadable MLflow model (without the registry's ids)
                self._save_pyfunc(work / "model", b, None)
            except Exception:  # noqa: BLE001 - the network file and config are still kept
                pass
        kept = Path(trainer.default_root_dir).resolve() / "unregistered_models" / run_id
        _rmtree(kept)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work), str(kept))
        self.kept_model_dir = kept
        msg = (
            f"{_NAME}: registering {self.registered_model_name!r} failed ({_one_line(err, 500)}). The saved model is "
            f"kept in {kept / 'model'} (it loads with mlflow.pyfunc.load_model(path); {_what_next(logger, err)}). "
            "The fit result is unaffected."
        )
        print(msg, file=sys.stderr)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.set_tags({"registry.status": "failed", "registry.error": msg[:4000]})

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        # one per (registered model, alias): each keeps its own version
        return {"registered_model_name": self.registered_model_name, "alias": self.alias}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_id": self.model_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a checkpoint saved before registration (e.g. `trainer.test(ckpt_path="best")`) keeps what this fit made
        self.version = state_dict.get("version") or getattr(self, "version", None)
        self.model_id = state_dict.get("model_id") or getattr(self, "model_id", None)


def _what_next(logger: Any, err: BaseException) -> str:
    """What the user does with the kept model: wait for the store, or use one that has the missing API."""
    if not _compat.is_endpoint_not_found(err):
        return "log and register it when the store is back"
    from lightning_mlflow_cv._facts.redact import safe_uri

    uri = getattr(logger, "tracking_uri", "")  # the store is up but lacks an API: waiting will not help
    version = _compat.server_version(uri) if uri else None
    return (
        f"the store {safe_uri(uri)} (MLflow {version or 'version unknown'}) does not support this call; "
        "log and register it on a store that does (an MLflow server of this client's major version)"
    )


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
