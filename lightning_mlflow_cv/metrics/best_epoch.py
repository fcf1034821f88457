"""Which validation epoch is the best, and the summary metrics logged at fit end (pure, no Trainer)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

__all__ = ["fit_summary", "is_new_best", "resolve_monitor"]


def is_new_best(score: Any, best: float | None, mode: Literal["min", "max"]) -> bool:
    """Whether ``score`` (a number, a 0-d tensor or None) is a new best against ``best`` under ``mode``.

    A missing or NaN score never is; the first real score always is; after that only a strictly better one
    (a tie keeps the earlier epoch, as ``ModelCheckpoint`` does).

    Raises:
        ValueError: when ``mode`` is not ``"min"`` or ``"max"``.

    Example::

        >>> is_new_best(0.8, None, "max"), is_new_best(0.9, 0.8, "max"), is_new_best(0.8, 0.8, "max")
        (True, True, False)
        >>> is_new_best(0.1, 0.2, "min"), is_new_best(float("nan"), None, "min"), is_new_best(None, None, "max")
        (True, False, False)
    """
    if mode not in ("min", "max"):
        raise ValueError(f"is_new_best: `mode` must be 'min' or 'max', got {mode!r}. Fix: mode='max'.")
    if score is None:
        return False
    value = float(score)
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def resolve_monitor(
    monitor: str | None, mode: Literal["min", "max"] | None, checkpoints: Iterable[Any] = ()
) -> tuple[str | None, Literal["min", "max"]]:
    """The ``(monitor, mode)`` that judges the best epoch: the given ones, else the first checkpoint callback's
    that has a monitor (``mode`` given alone overrides its mode), else ``(None, mode or "max")``.

    Example::

        >>> from types import SimpleNamespace as C
        >>> resolve_monitor(None, None, [C(monitor=None, mode="max"), C(monitor="val/loss", mode="min")])
        ('val/loss', 'min')
        >>> resolve_monitor("val/f1", None, [C(monitor="val/loss", mode="min")])
        ('val/f1', 'max')
        >>> resolve_monitor(None, None, [])
        (None, 'max')
    """
    if monitor is not None:
        return monitor, mode or "max"
    ckpt = next((c for c in checkpoints if getattr(c, "monitor", None)), None)
    if ckpt is None:
        return None, mode or "max"
    return ckpt.monitor, mode or ckpt.mode


def fit_summary(
    train_s: float, epoch: int | None, monitor: str | None = None, best_score: float | None = None
) -> dict[str, float]:
    """The fit-end summary metrics: ``time/train_hrs``, ``best/epoch`` (the epoch whose plots were logged) and,
    when a monitor judged it, ``best/<monitor>``.

    Example::

        >>> fit_summary(1800.0, 3, "val/f1", 0.9)
        {'time/train_hrs': 0.5, 'best/epoch': 3.0, 'best/val/f1': 0.9}
        >>> fit_summary(36.0, None)
        {'time/train_hrs': 0.01}
    """
    summary: dict[str, float] = {"time/train_hrs": train_s / 3600.0}
    if epoch is not None:
        summary["best/epoch"] = float(epoch)
    if monitor is not None and best_score is not None:
        summary[f"best/{monitor}"] = best_score
    return summary
