"""Tracking plumbing shared by the sweeps (``optuna_sweep``, ``ray_sweep``): experiment, parent run, summary.

Each sweep engine turns its own trials into plain values (states, best trial) and hands them here, so both
write the same parent run layout: ``best_value``, ``best/<param>``, ``n_trials/<state>``, ``best_params.json``
and ``figures/optimization_history.png``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_mlflow_cv._facts.keys import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    param_value,
    sanitize_key,
)
from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv._facts.runs import live_loggers

#: Tag on each child run with the trial's state in the engine's words (``RUNNING`` while it runs).
TRIAL_STATE_TAG = "trial_state"
#: Name of the parent's sweep plot (objective per trial, in trial order).
HISTORY_PLOT = "figures/optimization_history.png"


def log_batch(
    client: Any, run_id: str, metrics: Iterable[Any] = (), params: Iterable[Any] = (), tags: Iterable[Any] = ()
) -> None:
    """``log_batch`` split within MLflow's per-request limits."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, param_value(value))


def new_params(existing: Mapping[str, str], values: Mapping[str, Any], prefix: str) -> list[Any]:
    """Params for a trial's sampled values that the run does not hold yet.

    A key the model already logged with another value (e.g. rounded) is kept as ``<prefix>/<key>``: MLflow
    params cannot change.
    """
    out = []
    for k, v in values.items():
        key, val = sanitize_key(str(k)), param_value(v)
        if key in existing and existing[key] != val:
            key = f"{prefix}/{key}"
        if existing.get(key) != val:
            out.append(param(key, val))
    return out


def warn_tracking(who: str, what: str, err: BaseException, keeps: str) -> None:
    warnings.warn(
        f"{who}: could not {what} ({type(err).__name__}: {redact_text(str(err))[:300]}). The sweep goes on; {keeps}.",
        RuntimeWarning,
        stacklevel=3,
    )


@dataclass
class Best:
    """The best trial of a sweep, as the summary writes it."""

    value: float
    params: Mapping[str, Any]
    number: int
    run_id: str | None


def write_summary(
    client: Any,
    parent: str,
    counts: Mapping[str, int],
    best: Best | None,
    *,
    metric_name: str,
    direction: str,
    total: int | None = None,
    plot: Callable[[], Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the sweep summary to the parent run (raises on tracking errors; the caller warns).

    Metrics ``n_trials/<state>`` (step = finished trials), ``best_value`` and ``best/<param>`` (numeric);
    tags ``n_trials``, ``best_trial_number``, ``best_trial_run_id`` and ``best/<param>``; artifacts
    ``best_params.json`` and the figure ``plot()`` returns (``figures/optimization_history.png``).
    """
    from mlflow.entities import Metric, RunTag

    finished = sum(counts.values())
    now = int(time.time() * 1000)
    metrics = [Metric(f"n_trials/{k.lower()}", float(v), now, finished) for k, v in counts.items()]
    tags = [RunTag("n_trials", str(finished if total is None else total))]
    summary: dict[str, Any] | None = None
    if best is not None:
        summary = {
            "best_value": best.value,
            "best_params": dict(best.params),
            "best_trial_number": best.number,
            "best_trial_run_id": best.run_id,
            "metric_name": metric_name,
            "direction": direction,
            **(extra or {}),
        }
        metrics.append(Metric("best_value", float(best.value), now, finished))
        tags += [RunTag("best_trial_number", str(best.number)), RunTag("best_trial_run_id", str(best.run_id or ""))]
        for k, v in best.params.items():
            key = f"best/{sanitize_key(str(k))}"
            tags.append(RunTag(key, param_value(v)[:MAX_TAG_VAL_LENGTH]))
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                metrics.append(Metric(key, float(v), now, finished))
    log_batch(client, parent, metrics, tags=tags)
    if summary is not None:
        client.log_text(parent, json.dumps(summary, indent=2, default=str), "best_params.json")
    if plot is not None:
        import matplotlib.pyplot as plt

        fig = plot()
        if fig is not None:
            try:
                client.log_figure(parent, fig, HISTORY_PLOT)
            finally:
                plt.close(fig)


def drain_loggers(run_id: str | None, loggers: Iterable[Any]) -> None:
    """Deliver what a trial's loggers still hold before its run is ended: the ``loggers`` the trial made plus any
    live ``MLflowCVLogger`` writing to ``run_id`` (a default ``MLflowCVLogger()`` inside the objective)."""
    found = {id(lg): lg for lg in loggers}
    if run_id is not None:
        found.update((id(lg), lg) for lg in live_loggers(run_id))
    for lg in found.values():
        try:
            lg.flush()
        except Exception:  # noqa: BLE001 - the logger keeps undelivered data in its spool and warns itself
            pass
