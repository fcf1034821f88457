"""Fake credentials in the shapes real ones have, built at run time.

None of them is a real credential. They are assembled from pieces (a prefix split in two, a body drawn from a
seeded generator) so that no source line holds a string a secret scanner (or a push protection) would flag.
"""

from __future__ import annotations

import base64
import json
import random

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UPPER_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def body(n: int, seed: int, alphabet: str = _ALNUM) -> str:
    """``n`` characters of ``alphabet`` drawn from a generator seeded with ``seed`` (the same every run)."""
    return "".join(random.Random(seed).choices(alphabet, k=n))


def aws_key_id(seed: int = 1) -> str:
    return "AK" + "IA" + body(16, seed, _UPPER_DIGITS)


def aws_secret_key(seed: int = 2) -> str:
    # 40 characters of base64, with a '/' as most real ones have
    return body(18, seed) + "/" + body(21, seed + 100)


def github_token(seed: int = 3) -> str:
    return "gh" + "p_" + body(36, seed)


def github_fine_grained(seed: int = 4) -> str:
    return "github" + "_pat_" + body(22, seed) + "_" + body(59, seed + 1)


def hf_token(seed: int = 5) -> str:
    return "h" + "f_" + body(34, seed)


def slack_bot_token(seed: int = 6) -> str:
    return "xo" + "xb-" + body(12, seed, "0123456789") + "-" + body(13, seed + 1, "0123456789") + "-" + body(24, seed)


def jwt(seed: int = 7) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64({"sub": body(8, seed), "name": "Alice", "iat": 1700000000})
    return f"{header}.{payload}." + body(43, seed + 1, _ALNUM + "-_")


def opaque_token(seed: int = 8) -> str:
    """A bearer token with no recognisable prefix (what an internal API hands out)."""
    return body(32, seed)


def gitlab_token(seed: int = 9) -> str:
    return "gl" + "pat-" + body(20, seed)


def stripe_secret_key(seed: int = 10) -> str:
    return "sk" + "_live_" + body(24, seed)


def openai_key(seed: int = 11) -> str:
    return "sk" + "-proj-" + body(48, seed)


def openai_legacy_key(seed: int = 12) -> str:
    return "sk" + "-" + body(48, seed)


def google_api_key(seed: int = 13) -> str:
    return "AI" + "za" + body(35, seed, _ALNUM + "-_")


def pypi_token(seed: int = 14) -> str:
    return "py" + "pi-AgEIcHlwaS5vcmc" + body(60, seed)


def azure_account_key(seed: int = 15) -> str:
    return body(86, seed, _ALNUM + "+/") + "=="


def azure_connection_string(seed: int = 15) -> str:
    return (
        "DefaultEndpointsProtocol=https;AccountName=teamdata;"
        + "Account"
        + "Key="
        + azure_account_key(seed)
        + ";EndpointSuffix=core.windows.net"
    )


def pem_body(seed: int = 16) -> str:
    return "\n".join(body(64, seed + i, _ALNUM + "+/") for i in range(6))


def pem_private_key(seed: int = 16, kind: str = "RSA ") -> str:
    return f"-----BEGIN {kind}PRIV" + f"ATE KEY-----\n{pem_body(seed)}\n-----END {kind}PRIV" + "ATE KEY-----"


def gcp_service_account_json(seed: int = 17) -> str:
    """A GCP service-account key file's text: its ``private_key`` holds a PEM block with escaped newlines."""
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "team-vision",
            "private_key_id": body(40, seed, "0123456789abcdef"),
            "private_key": pem_private_key(seed, kind="") + "\n",
            "client_email": "trainer@team-vision.iam.gserviceaccount.com",
            "client_id": body(21, seed, "0123456789"),
        }
    )


def basic_auth_value(seed: int = 18) -> str:
    return base64.b64encode(f"alice:{body(12, seed)}".encode()).decode()


def password(seed: int = 19) -> str:
    return "pw-" + body(14, seed)
