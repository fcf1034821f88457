"""Promotion gates, champion/challenger promotion (function and ``lightning-mlflow-cv promote``) and ``evaluate``.

The pure part (gate parsing and evaluation, the comparison rule) is plain functions; :func:`promote` applies them
to a registered model version in the MLflow Model Registry and records the decision on the version.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

OPS = (">=", "<=", ">", "<", "==", "!=")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"
_SPEC = re.compile(rf"^\s*(>=|<=|==|!=|>|<)\s*({_NUM})\s*$")
_EXPR = re.compile(rf"^\s*([\w\-./ :]+?)\s*(>=|<=|==|!=|>|<)\s*({_NUM})\s*$")
#: Marks the decision block inside a version description (so a later decision replaces it).
DECISION_BEGIN = "<!-- lightning-mlflow-cv:decision -->"
DECISION_END = "<!-- /lightning-mlflow-cv:decision -->"


@dataclass(frozen=True)
class Gate:
    """One promotion gate: ``metric op threshold`` (e.g. ``val/acc >= 0.9``)."""

    metric: str
    op: str
    threshold: float

    def check(self, value: float) -> bool:
        """Whether ``value`` passes (NaN never passes)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        t = self.threshold
        return {
            ">=": value >= t, "<=": value <= t, ">": value > t, "<": value < t, "==": value == t, "!=": value != t
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate on one metric value (``value`` is ``None`` when the metric is missing)."""

    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    reason: str


def parse_gate(metric: str, spec: str) -> Gate:
    """Parse ``spec`` such as ``">=0.85"`` for ``metric``.

    Raises:
        ValueError: when ``spec`` is not ``<op><number>`` with op in ``>=, <=, >, <, ==, !=``.

    Example::

        >>> parse_gate("val/acc", ">=0.85")
        Gate(metric='val/acc', op='>=', threshold=0.85)
    """
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"gate: the metric name must be a non-empty string, got {metric!r}.")
    m = _SPEC.match(str(spec)) if isinstance(spec, (str, int, float)) and not isinstance(spec, bool) else None
    if m is None:
        raise ValueError(
            f"gate for {metric!r}: cannot parse {spec!r}. Write an operator from {', '.join(OPS)} followed by a "
            f"number, so the direction is explicit, e.g. {{{metric!r}: '>=0.85'}} or {{'latency/torch/p95_ms': '<=50'}}."
        )
    return Gate(metric.strip(), m.group(1), float(m.group(2)))


def parse_gates(gates: Mapping[str, str] | None) -> list[Gate]:
    """Parse a ``{metric: "<op><number>"}`` mapping (``None`` means no gates).

    Raises:
        ValueError: when ``gates`` is not a mapping or a spec is unparseable.
    """
    if gates is None:
        return []
    if not isinstance(gates, Mapping):
        raise ValueError(
            f"gates must be a mapping of metric name to '<op><number>', got {type(gates).__name__} {gates!r}. "
            "Example: gates={'val/acc': '>=0.9', 'latency/torch/p95_ms': '<=50'}."
        )
    return [parse_gate(k, v) for k, v in gates.items()]


def parse_gate_expr(expr: str) -> Gate:
    """Parse a command-line gate such as ``"val/acc>=0.9"``.

    Raises:
        ValueError: when ``expr`` is not ``<metric><op><number>``.
    """
    m = _EXPR.match(expr)
    if m is None:
        raise ValueError(
            f"gate: cannot parse {expr!r}. Write <metric><op><number> with op in {', '.join(OPS)}, "
            "e.g. --gate 'val/acc>=0.9' --gate 'latency/torch/p95_ms<=50'."
        )
    return Gate(m.group(1), m.group(2), float(m.group(3)))


def evaluate_gates(gates: Iterable[Gate], metrics: Mapping[str, float]) -> list[GateResult]:
    """Check every gate against ``metrics``; a missing metric is a failed gate whose reason says so.

    Example::

        >>> [r.passed for r in evaluate_gates(parse_gates({"acc": ">=0.9", "f1": ">=0.5"}), {"acc": 0.95})]
        [True, False]
    """
    out = []
    for g in gates:
        if g.metric not in metrics or metrics[g.metric] is None:
            known = ", ".join(sorted(metrics)[:20]) or "none"
            out.append(GateResult(g.metric, g.op, g.threshold, None, False, f"missing: metric {g.metric!r} was not logged (logged: {known})"))
            continue
        v = float(metrics[g.metric])
        ok = g.check(v)
        out.append(GateResult(g.metric, g.op, g.threshold, v, ok, f"{'pass' if ok else 'fail'}: {v:.6g} {g.op} {g.threshold:g}"))
    return out


def compare(
    candidate: float | None, champion: float | None, mode: Literal["max", "min"] = "max", min_improvement: float = 0.0
) -> tuple[bool, str]:
    """The champion/challenger rule: the candidate wins when it is at least ``min_improvement`` better.

    "Better" is higher for ``mode="max"``, lower for ``"min"``. A candidate without the metric loses; a champion
    without it loses.

    Example::

        >>> compare(0.93, 0.90, "max", 0.01)[0], compare(0.905, 0.90, "max", 0.01)[0]
        (True, False)
    """
    if candidate is None or math.isnan(candidate):
        return False, "the candidate has no value for the compare metric"
    if champion is None or math.isnan(champion):
        return True, "the champion has no value for the compare metric"
    gain = (candidate - champion) if mode == "max" else (champion - candidate)
    ok = gain >= min_improvement
    word = "improves on" if ok else "does not improve enough on"
    return ok, f"{candidate:.6g} {word} the champion's {champion:.6g} (gain {gain:.6g}, min_improvement {min_improvement:g}, mode {mode})"


@dataclass
class Decision:
    """What :func:`promote` decided and why."""

    model_name: str
    version: str
    run_id: str | None
    promoted: bool
    reason: str
    champion_alias: str
    previous_champion: str | None = None
    gates: list[GateResult] = field(default_factory=list)
    compare_metric: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None
    comparison: str | None = None

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gates_passed"] = self.gates_passed
        return d

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags."""
        t = {
            "decision": "promoted" if self.promoted else "rejected",
            "decision.reason": self.reason,
            "decision.champion_alias": self.champion_alias,
            "decision.previous_champion": self.previous_champion or "none",
            "decision.gates_passed": str(self.gates_passed).lower(),
        }
        for g in self.gates:
            t[f"gate.{g.metric}"] = g.reason
        if self.compare_metric:
            t["compare.metric"] = self.compare_metric
            t["compare.candidate"] = "missing" if self.candidate_value is None else f"{self.candidate_value:.6g}"
            t["compare.champion"] = "missing" if self.champion_value is None else f"{self.champion_value:.6g}"
            t["compare.result"] = self.comparison or ""
        return {k: v[:5000] for k, v in t.items()}

    def markdown(self) -> str:
        """The decision as a markdown block (for the version description)."""
        # the verdict is the first line (what the registry's Description column shows); only an end marker,
        # an HTML comment invisible in rendered markdown, delimits the block, so nothing raw leads the text
        lines = [
            f"**{'PROMOTED' if self.promoted else 'NOT PROMOTED'}** to `@{self.champion_alias}`: {self.reason}",
            "",
            "## Promotion decision",
            "",
            f"- previous champion: {('version ' + self.previous_champion) if self.previous_champion else 'none'}",
        ]
        if self.compare_metric:
            lines.append(f"- compare `{self.compare_metric}`: {self.comparison}")
        if self.gates:
            lines += ["", "| gate | value | result |", "|---|---|---|"]
            for g in self.gates:
                val = "missing" if g.value is None else f"{g.value:.6g}"
                lines.append(f"| `{g.metric} {g.op} {g.threshold:g}` | {val} | {'pass' if g.passed else 'FAIL'} |")
        lines.append(DECISION_END)
        return "\n".join(lines)


def with_decision(description: str | None, decision: Decision) -> str:
    """``description`` with its decision block replaced by (or prefixed with) ``decision``'s."""
    text = description or ""
    if DECISION_BEGIN in text and DECISION_END in text:  # a block written by an earlier version
        before, rest = text.split(DECISION_BEGIN, 1)
        after = rest.split(DECISION_END, 1)[1]
        text = (before + after).strip()
    elif DECISION_END in text:  # the block always leads the description and ends with the marker
        text = text.split(DECISION_END, 1)[1].strip()
    return decision.markdown() + ("\n\n" + text if text else "")


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()


_NO_REGISTRY_CODES = {"ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED", "FEATURE_DISABLED"}


def registry_unsupported(client: MlflowClient) -> str | None:
    """Why ``client``'s registry store cannot hold registered models, or ``None`` when it can (or cannot be
    reached right now: an outage is a tracking failure, not a configuration mistake).

    One cheap call (``search_registered_models(max_results=1)``): a URI scheme without a registry store fails in
    MLflow before any request; a tracking-only server answers 404 (``ENDPOINT_NOT_FOUND``).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.search_registered_models(max_results=1)
    except NotImplementedError as err:
        return f"NotImplementedError: {err}"
    except MlflowException as err:
        text = " ".join(str(err.message).split())
        if err.error_code in _NO_REGISTRY_CODES or "not supported" in text.lower() or " 404 " in f" {text} ":
            return f"{err.error_code}: {text[:400]}"
    except Exception:  # noqa: BLE001 - unreachable, timeout, auth: not this question
        return None
    return None


def require_registry(client: MlflowClient, who: str) -> None:
    """Raise a ``ValueError`` naming the store and the fix when it has no Model Registry.

    Raises:
        ValueError: the registry store does not support registered models.
    """
    reason = registry_unsupported(client)
    if reason is not None:
        from lightning_mlflow_cv._delivery import safe_uri

        uri = safe_uri(str(getattr(client, "_registry_uri", None) or client.tracking_uri))
        raise ValueError(
            f"{who}: the store {uri!r} does not support the MLflow Model Registry ({reason}). Fix: use a tracking "
            "URI whose store has a registry (sqlite:///mlflow.db, postgresql+psycopg2://..., or an `mlflow server` "
            "at http(s)://...), or leave the registry step out."
        )


def resolve_version(client: MlflowClient, model_name: str, candidate: str | int) -> ModelVersion:
    """The model version ``candidate`` names: a version number, or a run id (its newest version).

    Raises:
        ValueError: when no such version exists.
    """
    cand = str(candidate).strip()
    if cand.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            return client.get_model_version(model_name, cand)
        except MlflowException as err:
            raise ValueError(
                f"promote: model {model_name!r} has no version {cand} ({err.message}). Pass an existing version "
                "number or the run id that produced it."
            ) from err
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{cand}'")
    if not found:
        raise ValueError(
            f"promote: model {model_name!r} has no version from run {cand!r}. Pass a version number, or the run "
            "id of a run that registered a version (ModelRegistryCallback does)."
        )
    return max(found, key=lambda v: int(v.version))


def _alias_version(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or None when the model has no such alias. Any other failure (a store
    error, a refused request) is raised: taking it for "no champion" would promote over the real champion."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        # what MLflow's SQL store (directly or behind `mlflow server`) says for an alias that is not set
        if f"alias {alias} not found" in str(err) and err.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise


def promote(
    model_name: str,
    candidate: str | int,
    gates: Mapping[str, str] | None = None,
    champion_alias: str = "champion",
    compare_metric: str | None = None,
    min_improvement: float = 0.0,
    tracking_uri: str | None = None,
    *,
    compare_mode: Literal["max", "min"] = "max",
    metrics: Mapping[str, float] | None = None,
    use_stages: bool = False,
    description_prefix: str | None = None,
) -> Decision:
    """Apply gates and the champion/challenger comparison to a registered version; move the champion alias.

    The candidate is promoted when every gate passes (a missing metric fails its gate) and, when
    ``compare_metric`` is given and a champion exists, the candidate beats the champion on it by at least
    ``min_improvement`` (higher is better for ``compare_mode="max"``). Promotion sets ``champion_alias`` on the
    candidate (an alias names one version, so exactly one champion exists). The decision (gate results,
    previous champion, metric values) is written as version tags (``decision``, ``gate.<metric>``,
    ``compare.*``) and at the top of the version description, whatever the outcome.

    Args:
        model_name: Registered model name.
        candidate: Version number, or the id of the run that registered it (its newest version).
        gates: ``{metric: "<op><number>"}``, e.g. ``{"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50"}``.
        champion_alias: Alias of the champion.
        compare_metric: Metric compared with the champion's (``None``: no comparison).
        min_improvement: Least gain over the champion on ``compare_metric``.
        tracking_uri: Tracking/registry URI (default: MLflow's current one).
        compare_mode: ``"max"`` when higher is better, ``"min"`` when lower is better.
        metrics: The candidate's metrics (default: its run's latest metric values).
        use_stages: Also transition the promoted version to ``Production`` with
            ``archive_existing_versions=True`` (legacy stages; MLflow deprecates them).
        description_prefix: Text kept before the decision block of the description (e.g. a model card).

    Returns:
        The :class:`Decision`.

    Raises:
        ValueError: unparseable gates, a bad ``compare_mode`` or ``min_improvement``, an unknown candidate, or a
            store without a Model Registry.

    Example::

        from lightning_mlflow_cv.registry import promote

        decision = promote("digits-cnn", "3", gates={"val/acc": ">=0.9"}, compare_metric="val/acc",
                           min_improvement=0.005, tracking_uri="sqlite:///mlflow.db")
        print(decision.promoted, decision.reason)
    """
    parsed = parse_gates(gates)
    if compare_mode not in ("max", "min"):
        raise ValueError(f"promote: `compare_mode` must be 'max' or 'min', got {compare_mode!r}. Use 'min' for losses and latencies.")
    if isinstance(min_improvement, bool) or not isinstance(min_improvement, (int, float)) or min_improvement < 0:
        raise ValueError(f"promote: `min_improvement` must be a number >= 0, got {min_improvement!r}. Example: 0.005.")
    client = _client(tracking_uri)
    require_registry(client, "promote")
    mv = resolve_version(client, model_name, candidate)
    if metrics is None:
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    results = evaluate_gates(parsed, metrics)
    champ = _alias_version(client, model_name, champion_alias)
    decision = Decision(
        model_name=model_name,
        version=str(mv.version),
        run_id=mv.run_id,
        promoted=False,
        reason="",
        champion_alias=champion_alias,
        previous_champion=str(champ.version) if champ is not None else None,
        gates=results,
        compare_metric=compare_metric,
    )
    failed = [g for g in results if not g.passed]
    cmp_ok, cmp_reason = True, "no comparison"
    if compare_metric:
        cand_v = metrics.get(compare_metric)
        decision.candidate_value = None if cand_v is None else float(cand_v)
        if champ is None:
            cmp_reason = "no champion yet"
        elif str(champ.version) == str(mv.version):
            cmp_reason = "the candidate is the champion"
        else:
            champ_metrics = client.get_run(champ.run_id).data.metrics if champ.run_id else {}
            ch_v = champ_metrics.get(compare_metric)
            decision.champion_value = None if ch_v is None else float(ch_v)
            cmp_ok, cmp_reason = compare(decision.candidate_value, decision.champion_value, compare_mode, float(min_improvement))
        decision.comparison = cmp_reason
    if failed:
        decision.reason = "failed gates: " + "; ".join(f"{g.metric} ({g.reason})" for g in failed)
    elif not cmp_ok:
        decision.reason = f"champion comparison on {compare_metric}: {cmp_reason}"
    else:
        decision.promoted = True
        decision.reason = "all gates passed" + (f"; {cmp_reason}" if compare_metric else "")
    if decision.promoted:
        client.set_registered_model_alias(model_name, champion_alias, mv.version)
        if use_stages:
            transition_stage(client, model_name, mv.version, "Production")
    for k, v in decision.tags().items():
        client.set_model_version_tag(model_name, mv.version, k, v)
    base = description_prefix if description_prefix is not None else (mv.description or "")
    client.update_model_version(model_name, mv.version, description=with_decision(base, decision))
    return decision


def transition_stage(client: MlflowClient, model_name: str, version: str | int, stage: str) -> bool:
    """Legacy stage transition (``archive_existing_versions=True`` for Production); False where unsupported."""
    if not hasattr(client, "transition_model_version_stage"):
        warnings.warn("use_stages=True: this MLflow has no stage transitions; only aliases are set.", RuntimeWarning, stacklevel=2)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(
            model_name, str(version), stage, archive_existing_versions=stage == "Production"
        )
    return True


def promote_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-mlflow-cv promote``: exit 0 when promoted, 1 when not, 2 on a usage or lookup error.

    Prints the decision as one JSON object on stdout.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-mlflow-cv promote",
        description="Gate a registered model version and move the champion alias when it wins. "
        "Exit code: 0 promoted, 1 not promoted, 2 error.",
    )
    parser.add_argument("--model-name", "-m", required=True, help="registered model name")
    parser.add_argument("--candidate", "-c", required=True, help="version number or the run id that registered it")
    parser.add_argument("--gate", "-g", action="append", default=[], metavar="METRIC<OP>NUMBER",
                        help="e.g. 'val/acc>=0.9' (repeatable; op in >= <= > < == !=)")
    parser.add_argument("--champion-alias", default="champion")
    parser.add_argument("--compare-metric", default=None)
    parser.add_argument("--compare-mode", choices=("max", "min"), default="max")
    parser.add_argument("--min-improvement", type=float, default=0.0)
    parser.add_argument("--use-stages", action="store_true", help="also transition to Production (legacy)")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        gates = {}
        for expr in args.gate:
            g = parse_gate_expr(expr)
            gates[g.metric] = f"{g.op}{g.threshold!r}"
        decision = promote(
            args.model_name,
            args.candidate,
            gates,
            args.champion_alias,
            args.compare_metric,
            args.min_improvement,
            args.tracking_uri,
            compare_mode=args.compare_mode,
            use_stages=args.use_stages,
        )
    except Exception as err:  # noqa: BLE001 - a CLI reports, it does not trace back
        print(f"promote: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(decision.to_dict(), default=str))
    return 0 if decision.promoted else 1


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------
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
        client = _client(tracking_uri)
        if run_id is None:
            exp = mlflow.set_experiment(experiment_name or "evaluation")
            run_id = client.create_run(exp.experiment_id, run_name="evaluate").info.run_id
        if cv_task.name == "classification":
            return _evaluate_classifier(client, run_id, model_id, np.concatenate(preds), torch.cat([torch.as_tensor(t) for t in ys]), class_names)
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

    from lightning_mlflow_cv import _compat

    num_classes = probs.shape[1]
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    df = pd.DataFrame({"label": targets.numpy().astype(int), "prediction": probs.argmax(1).astype(int)})
    for i, n in enumerate(names):
        df[f"prob_{n}"] = probs[:, i]
    uri = client._tracking_client.tracking_uri
    with_model = _compat.logged_models_supported(client, uri)
    model_kw = {"model_id": model_id} if with_model and model_id else {}
    import inspect

    takes = inspect.signature(mlflow.start_run).parameters
    no_sysmetrics = {"log_system_metrics": False} if "log_system_metrics" in takes else {}  # MLflow >= 2.8
    with mlflow.start_run(run_id=run_id, **no_sysmetrics) as run:
        if with_model:
            mlflow.log_table(df, "eval/predictions.json", run_id=run.info.run_id)
        else:  # log_table's logged-model path needs MLflow 3 on both sides: the same file and tag, written here
            _log_table_file(client, run.info.run_id, df, "eval/predictions.json")
        auc = float(multiclass_auroc(torch.from_numpy(probs).float(), targets.long(), num_classes=num_classes, average="macro"))
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
    kw = {"num_classes": n, "average": "weighted"}
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

    from lightning_mlflow_cv import _compat

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / posixpath.basename(artifact_file)
        df.to_json(path, orient="split", index=False, date_format="iso")
        _compat.log_artifact(client, run_id, str(path), posixpath.dirname(artifact_file) or None)
    tag = "mlflow.loggedArtifacts"
    current = json.loads(client.get_run(run_id).data.tags.get(tag, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in current:
        client.set_tag(run_id, tag, json.dumps(current + [entry]))

