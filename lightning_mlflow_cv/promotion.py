"""Promotion: gates, the champion/challenger rule and :func:`promote`, which moves the champion alias.

This is the module that promotes. :func:`promote` gates a registered model version, compares it with the
version behind the champion alias, moves the alias when it wins and records the decision on the version; the
``lightning-mlflow-cv promote`` command (:mod:`lightning_mlflow_cv.cli`) calls it from CI/CD after a fit.
:class:`~lightning_mlflow_cv.ModelRegistryCallback` (``callbacks/model_registry.py``) logs and registers the model
at fit end and then calls the same :func:`promote`, so a fit and a later CI job apply one rule.

The pure part (gate parsing and evaluation, the comparison rule, the decision's tags and markdown) is plain
functions testable without a store.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

_COMPARE = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
#: The comparison operators a gate may use.
OPS = tuple(_COMPARE)
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
        return bool(_COMPARE[self.op](value, self.threshold))

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


def parse_gates(gates: Mapping[str, str] | Sequence[Gate] | None) -> list[Gate]:
    """Parse a ``{metric: "<op><number>"}`` mapping (``None`` means no gates); a list of :class:`Gate` passes as is.

    Raises:
        ValueError: when ``gates`` is not a mapping (or a list of :class:`Gate`) or a spec is unparseable.
    """
    if gates is None:
        return []
    if isinstance(gates, (list, tuple)) and all(isinstance(g, Gate) for g in gates):
        return list(gates)
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
            out.append(
                GateResult(
                    g.metric,
                    g.op,
                    g.threshold,
                    None,
                    False,
                    f"missing: metric {g.metric!r} was not logged (logged: {known})",
                )
            )
            continue
        v = float(metrics[g.metric])
        ok = g.check(v)
        out.append(
            GateResult(
                g.metric, g.op, g.threshold, v, ok, f"{'pass' if ok else 'fail'}: {v:.6g} {g.op} {g.threshold:g}"
            )
        )
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
    return (
        ok,
        f"{candidate:.6g} {word} the champion's {champion:.6g} (gain {gain:.6g}, min_improvement {min_improvement:g}, mode {mode})",
    )


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
        from lightning_mlflow_cv._facts.redact import safe_uri

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
    gates: Mapping[str, str] | Sequence[Gate] | None = None,
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
        gates: ``{metric: "<op><number>"}``, e.g. ``{"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50"}``, or
            :class:`Gate` objects already parsed (:func:`parse_gates`, :func:`parse_gate_expr`).
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

        from lightning_mlflow_cv import promote

        decision = promote("digits-cnn", "3", gates={"val/acc": ">=0.9"}, compare_metric="val/acc",
                           min_improvement=0.005, tracking_uri="sqlite:///mlflow.db")
        print(decision.promoted, decision.reason)
    """
    parsed = parse_gates(gates)
    if compare_mode not in ("max", "min"):
        raise ValueError(
            f"promote: `compare_mode` must be 'max' or 'min', got {compare_mode!r}. Use 'min' for losses and latencies."
        )
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
            cmp_ok, cmp_reason = compare(
                decision.candidate_value, decision.champion_value, compare_mode, float(min_improvement)
            )
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
        warnings.warn(
            "use_stages=True: this MLflow has no stage transitions; only aliases are set.", RuntimeWarning, stacklevel=2
        )
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(
            model_name, str(version), stage, archive_existing_versions=stage == "Production"
        )
    return True
