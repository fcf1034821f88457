"""Pure helpers for MLflow keys, params and tags. MLflow's limits come from MLflow itself."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

from mlflow.utils import validation as _v

from lightning_mlflow_cv import tasks as _tasks

#: Characters MLflow accepts in metric/param/tag keys (see ``mlflow.utils.validation``).
_ILLEGAL_KEY_CHARS = re.compile(r"[^\w\-./ :]")

MAX_PARAM_VAL_LENGTH: int = _v.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH: int = _v.MAX_TAG_VAL_LENGTH
MAX_KEY_LENGTH: int = _v.MAX_ENTITY_KEY_LENGTH
MAX_METRICS_PER_BATCH: int = _v.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH: int = _v.MAX_PARAMS_TAGS_PER_BATCH
MAX_ENTITIES_PER_BATCH: int = _v.MAX_ENTITIES_PER_BATCH

#: CV tasks the tag schema knows (the registry of :mod:`lightning_mlflow_cv.tasks`); anything else warns.
CV_TASKS: tuple[str, ...] = _tasks.TASKS
#: Keys of the CV tag schema (other keys are allowed too).
CV_TAG_KEYS = ("task", "backbone", "dataset", "env", "team", "git_commit", "hardware")


def sanitize_key(key: str) -> str:
    """Return ``key`` with every character MLflow rejects replaced by ``_``.

    Example::

        >>> sanitize_key("val/acc@top1")
        'val/acc_top1'
    """
    new = _ILLEGAL_KEY_CHARS.sub("_", str(key))
    # MLflow rejects '..' path segments and leading '/' in keys.
    new = new.replace("..", "_.").lstrip("/") or "_"
    return new[:MAX_KEY_LENGTH]


def flatten(params: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Flatten nested mappings (and Namespaces) into ``{"a/b": value}``.

    Example::

        >>> flatten({"optim": {"lr": 0.1}, "epochs": 3})
        {'optim/lr': 0.1, 'epochs': 3}
    """
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if hasattr(v, "__dict__") and type(v).__name__ == "Namespace":
            v = vars(v)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def param_value(value: Any) -> str:
    """Render a param value the way MLflow stores it (``str``), with tensors as plain numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    return str(value)


def split_long_params(params: Mapping[str, str], limit: int = MAX_PARAM_VAL_LENGTH) -> tuple[dict[str, str], dict[str, str]]:
    """Truncate values over MLflow's param length limit.

    Returns ``(params_to_log, whole_values)`` where ``whole_values`` holds the untruncated value of
    every key that was cut, so it can be kept in an artifact.

    Example::

        >>> short, whole = split_long_params({"a": "x" * 7000}, limit=10)
        >>> len(short["a"]), len(whole["a"])
        (10, 7000)
    """
    short: dict[str, str] = {}
    whole: dict[str, str] = {}
    for k, v in params.items():
        if len(v) > limit:
            short[k] = v[: limit - 3] + "..."
            whole[k] = v
        else:
            short[k] = v
    return short, whole


def metric_value(value: Any) -> float | None:
    """Convert a metric value to ``float``; ``None`` for non-numeric values (strings, objects).

    Tensors are detached and moved to the CPU. NaN and inf are kept (MLflow stores them).

    Example::

        >>> metric_value(3), metric_value("high")
        (3.0, None)
    """
    if isinstance(value, (bool, str, bytes)):
        return None
    if hasattr(value, "detach"):
        if value.numel() != 1:
            return None
        value = value.detach().cpu().item()
    elif hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if not math.isnan(f) else float("nan")


def validate_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Check the CV tag schema and stringify values. An unknown ``task`` warns, listing the known ones.

    Example::

        >>> validate_tags({"task": "classification", "team": "vision"})
        {'task': 'classification', 'team': 'vision'}
    """
    out = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
    task = out.get("task")
    if task is not None and task not in CV_TASKS:
        hint = f" (the short name of {_tasks.TASK_ALIASES[task]!r}: tag the canonical name)" if task in _tasks.TASK_ALIASES else ""
        warnings.warn(
            f"MLflowCVLogger: tag task={task!r} is not a known CV task{hint}; expected one of {list(CV_TASKS)}. "
            "The tag is logged as given; use one of the known names so runs can be compared by task.",
            UserWarning,
            stacklevel=3,
        )
    return out
