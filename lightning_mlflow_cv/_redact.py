"""Redaction of secrets before anything reaches MLflow (config, environment, pip freeze, URIs)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

#: Key fragments whose values are secrets (matched case-insensitively, on word parts).
SECRET_KEY_PATTERN = re.compile(
    r"(pass(word|wd)?|secret|token(?!iz)|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credential|authorization|session[_-]?key)",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s:]+(:[^/@\s]*)?)@")
# key=value / key: value pairs inside free text (pip freeze lines, command lines, env dumps)
_INLINE_SECRET = re.compile(
    r"(?P<key>[\w.\-]*(?:pass(?:word|wd)?|secret|token(?!iz)|api[_-]?key|access[_-]?key|credential)[\w.\-]*)"
    r"(?P<sep>\s*[=:](?!=)\s*)(?P<val>\"[^\"]*\"|'[^']*'|[^\s,;&]+)",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True when ``key`` names a secret (password, token, secret, api_key, credentials, ...).

    Example::

        >>> is_secret_key("MLFLOW_TRACKING_PASSWORD"), is_secret_key("lr")
        (True, False)
    """
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def redact_text(text: str) -> str:
    """Remove credentials inside URLs (``user:pass@``) and ``secret=value`` pairs from free text.

    Example::

        >>> redact_text("https://bob:hunter2@example.com/simple")
        'https://***REDACTED***@example.com/simple'
    """
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _INLINE_SECRET.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)


def redact(value: Any, key: str = "") -> Any:
    """Redact a nested structure: secret keys get :data:`REDACTED`, strings lose URL credentials.

    Example::

        >>> redact({"db": {"password": "x", "url": "postgresql://u:p@h/db"}})
        {'db': {'password': '***REDACTED***', 'url': 'postgresql://***REDACTED***@h/db'}}
    """
    if key and is_secret_key(key) and value not in (None, "", {}, []):
        if not isinstance(value, (Mapping, list, tuple)):
            return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
