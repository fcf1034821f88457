"""Redaction of secrets before anything reaches MLflow (params, tags, config, environment, pip freeze, git diff).

Two nets, both applied to every value and text the logger writes:

- **by name**: a value under a secret-named key (``password``, ``token``, ``secret``, ``api_key``, ``credential``,
  ...), a ``key=value`` / ``key: value`` pair in text, ``user:pass@`` in a URL, and on a command line the value
  after a secret-named flag (``--password X``, ``--hf-token X``);
- **by shape**: credentials whose form gives them away whatever key they sit under (:data:`SHAPES`): PEM private
  key blocks, AWS access key ids (and a 40-character secret key beside one), GitHub, GitLab, Hugging Face, Slack,
  Stripe, OpenAI/Anthropic, Google API, PyPI, npm, Databricks and SendGrid tokens, JWTs, Azure ``AccountKey=`` /
  ``SharedAccessKey=`` and SAS ``sig=`` values, ``Authorization:`` header values and ``Basic``/``Bearer``
  credentials.

The shapes are a curated list rather than a generic scanner's entropy test: digests (a dataset's SHA-256, a git
commit, a run id, a model checksum) are random-looking by design and must stay visible, and every pattern here
starts from a fixed prefix or structure, so none of them can match a hex digest (see
``tests/reliability/README.md``, "Secret scanners compared", for the figures against detect-secrets).
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REDACTED = "***REDACTED***"

_SECRET_WORDS = r"pass(?:word|wd)?|secret|token(?!iz)|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credential"

#: Key fragments whose values are secrets (matched case-insensitively, on word parts).
SECRET_KEY_PATTERN = re.compile(rf"({_SECRET_WORDS}|authorization|session[_-]?key)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s:]+(:[^/@\s]*)?)@")
#: Literals one of which a text holds when a secret name can be in it (the name patterns run only then).
_NAME_ANCHORS = ("pass", "secret", "token", "key", "credential")
# key=value / key: value pairs inside free text (pip freeze lines, command lines, env dumps, JSON and YAML text)
_INLINE_SECRET = re.compile(
    rf"(?P<key>[\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*)"
    r"(?P<sep>[\"']?\s*[=:](?!=)\s*)(?P<val>\"[^\"]*\"|'[^']*'|[^\s,;&]+)",
    re.IGNORECASE,
)
# a secret-named command-line flag and the separate word that follows it (``--hf-token X``); ``--flag=X`` is inline
_FLAG_SECRET = re.compile(
    rf"(?P<key>(?<![\w-])--?(?=[A-Za-z0-9])[\w.-]*?(?:{_SECRET_WORDS})[\w.-]*)"
    r"(?P<sep>[ \t]+)(?P<val>\"[^\"]*\"|'[^']*'|(?!-)[^\s\"']+)",
    re.IGNORECASE,
)

_B = r"(?<![A-Za-z0-9])"  # a token starts at a word start (``token=ghp_...`` and ``"ghp_..."`` both qualify)
_E = r"(?![A-Za-z0-9])"

#: Credential shapes redacted wherever they appear: ``(name, anchors, pattern)``. A pattern runs only on a text
#: that holds one of its anchors (lower-case literals; substring tests cost far less than a regex scan, and most
#: values hold none). A pattern with a ``val`` group loses that group (what precedes it, a header name or a
#: connection-string key, stays readable); any other loses its whole match.
SHAPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "PEM private key block",
        ("private key",),
        r"(?P<pre>-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)"
        r"(?P<val>.*?(?=-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)|(?:(?:\\[nr]|[\s\"'+,])*[A-Za-z0-9+/=]{16,})+)",
    ),
    (
        "Authorization header value",
        ("authorization",),
        r"(?i:(?P<pre>(?<![\w-])(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:basic|bearer|token|digest|negotiate"
        r"|ntlm|apikey|api-key|aws4-hmac-sha256|sso-key|key)\s+)?))(?P<val>[^\s\"',;`]{8,})",
    ),
    (
        "AWS access key id",
        ("akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "apka", "aroa", "asca"),
        rf"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{{16}}{_E}",
    ),
    (
        "GitHub token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,}}|github_pat_[A-Za-z0-9_]{{40,}}){_E}",
    ),
    (
        "GitLab token",
        ("glpat-", "gldt-", "glrt-", "glptt-", "glcbt-", "gloas-", "glft-", "glimt-", "glsoat-", "glagent-", "glwt-"),
        rf"{_B}gl(?:pat|dt|rt|ptt|cbt|oas|ft|imt|soat|agent|wt)-[A-Za-z0-9_-]{{20,}}",
    ),
    ("Hugging Face token", ("hf_",), rf"{_B}hf_[A-Za-z0-9]{{30,}}{_E}"),
    ("Slack token", ("xox", "xapp-"), rf"{_B}(?:xox[abposer]-[A-Za-z0-9-]{{10,}}|xapp-\d-[A-Za-z0-9-]{{10,}})"),
    ("Slack webhook", ("hooks.slack.com/",), r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]{10,}"),
    ("JWT", ("eyj",), r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    (
        "Stripe key",
        ("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"),
        rf"{_B}(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{{16,}}|whsec_[A-Za-z0-9]{{24,}}){_E}",
    ),
    (
        "OpenAI / Anthropic key",
        ("sk-",),
        rf"{_B}sk-(?:(?:proj|svcacct|admin|ant-(?:api|admin)\d\d)-[A-Za-z0-9_-]{{20,}}|[A-Za-z0-9]{{32,}}{_E})",
    ),
    ("Google API key", ("aiza",), rf"{_B}AIza[0-9A-Za-z_-]{{35}}"),
    ("PyPI token", ("pypi-ageichlwas5vcmc",), rf"{_B}pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{{50,}}"),
    ("npm token", ("npm_",), rf"{_B}npm_[A-Za-z0-9]{{36}}{_E}"),
    ("Databricks token", ("dapi",), rf"{_B}dapi[0-9a-f]{{32}}(?:-\d)?{_E}"),
    ("SendGrid key", ("sg.",), rf"{_B}SG\.[A-Za-z0-9_-]{{22}}\.[A-Za-z0-9_-]{{43}}"),
    (
        "Azure key",
        ("accountkey", "sharedaccess"),
        r"(?P<pre>(?i:(?<![\w-])(?:AccountKey|SharedAccessKey|SharedAccessSignature)\s*=\s*))(?P<val>[^;\s\"'`]{16,})",
    ),
    ("SAS signature", ("sig=",), r"(?P<pre>[?&]sig=)(?P<val>[A-Za-z0-9%+/=]{16,})"),
    (
        "Bearer credential",
        ("bearer",),
        r"(?P<pre>(?<![\w-])(?:Bearer|bearer|BEARER)\s+)(?P<val>[A-Za-z0-9._~+/-]{16,}=*)",
    ),
    (
        "Basic credential",
        ("basic",),
        r"(?P<pre>(?<![\w-])(?:Basic|basic|BASIC)\s+)(?P<val>[A-Za-z0-9+/]{6,}={0,2})(?![\w+/=])",
    ),
)
_SHAPE_RES = [(name, anchors, re.compile(src, re.DOTALL)) for name, anchors, src in SHAPES]
_AWS_ANCHORS = next(anchors for name, anchors, _ in SHAPES if name == "AWS access key id")
_AWS_KEY_ID = re.compile(next(src for name, _, src in SHAPES if name == "AWS access key id"))
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _has_aws_key_id(text: str, low: str | None = None) -> bool:
    low = text.lower() if low is None else low
    return any(a in low for a in _AWS_ANCHORS) and bool(_AWS_KEY_ID.search(text))


def _is_aws_secret(s: str) -> bool:
    return any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() or c in "/+" for c in s)


def _shape(name: str, m: re.Match[str]) -> str:
    if "val" not in m.re.groupindex:
        return REDACTED
    if name in ("Bearer credential", "Basic credential") and not _credential_like(name, m.group("val")):
        return m.group(0)
    return m.group("pre") + REDACTED


def _credential_like(name: str, value: str) -> bool:
    """A ``Bearer`` value with a digit or a capital (not a word of prose); a ``Basic`` value that is base64 of
    ``user:password``."""
    if name == "Bearer credential":
        return any(c.isdigit() or c.isupper() for c in value)
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return ":" in raw and raw.isprintable()


def is_secret_key(key: str) -> bool:
    """True when ``key`` names a secret (password, token, secret, api_key, credentials, ...).

    Example::

        >>> is_secret_key("MLFLOW_TRACKING_PASSWORD"), is_secret_key("lr")
        (True, False)
    """
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def redact_shapes(text: str, aws: bool | None = None) -> str:
    """Redact the credential shapes of :data:`SHAPES` in ``text``, whatever surrounds them.

    An AWS secret access key has no prefix of its own; a 40-character base64 string with both letter cases is
    redacted when an AWS access key id appears in the same text (or, with ``aws=True``, in the same record).

    Example::

        >>> redact_shapes("hub=" + "hf_" + "x" * 34 + " lr=0.1")
        'hub=***REDACTED*** lr=0.1'
    """
    low = text.lower()
    if aws is None:
        aws = _has_aws_key_id(text, low)
    for name, anchors, rx in _SHAPE_RES:
        if any(a in low for a in anchors):
            text = rx.sub(functools.partial(_shape, name), text)
    if aws:
        text = _AWS_SECRET.sub(lambda m: REDACTED if _is_aws_secret(m.group(0)) else m.group(0), text)
    return text


def _quoted(val: str) -> str:
    return f"{val[0]}{REDACTED}{val[0]}" if val[:1] in ("'", '"') else REDACTED


def redact_text(text: str, aws: bool | None = None) -> str:
    """Remove credentials from free text: the shapes of :data:`SHAPES`, credentials inside URLs (``user:pass@``),
    ``secret=value`` pairs and the value after a secret-named flag (``--password X``).

    Example::

        >>> redact_text("https://bob:hunter2@example.com/simple")
        'https://***REDACTED***@example.com/simple'
        >>> redact_text("python fit.py --hf-token abc123 --lr 0.1")
        'python fit.py --hf-token ***REDACTED*** --lr 0.1'
    """
    text = redact_shapes(text, aws)
    if "@" in text:
        text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    low = text.lower()
    if any(a in low for a in _NAME_ANCHORS):
        text = _INLINE_SECRET.sub(lambda m: f"{m.group('key')}{m.group('sep')}{_quoted(m.group('val'))}", text)
        if "-" in text:
            text = _FLAG_SECRET.sub(lambda m: f"{m.group('key')}{m.group('sep')}{_quoted(m.group('val'))}", text)
    return text


def safe_uri(uri: str) -> str:
    """The tracking URI without credentials, as kept in the spool header."""
    return redact_text(uri)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with its secrets redacted: the item after a secret-named flag (``--password X``,
    ``--hf-token X``, ``--api-key X``), the value of ``--flag=X``, and credential shapes in any item.

    Example::

        >>> redact_argv(["fit.py", "--password", "hunter2", "--api-key=k1", "--lr", "0.1"])
        ['fit.py', '--password', '***REDACTED***', '--api-key=***REDACTED***', '--lr', '0.1']
    """
    items = [str(a) for a in argv]
    aws = any(_has_aws_key_id(a) for a in items)
    out: list[str] = []
    hide_next = False
    for a in items:
        if hide_next and not a.startswith("-"):
            out.append(REDACTED)
        else:
            out.append(redact_text(a, aws))
        hide_next = a.startswith("-") and "=" not in a and is_secret_key(a.lstrip("-"))
    return out


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def redact(value: Any, key: str = "") -> Any:
    """Redact a nested structure: secret keys get :data:`REDACTED`, strings go through :func:`redact_text`.

    An AWS secret key is recognised anywhere in the structure once an AWS access key id appears in it (the two
    usually sit side by side, under keys such as ``key_id`` and ``key``).

    Example::

        >>> redact({"db": {"password": "x", "url": "postgresql://u:p@h/db"}})
        {'db': {'password': '***REDACTED***', 'url': 'postgresql://***REDACTED***@h/db'}}
    """
    aws = any(_has_aws_key_id(s) for s in _strings(value))
    return _redact(value, key, aws)


def _redact(value: Any, key: str, aws: bool) -> Any:
    if key and is_secret_key(key) and value not in (None, "", {}, []):
        if not isinstance(value, (Mapping, list, tuple)):
            return REDACTED
    if isinstance(value, Mapping):
        return {k: _redact(v, str(k), aws) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, "", aws) for v in value)
    if isinstance(value, str):
        return redact_text(value, aws)
    return value
