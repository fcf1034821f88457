"""Pure helpers for MLflow keys, params and tags. MLflow's limits come from MLflow itself."""

from __future__ import annotations

import math
import posixpath
import re
import warnings
from collections.abc import Mapping
from typing import Any

from mlflow.utils import validation as _v

#: Lightning's ``MLFlowLogger`` rule for metric keys: every character outside this set is deleted
#: (``lightning/pytorch/loggers/mlflow.py``: ``re.sub("[^a-zA-Z0-9_/. -]+", "", k)``).
_LIGHTNING_METRIC_REJECTED = re.compile(r"[^a-zA-Z0-9_/. -]+")


def _path_not_unique_fallback(name: str) -> bool:  # MLflow releases without `path_not_unique`
    norm = posixpath.normpath(name)
    return norm != str(name) or norm == "." or norm.startswith(("..", "/"))


#: MLflow's own checks (character set, which depends on the OS and the release, and path form): older releases
#: (before ``validate_param_and_metric_name``) check their ``_VALID_PARAM_AND_METRIC_NAMES``, which has no ``:``.
_old_names = getattr(_v, "_VALID_PARAM_AND_METRIC_NAMES", None) or re.compile(r"^[/\w.\- ]*$")
_valid_chars = getattr(_v, "validate_param_and_metric_name", None) or _old_names.match
_path_not_unique = getattr(_v, "path_not_unique", None) or _path_not_unique_fallback

MAX_PARAM_VAL_LENGTH: int = _v.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH: int = _v.MAX_TAG_VAL_LENGTH
MAX_KEY_LENGTH: int = _v.MAX_ENTITY_KEY_LENGTH
MAX_METRICS_PER_BATCH: int = _v.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH: int = _v.MAX_PARAMS_TAGS_PER_BATCH
MAX_ENTITIES_PER_BATCH: int = _v.MAX_ENTITIES_PER_BATCH

#: Keys of the CV tag schema (other keys are allowed too).
CV_TAG_KEYS = ("task", "backbone", "dataset", "env", "team", "git_commit", "hardware")


def is_valid_key(key: str) -> bool:
    """True when MLflow accepts ``key`` as a metric, param or tag key (MLflow's own checks and length limit)."""
    return bool(_valid_chars(key)) and not _path_not_unique(key) and len(key) <= MAX_KEY_LENGTH


def _repair(key: str) -> str:
    """Make a key whose characters MLflow accepts valid as a path too: drop empty segments (leading, trailing
    and doubled ``/``), turn ``.`` / ``..`` segments into ``_`` / ``__``, cut to MLflow's length limit."""
    segments = [{".": "_", "..": "__"}.get(s, s) for s in key.split("/") if s]
    return ("/".join(segments) or "_")[:MAX_KEY_LENGTH].rstrip("/") or "_"


def sanitize_key(key: str) -> str:
    """A param or tag key as MLflow accepts it: characters MLflow rejects are deleted.

    Keys MLflow accepts come out unchanged (Lightning's ``MLFlowLogger`` logs param keys as given, so these
    are the same names as there). What is still not a valid MLflow key after the deletion (empty, over
    MLflow's length limit, ``..`` or empty path segments) is repaired by :func:`_repair`.

    Example::

        >>> sanitize_key("optim@lr"), sanitize_key("val:acc")
        ('optimlr', 'val:acc')
    """
    key = str(key)
    if is_valid_key(key):
        return key
    # which characters MLflow rejects is MLflow's call (it also differs on Windows, where ':' is rejected)
    kept = "".join(c for c in key if _valid_chars(c))
    return kept if is_valid_key(kept) else _repair(kept)


def metric_key(key: str) -> str:
    """A metric key renamed exactly as Lightning's ``MLFlowLogger`` renames it: characters outside
    ``a-z A-Z 0-9 _ / . - space`` are deleted (``[some_metric]`` -> ``some_metric``, ``val:acc`` -> ``valacc``).

    A result MLflow would still reject (empty, over MLflow's length limit, ``..`` or empty path segments;
    Lightning's logger fails on those) is repaired by :func:`_repair`.

    Example::

        >>> metric_key("val/acc@top1"), metric_key("[some_metric]"), metric_key("val:acc")
        ('val/acctop1', 'some_metric', 'valacc')
    """
    new = _LIGHTNING_METRIC_REJECTED.sub("", str(key))
    return new if is_valid_key(new) else _repair(new)


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


def split_long_params(
    params: Mapping[str, str], limit: int = MAX_PARAM_VAL_LENGTH
) -> tuple[dict[str, str], dict[str, str]]:
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
    if type(value) is float:  # what Lightning passes (it converts tensors first): the hot path of log_metrics
        return value
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
    if task is None:
        return out
    # The task registry imports torch/torchmetrics: read it here, not at import, so the writer process stays light.
    from lightning_mlflow_cv import tasks as _tasks

    known, aliases = _tasks.task_names(), _tasks.task_aliases()
    if task not in known:
        hint = f" (the short name of {aliases[task]!r}: tag the canonical name)" if task in aliases else ""
        warnings.warn(
            f"MLflowCVLogger: tag task={task!r} is not a known CV task{hint}; expected one of {list(known)}. "
            "The tag is logged as given; use one of the known names so runs can be compared by task.",
            UserWarning,
            stacklevel=3,
        )
    return out
