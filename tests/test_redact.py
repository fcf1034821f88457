"""Redaction, table-driven: each credential shape is removed whatever key it sits under, and each value that only
looks random (digests, commits, run ids, checksums), paths and class names stay as they are."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import fake_secrets as fake
import pytest

from lightning_mlflow_cv._shipping.model_card import model_card_markdown
from lightning_mlflow_cv._facts.redact import REDACTED, SHAPES, redact, redact_argv, redact_text

SHA256 = hashlib.sha256(b"digits").hexdigest()
COMMIT = hashlib.sha1(b"commit").hexdigest()
PEM = fake.pem_private_key()
PEM_LINES = fake.pem_body().splitlines()

# (case, text, the parts that must be gone, the parts that must stay)
SHAPE_CASES = [
    ("AWS access key id", f"storage={fake.aws_key_id()}", [fake.aws_key_id()], ["storage="]),
    (
        "AWS secret key beside its id",
        f"id {fake.aws_key_id()} key {fake.aws_secret_key()} commit {COMMIT}",
        [fake.aws_key_id(), fake.aws_secret_key()],
        [COMMIT],
    ),
    ("GitHub token", f"repo_auth: {fake.github_token()}", [fake.github_token()], ["repo_auth: "]),
    ("GitHub fine-grained token", fake.github_fine_grained(), [fake.github_fine_grained()], []),
    (
        "GitHub token in a URL",
        f"https://x:{fake.github_token()}@github.com/o/r",
        [fake.github_token()],
        ["github.com/o/r"],
    ),
    ("GitLab token", f"gitlab {fake.gitlab_token()}", [fake.gitlab_token()], ["gitlab "]),
    ("SendGrid key", "SG." + fake.body(22, 25) + "." + fake.body(43, 26), [fake.body(43, 26)], []),
    ("Hugging Face token", f"hub={fake.hf_token()},lr=0.1", [fake.hf_token()], ["hub=", "lr=0.1"]),
    ("Slack bot token", f"notify {fake.slack_bot_token()}", [fake.slack_bot_token()], ["notify "]),
    (
        "Slack webhook",
        "https://hooks.slack.com/services/T0" + fake.body(9, 1) + "/B0" + fake.body(9, 2) + "/" + fake.body(24, 3),
        [fake.body(24, 3)],
        ["https://"],
    ),
    ("JWT", f"session {fake.jwt()}", [fake.jwt().split(".")[1], fake.jwt().split(".")[2]], ["session "]),
    ("Stripe secret key", fake.stripe_secret_key(), [fake.stripe_secret_key()], []),
    ("OpenAI project key", f"OPENAI={fake.openai_key()}", [fake.openai_key()], ["OPENAI="]),
    ("OpenAI legacy key", fake.openai_legacy_key(), [fake.openai_legacy_key()], []),
    ("Google API key", f"maps?key={fake.google_api_key()}", [fake.google_api_key()], ["maps?key="]),
    ("PyPI token", fake.pypi_token(), [fake.pypi_token()], []),
    ("npm token", "npm" + "_" + fake.body(36, 20), ["npm" + "_" + fake.body(36, 20)], []),
    (
        "Databricks token",
        "da" + "pi" + fake.body(32, 21, "0123456789abcdef"),
        [fake.body(32, 21, "0123456789abcdef")],
        [],
    ),
    (
        "Azure connection string",
        fake.azure_connection_string(),
        [fake.azure_account_key()],
        ["AccountName=teamdata;", "EndpointSuffix=core.windows.net"],
    ),
    (
        "Azure SAS signature",
        "https://teamdata.blob.core.windows.net/c/x.tar?sv=2022-11-02&sp=r&sig=" + fake.body(43, 22) + "%3D",
        [fake.body(43, 22)],
        ["sv=2022-11-02&sp=r&sig="],
    ),
    ("PEM private key block (whole)", f"key = '''{PEM}'''", PEM_LINES, ["-----BEGIN RSA PRIV", "key = '''"]),
    (
        "PEM private key in a git diff",
        "+KEY = '''\n" + "\n".join("+" + line for line in PEM.splitlines()) + "\n+'''\n+lr = 0.1\n",
        PEM_LINES,
        ["+lr = 0.1"],
    ),
    ("PEM private key cut short (no END line)", PEM.split("-----END")[0][:300], PEM_LINES[:3], []),
    ("OpenSSH private key", fake.pem_private_key(30, kind="OPENSSH "), fake.pem_body(30).splitlines(), []),
    (
        "GCP service-account JSON as text",
        fake.gcp_service_account_json(),
        fake.pem_body(17).splitlines() + [json.loads(fake.gcp_service_account_json())["private_key_id"]],
        ["trainer@team-vision.iam.gserviceaccount.com", "team-vision"],
    ),
    (
        "Authorization: Bearer",
        f"Authorization: Bearer {fake.opaque_token()}",
        [fake.opaque_token()],
        ["Authorization: Bearer "],
    ),
    (
        "Authorization in JSON",
        json.dumps({"Authorization": "token " + fake.opaque_token(9)}),
        [fake.opaque_token(9)],
        [],
    ),
    ("Authorization: Basic", f"Authorization: Basic {fake.basic_auth_value()}", [fake.basic_auth_value()], ["Basic "]),
    ("Bearer alone", f"curl -H 'Bearer {fake.opaque_token(10)}'", [fake.opaque_token(10)], ["curl -H 'Bearer "]),
    ("Basic alone", f"Basic {fake.basic_auth_value(11)}", [fake.basic_auth_value(11)], ["Basic "]),
    (
        "secret flags in a command line",
        f"python fit.py --password {fake.password()} --hf-token {fake.body(12, 23)} --api-key '{fake.body(12, 24)}' --lr 0.1",
        [fake.password(), fake.body(12, 23), fake.body(12, 24)],
        ["--password ", "--hf-token ", "--api-key ", "--lr 0.1"],
    ),
]

# values that must stay exactly as they are
KEEP_CASES = [
    ("dataset SHA-256", SHA256),
    ("dataset SHA-256, prefixed", "sha256:" + SHA256),
    ("git commit", COMMIT),
    ("short git commit", COMMIT[:7]),
    ("run id", uuid.UUID(int=7).hex),
    ("run id with dashes", str(uuid.UUID(int=2**100 + 7))),
    ("model checksum (md5)", "md5:" + hashlib.md5(b"w").hexdigest()),  # noqa: S324 - a checksum, not security
    ("model checksum (base64 SHA-256)", base64.b64encode(hashlib.sha256(b"w").digest()).decode()),
    ("logged model id", "m-" + uuid.UUID(int=9).hex),
    ("model URI", f"runs:/{uuid.UUID(int=7).hex}/model"),
    ("path", "/data/imagenet/train"),
    ("object store path", "s3://team-data/datasets/coco/annotations/instances_train2017.json"),
    ("checkpoint", "gs://vision-bucket/ckpt/epoch=12-step=4800.ckpt"),
    ("weights URL", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"),
    ("class path", "lightning_mlflow_cv.callbacks.ModelRegistryCallback"),
    ("optimizer", "torch.optim.AdamW"),
    ("timm model", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    ("hub function", "hf_hub_download"),
    ("transform", "RandomResizedCrop(size=(224, 224), scale=(0.08, 1.0), antialias=True)"),
    ("prose with Basic and Bearer", "Basic augmentation; the bearer responsibilities"),
    ("sklearn-like prefix", "sk-learn-pipeline-standard-scaler"),
    ("a JWT header alone", "eyJhbGciOiJIUzI1NiJ9"),
    ("40 characters of mixed case, no AWS key id near", "ResNet50ImageNetPretrainedWeightsV2Final"),
    ("plain flags", "fit.py --lr 0.1 --max-epochs 3 --data /data/digits"),
    ("a boolean flag before another", "fit.py --use-token-cache --lr 0.1"),
]


def test_every_shape_has_a_case() -> None:
    named = {name for name, _, _ in SHAPES}
    covered = {
        "PEM private key block": "PEM private key block (whole)",
        "Authorization header value": "Authorization: Bearer",
        "AWS access key id": "AWS access key id",
        "GitHub token": "GitHub token",
        "GitLab token": "GitLab token",
        "Hugging Face token": "Hugging Face token",
        "Slack token": "Slack bot token",
        "Slack webhook": "Slack webhook",
        "JWT": "JWT",
        "Stripe key": "Stripe secret key",
        "OpenAI / Anthropic key": "OpenAI project key",
        "Google API key": "Google API key",
        "PyPI token": "PyPI token",
        "npm token": "npm token",
        "Databricks token": "Databricks token",
        "SendGrid key": "SendGrid key",
        "Azure key": "Azure connection string",
        "SAS signature": "Azure SAS signature",
        "Bearer credential": "Bearer alone",
        "Basic credential": "Basic alone",
    }
    assert set(covered) == named
    cases = {c for c, _, _, _ in SHAPE_CASES}
    assert set(covered.values()) <= cases


@pytest.mark.parametrize(("case", "text", "gone", "kept"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_shape_is_redacted_in_text_and_under_a_neutral_key(case, text, gone, kept) -> None:
    out = redact_text(text)
    assert REDACTED in out, out
    for secret in gone:
        assert secret not in out, f"{case}: {secret!r} survived in {out!r}"
    for part in kept:
        assert part in out, f"{case}: {part!r} was lost from {out!r}"
    as_param = redact({"model": {"storage": text, "lr": 0.1}})
    assert as_param["model"]["lr"] == 0.1
    for secret in gone:
        assert secret not in as_param["model"]["storage"]


@pytest.mark.parametrize(("case", "value"), KEEP_CASES, ids=[c[0] for c in KEEP_CASES])
def test_value_that_is_not_a_secret_stays(case, value) -> None:
    assert redact_text(value) == value
    assert redact({"storage": value, "dataset_sha256": value}) == {"storage": value, "dataset_sha256": value}
    assert redact_argv(value.split()) == value.split()


def test_digests_stay_beside_an_aws_key_id() -> None:
    # an AWS key id turns on the 40-character secret key rule for the whole record: digests must still stay
    record = {"key_id": fake.aws_key_id(), "key": fake.aws_secret_key(), "dataset_sha256": SHA256, "git_commit": COMMIT}
    record["checksum"] = base64.b64encode(hashlib.sha256(b"w").digest()).decode()
    out = redact(record)
    assert out["key_id"] == REDACTED and out["key"] == REDACTED
    assert out["dataset_sha256"] == SHA256 and out["git_commit"] == COMMIT and out["checksum"] == record["checksum"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit.py", "--password", "pw1", "--lr", "0.1"], ["fit.py", "--password", REDACTED, "--lr", "0.1"]),
        (["fit.py", "--hf-token", "t1"], ["fit.py", "--hf-token", REDACTED]),
        (["fit.py", "--api-key", "k1", "--epochs", "3"], ["fit.py", "--api-key", REDACTED, "--epochs", "3"]),
        (["fit.py", "--api-key=k1"], ["fit.py", f"--api-key={REDACTED}"]),
        (["fit.py", "--db-password", "p"], ["fit.py", "--db-password", REDACTED]),
        (["fit.py", "--use-token", "--lr", "0.1"], ["fit.py", "--use-token", "--lr", "0.1"]),
        (["fit.py", "--tokenizer", "bpe"], ["fit.py", "--tokenizer", "bpe"]),
        (["fit.py", "--storage", fake.hf_token()], ["fit.py", "--storage", REDACTED]),
    ],
    ids=["password", "hf-token", "api-key", "api-key=", "db-password", "boolean flag", "tokenizer", "shape"],
)
def test_command_line(argv, expected) -> None:
    assert redact_argv(argv) == expected


def test_json_and_yaml_text_stay_parseable() -> None:
    text = json.dumps({"password": "p1", "header": "Authorization: Bearer " + fake.opaque_token(), "lr": 0.1})
    out = json.loads(redact_text(text))
    assert out == {"password": REDACTED, "header": "Authorization: Bearer " + REDACTED, "lr": 0.1}
    sa = json.loads(redact_text(fake.gcp_service_account_json()))
    assert sa["private_key_id"] == REDACTED and sa["client_email"].startswith("trainer@")


def test_model_card_free_text_is_redacted() -> None:
    card = model_card_markdown(
        "digits",
        run_id=uuid.UUID(int=7).hex,
        weights="final weights",
        intended_use=f"demo; pull the data with {fake.hf_token()}",
        limitations=None,
        metrics={"val/acc": 0.97},
        params={"dataset_sha256": SHA256},
        tags={"git_commit": COMMIT},
        extra={"Access": f"Authorization: Bearer {fake.opaque_token()}"},
        versions={"torch": "2.0"},
    )
    assert fake.hf_token() not in card and fake.opaque_token() not in card
    assert SHA256 in card and COMMIT in card and uuid.UUID(int=7).hex in card
