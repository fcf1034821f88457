"""Fail-fast HTTP for the background writer.

MLflow's REST client retries a failed request for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``). Those settings are process-wide environment variables, so we cannot
change them for our writer without changing them for the user's own MLflow calls. Instead,
:func:`fail_fast` marks the *current thread*: MLflow's ``http_request`` is wrapped once so that calls made
from a marked thread get ``max_retries=0`` and a short timeout; every other thread is untouched. The writer
does its own retry with backoff and keeps undelivered data on disk.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from typing import Any

_state = threading.local()
_installed = False
_lock = threading.Lock()


def _wrap(fn: Any) -> Any:
    if getattr(fn, "_lmc_wrapped", False):
        return fn

    @functools.wraps(fn)
    def http_request(*args: Any, **kwargs: Any) -> Any:
        timeout = getattr(_state, "timeout", None)
        if timeout is not None:
            kwargs["max_retries"] = 0
            kwargs["timeout"] = timeout
        return fn(*args, **kwargs)

    http_request._lmc_wrapped = True  # type: ignore[attr-defined]
    return http_request


def _wrap_retries(fn: Any) -> Any:
    """MLflow's ``_get_http_response_with_retries`` with no retries and no backoff for a marked thread.

    Older MLflow (2.4 among them) reads ``max_retries = max_retries or <default>`` in ``http_request``, so the
    ``max_retries=0`` passed there becomes the default (5 retries with backoff, about a minute per request); the
    retry count reaches this function either way, so it is set here too. The arguments are bound by name (their
    positions differ between releases).
    """
    if getattr(fn, "_lmc_wrapped", False):
        return fn
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def get_with_retries(*args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "timeout", None) is None:
            return fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        for name in ("max_retries", "backoff_factor", "backoff_jitter"):
            if name in bound.arguments:
                bound.arguments[name] = 0
        return fn(*bound.args, **bound.kwargs)

    get_with_retries._lmc_wrapped = True  # type: ignore[attr-defined]
    return get_with_retries


def install() -> None:
    """Wrap MLflow's ``http_request`` (idempotent). Unmarked threads behave exactly as before."""
    global _installed
    with _lock:
        if _installed:
            return
        import mlflow.utils.rest_utils as rest_utils

        rest_utils.http_request = _wrap(rest_utils.http_request)
        if hasattr(rest_utils, "_get_http_response_with_retries"):
            rest_utils._get_http_response_with_retries = _wrap_retries(rest_utils._get_http_response_with_retries)
        with contextlib.suppress(ImportError):
            import mlflow.store.artifact.http_artifact_repo as http_repo

            http_repo.http_request = _wrap(http_repo.http_request)
        _installed = True


def current_timeout() -> float | None:
    """The fail-fast timeout of the current thread (None: MLflow's normal retries), to hand to helper threads."""
    return getattr(_state, "timeout", None)


@contextlib.contextmanager
def fail_fast(timeout_s: float | None) -> Iterator[None]:
    """Within this block, MLflow HTTP calls from this thread do not retry and time out after ``timeout_s``.

    ``None`` leaves MLflow's normal retries in place (so a caller can pass on :func:`current_timeout`).
    """
    if timeout_s is None:
        yield
        return
    install()
    previous = getattr(_state, "timeout", None)
    _state.timeout = timeout_s
    try:
        yield
    finally:
        _state.timeout = previous
