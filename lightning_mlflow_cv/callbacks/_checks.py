"""The argument checks of the callbacks' ``__init__`` (and ``setup``), one place for each kind of argument.

Every error is a ``ValueError`` that names the callback, the argument, the value received and the fix:
``"<Callback>: `<argument>` must be <what>, got <value>. Fix: <how>."``. A bool is never taken for an int or
a number (``True`` is not ``1`` here).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, NoReturn, overload

import torch

from lightning_mlflow_cv import tasks as _tasks


def fail(who: str, name: str, must: str, value: Any, fix: str, error: type[Exception] = ValueError) -> NoReturn:
    """Raise the one error format: ``<who>: `<name>` must be <must>, got <value>. Fix: <fix>.``

    Example::

        >>> fail("X", "k", "an int >= 1", 0, "e.g. k=4")
        Traceback (most recent call last):
        ...
        ValueError: X: `k` must be an int >= 1, got 0. Fix: e.g. k=4.
    """
    raise error(f"{who}: `{name}` must be {must}, got {value!r}. Fix: {fix.rstrip('.')}.")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_task(who: str, task: Any) -> str:
    """The canonical name of ``task`` (short names allowed) or a ValueError naming the allowed values."""
    return _tasks.normalize_task(task, who)


@overload
def check_int(
    who: str,
    name: str,
    value: Any,
    minimum: int | None = 1,
    maximum: int | None = None,
    *,
    allow_none: Literal[False] = False,
    must: str | None = None,
    fix: str | None = None,
) -> int: ...


@overload
def check_int(
    who: str,
    name: str,
    value: Any,
    minimum: int | None = 1,
    maximum: int | None = None,
    *,
    allow_none: bool,
    must: str | None = None,
    fix: str | None = None,
) -> int | None: ...


def check_int(
    who: str,
    name: str,
    value: Any,
    minimum: int | None = 1,
    maximum: int | None = None,
    *,
    allow_none: bool = False,
    must: str | None = None,
    fix: str | None = None,
) -> int | None:
    """``value`` when it is an int in ``[minimum, maximum]`` (either bound may be None), or None when allowed.

    Example::

        >>> check_int("X", "warmup", 0, minimum=0), check_int("X", "nrow", None, allow_none=True)
        (0, None)
        >>> check_int("X", "opset", 5, 7, 25)
        Traceback (most recent call last):
        ...
        ValueError: X: `opset` must be an int in 7..25, got 5. Fix: e.g. opset=7.
    """
    if value is None and allow_none:
        return None
    if is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    if must is None:
        if minimum is not None and maximum is not None:
            must = f"an int in {minimum}..{maximum}"
        else:
            must = "an int" + (f" >= {minimum}" if minimum is not None else "")
        must += " or None" if allow_none else ""
    fail(who, name, must, value, fix or f"e.g. {name}={max(minimum or 0, 4) if maximum is None else minimum}")


def check_number(
    who: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    must: str | None = None,
    fix: str,
) -> Any:
    """``value`` (unchanged) when it is a number ``>= low`` (``> low`` with ``above``) and ``<= high``.

    Example::

        >>> check_number("X", "alpha", 0.5, 0, 1, above=True, fix="e.g. alpha=0.5")
        0.5
        >>> check_number("X", "atol", 0, 0, above=True, fix="e.g. atol=1e-4")
        Traceback (most recent call last):
        ...
        ValueError: X: `atol` must be a number > 0, got 0. Fix: e.g. atol=1e-4.
    """
    if (
        is_number(value)
        and (low is None or (value > low if above else value >= low))
        and (high is None or value <= high)
    ):
        return value
    if must is None:
        if low is not None and high is not None:
            must = f"a number in {'(' if above else '['}{low:g}, {high:g}]"
        elif low is not None:
            must = f"a number {'>' if above else '>='} {low:g}"
        else:
            must = f"a number <= {high:g}" if high is not None else "a number"
    fail(who, name, must, value, fix)


def check_bool(who: str, name: str, value: Any, fix: str | None = None) -> bool:
    """``value`` when it is ``True`` or ``False`` (not a truthy string: YAML's ``"yes"`` is refused)."""
    if isinstance(value, bool):
        return value
    fail(who, name, "True or False", value, fix or f"{name}=True or {name}=False")


def check_choice(
    who: str, name: str, value: Any, choices: Sequence[Any], fix: str | None = None, must: str | None = None
) -> Any:
    """``value`` when it is one of ``choices``; the error lists them (``'min', 'max' or None``).

    Example::

        >>> check_choice("X", "mode", "maximum", ("min", "max", None))
        Traceback (most recent call last):
        ...
        ValueError: X: `mode` must be 'min', 'max' or None, got 'maximum'. Fix: e.g. mode='min'.
    """
    if value in choices:
        return value
    if must is None:
        shown = [repr(c) for c in choices]
        must = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    fail(who, name, must, value, fix or f"e.g. {name}={choices[0]!r}")


def check_text(
    who: str,
    name: str,
    value: Any,
    *,
    allow_none: bool = False,
    strip: bool = True,
    must: str = "a non-empty string",
    fix: str,
) -> Any:
    """``value`` when it is a non-empty string (non-blank with ``strip``), or None when allowed."""
    if (value is None and allow_none) or (isinstance(value, str) and (value.strip() if strip else value)):
        return value
    fail(who, name, must + (" or None" if allow_none else ""), value, fix)


def check_names(
    who: str, name: str, value: Any, *, must: str, fix: str, strings: bool = False, error: type[Exception] = ValueError
) -> list[Any] | None:
    """``value`` as a list when it is a sequence that is not a string (with ``strings``, of non-empty strings only),
    or None."""
    if value is None:
        return None
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or (strings and not all(isinstance(v, str) and v for v in value))
    ):
        fail(who, name, must, value, fix, error)
    return list(value)


def check_mean_std(who: str, mean: Any, std: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Validate the normalisation statistics: both or neither, equal length, std > 0."""

    def as_tuple(name: str, v: Any) -> tuple[float, ...] | None:
        if v is None:
            return None
        if isinstance(v, (int, float)):
            return (float(v),)
        try:
            out = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise ValueError(
                f"{who}: `{name}` must be a number or a sequence of numbers (one per channel), got {v!r}. "
                f"Fix: e.g. {name}=(0.485, 0.456, 0.406)."
            ) from None
        if not out:
            raise ValueError(f"{who}: `{name}` must not be empty. Fix: one value per channel, or None.")
        return out

    m, s = as_tuple("mean", mean), as_tuple("std", std)
    if (m is None) != (s is None):
        raise ValueError(
            f"{who}: pass both `mean` and `std` or neither, got mean={mean!r}, std={std!r}. "
            "Fix: the values your Normalize transform uses."
        )
    if m is not None and s is not None:
        if len(m) != len(s):
            raise ValueError(f"{who}: `mean` and `std` need the same length, got {len(m)} and {len(s)}: {m}, {s}.")
        if any(v <= 0 for v in s):
            raise ValueError(f"{who}: every `std` value must be > 0, got {s}.")
    return m, s


def resolve_callable(who: str, name: str, fn: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """A callable given directly or by import path ``"package.module:function"`` (so YAML can name it).

    Raises:
        ValueError: malformed path, module or attribute not found, or not callable.

    Example::

        >>> resolve_callable("X", "output_transform", "math:sqrt")(4.0)
        2.0
    """
    if fn is None or callable(fn):
        return fn
    if not isinstance(fn, str) or fn.count(":") != 1 or not all(fn.split(":")):
        raise ValueError(
            f"{who}: `{name}` must be a callable or an import path 'package.module:function', got {fn!r}. "
            f"Fix: e.g. {name}='my_project.adapters:to_logits'."
        )
    mod_name, attr = fn.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"{who}: `{name}`={fn!r}: cannot import module {mod_name!r} ({e}). Fix the import path."
        ) from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{who}: `{name}`={fn!r}: module {mod_name!r} has no attribute {attr!r}. Fix the name.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{who}: `{name}`={fn!r} is a {type(obj).__name__}, not a callable.")
    return obj


def resolve_module(who: str, model: torch.nn.Module, path: Any, arg: str = "target_layer") -> torch.nn.Module:
    """The submodule of ``model`` at dotted ``path`` (as in ``model.named_modules()``).

    Raises:
        ValueError: when there is none, listing close matches (difflib) and some valid names.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
        >>> type(resolve_module("X", m, "0")).__name__
        'Conv2d'
    """
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(path, str) and path in names:
        return model.get_submodule(path)
    close = difflib.get_close_matches(str(path), names, n=5, cutoff=0.5)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    hint = f" Close matches: {close}." if close else " No close matches."
    some = convs[-5:] or names[:10]
    raise ValueError(
        f"{who}: `{arg}`={path!r} is not a submodule of {type(model).__name__}.{hint} Fix: a dotted name from "
        f"`[n for n, _ in model.named_modules()]`, e.g. one of {some} (usually the last conv layer)."
    )
