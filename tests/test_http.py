"""Fail-fast HTTP (lightning_mlflow_cv._delivery.http): a marked thread makes one attempt on every MLflow release."""

from __future__ import annotations

import time

import pytest
from conftest import refused_port
from mlflow.utils import rest_utils
from mlflow.utils.rest_utils import MlflowHostCreds

from lightning_mlflow_cv._delivery import http as _http


def _get(port: int) -> None:
    rest_utils.http_request(MlflowHostCreds(f"http://127.0.0.1:{port}"), "/api/2.0/mlflow/runs/get", "GET")


def test_a_marked_thread_makes_one_attempt_and_fails_at_once():
    """MLflow 2.4 turns `max_retries=0` into its default (5 retries with backoff, ~1 min): one attempt here."""
    _http.install()
    with refused_port() as port:
        t0 = time.monotonic()
        with _http.fail_fast(1.0), pytest.raises(Exception, match=r"127\.0\.0\.1"):
            _get(port)
        assert time.monotonic() - t0 < 5


def test_retries_are_zeroed_only_in_a_marked_thread_whatever_the_argument_positions():
    calls = []

    def old_signature(method, url, max_retries, backoff_factor, retry_codes, **kwargs):  # MLflow 2.4's
        calls.append((max_retries, backoff_factor))

    def new_signature(method, url, max_retries, backoff_factor, backoff_jitter, retry_codes, raise_on_status=True,
                      **kwargs):  # MLflow 3's
        calls.append((max_retries, backoff_factor, backoff_jitter))

    for fn, args in ((old_signature, ("GET", "u", 5, 2, ())), (new_signature, ("GET", "u", 7, 2, 1.0, ()))):
        calls.clear()
        wrapped = _http._wrap_retries(fn)
        wrapped(*args, timeout=3)
        with _http.fail_fast(1.0):
            wrapped(*args, timeout=3)
        assert calls[0] == args[2:-1] and set(calls[1]) == {0}, calls
