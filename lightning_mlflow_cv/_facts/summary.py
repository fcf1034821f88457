"""Run summaries for people: the run description (``mlflow.note.content``) and the terminal's closing lines.

Pure functions: everything comes in as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: MLflow's tag for the run description shown on the run page.
NOTE_TAG = "mlflow.note.content"


def headline(metrics: Mapping[str, float], keys: Iterable[str]) -> dict[str, float]:
    """The ``keys`` present in ``metrics``, in the order given."""
    return {k: float(metrics[k]) for k in keys if k in metrics}


def promotion_line(decision: Any | None, model_uri: str | None = None) -> str:
    """``"promoted to @champion (models:/x/3)"`` or ``"not promoted: <reason>"`` (``decision`` from ``promote``)."""
    if decision is None:
        return "not registered (see the run's registry.* tags)"
    where = f" ({model_uri})" if model_uri else ""
    if decision.promoted:
        return f"promoted to @{decision.champion_alias}{where}"
    return f"not promoted: {decision.reason}{where}"


def run_description(
    title: str,
    metrics: Mapping[str, float],
    keys: Iterable[str],
    decision: Any | None = None,
    model_uri: str | None = None,
) -> str:
    """Markdown for the run page's description: a title, the headline metrics table and the promotion outcome.

    Example::

        >>> print(run_description("digits", {"val/acc": 0.97}, ["val/acc"]))
        **digits**
        <BLANKLINE>
        | metric | value |
        |---|---|
        | `val/acc` | 0.97 |
    """
    lines = [f"**{title}**", ""]
    head = headline(metrics, keys)
    if head:
        lines += ["| metric | value |", "|---|---|"] + [f"| `{k}` | {v:.4g} |" for k, v in head.items()]
    if decision is not None or model_uri is not None:
        lines += ["", f"Model: {promotion_line(decision, model_uri)}"]
    return "\n".join(lines)
