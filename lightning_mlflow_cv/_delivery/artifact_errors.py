"""Readable reasons for artifact-store (S3) failures, for the writer's one warning.

Every such failure is retried like any other (the data stays in the spool): an S3 endpoint that is down
(``botocore`` ``EndpointConnectionError``), a 5xx or throttling answer (``ClientError``), and refused credentials
(the user fixes them, then the writer or ``sync`` delivers). This module only names the cause and the fix, and
never echoes a secret (boto's messages name the error code and the key id at most).
"""

from __future__ import annotations

import re

#: S3 error codes (and botocore exception names) that mean "these credentials are not accepted".
CREDENTIAL_ERRORS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "NoCredentialsError",
    "PartialCredentialsError",
    "Unable to locate credentials",
)
_CONNECT = ("EndpointConnectionError", "Could not connect to the endpoint URL", "ConnectTimeoutError")
_S3_HINT = re.compile(r"\b(s3|S3|PutObject|UploadPart|CreateMultipartUpload|GetObject|HeadObject|ListObjects)")


def _chain(err: BaseException) -> str:
    parts, seen = [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def describe(err: BaseException) -> str | None:
    """The reason and fix for an S3 artifact-store failure, or None when ``err`` is not one.

    Example::

        >>> from botocore.exceptions import ClientError
        >>> e = ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "..."}}, "PutObject")
        >>> describe(e).split(".")[0]
        'the S3 artifact store refused the credentials (SignatureDoesNotMatch)'
    """
    text = _chain(err)
    code = next((c for c in CREDENTIAL_ERRORS if c in text), None)
    if code is not None and (
        _S3_HINT.search(text) or "botocore" in type(err).__module__ or "boto3" in type(err).__module__
    ):
        code = {"Unable to locate credentials": "NoCredentialsError"}.get(code, code)
        return (
            f"the S3 artifact store refused the credentials ({code}). Fix: give valid credentials to the process "
            "that writes artifacts: with `--no-serve-artifacts`, this process (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; MLFLOW_S3_ENDPOINT_URL for a non-AWS store); with proxied "
            "artifacts (`--artifacts-destination s3://...`), the tracking server"
        )
    if any(c in text for c in _CONNECT) and _S3_HINT.search(text) or "EndpointConnectionError" in text:
        url = re.search(r'endpoint URL: "?([^"\s]+)', text)
        where = f" at {url.group(1)}" if url else ""
        return (
            f"the S3 artifact store{where} is unreachable (EndpointConnectionError); artifacts wait in the spool "
            "until it is back. Check MLFLOW_S3_ENDPOINT_URL"
        )
    return None
