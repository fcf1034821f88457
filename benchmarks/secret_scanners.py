"""Secret scanners compared on what this package logs: false positives on real values, recall on credential shapes
and the cost per logged value (issue 33).

Scanners:

- ``ours``: :func:`lightning_mlflow_cv._facts.redact.redact_text` (curated shapes + names);
- ``ours-shapes-only``: :func:`lightning_mlflow_cv._facts.redact.redact_shapes` (the shapes alone);
- ``ds-default``: detect-secrets' ``scan_line`` with its default settings (every plugin, including the
  high-entropy detectors and its heuristic filters); a value is redacted by removing each reported secret;
- ``ds-no-entropy``: the same without ``Base64HighEntropyString`` and ``HexHighEntropyString``.

Negatives (must stay as they are), all real or shaped like real ones: every line of this environment's
``requirements.txt`` and every leaf of ``system.json``; the params a real fit logs (Trainer, optimizer, scheduler,
dataloader and the digits datamodule's transform, read from live objects); torchvision's model names; paths and
URIs; dataset digests (SHA-256 of this package's files), git commits of this repository, run ids (uuid4 hex),
model checksums (md5, sha1, ``sha256:``, base64 SHA-256), and every line of this package's source as free text.
Positives: each shape of ``tests/fake_secrets.py``, alone and under a neutral key.

detect-secrets is not a dependency of the package; to rerun::

    pip install --no-deps --target /tmp/ds-lib detect-secrets   # any scratch place
    python benchmarks/secret_scanners.py --detect-secrets-path /tmp/ds-lib

Prints a table of false positives (values changed), recall and microseconds per value (median of 5 passes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def negatives() -> dict[str, list[str]]:
    """Values that must stay as they are, by category."""
    import lightning.pytorch as pl
    import torch
    import torchvision

    from lightning_mlflow_cv._facts.keys import flatten
    from lightning_mlflow_cv.demos.digits import DigitsDataModule
    from lightning_mlflow_cv.environment import requirements_txt, system_info
    from lightning_mlflow_cv.hyperparameters import optimizer_params, scheduler_params, trainer_params, transform_params

    out: dict[str, list[str]] = {}
    out["requirements.txt lines"] = requirements_txt().splitlines()
    out["system.json leaves"] = [str(v) for v in flatten(system_info()).values()]
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=1000)

    class _Cfg:  # what Trainer.lr_scheduler_configs holds
        scheduler, interval, frequency, monitor = sched, "step", 1, None

    trainer = pl.Trainer(max_epochs=30, precision="bf16-mixed", accelerator="cpu", logger=False)
    params = {**optimizer_params([opt]), **scheduler_params([_Cfg()]), **trainer_params(trainer)}
    params.update(transform_params(DigitsDataModule(augment=True).train_transform, "augment"))
    out["fit params (live objects)"] = [str(v) for v in params.values()]
    out["torchvision model names"] = list(torchvision.models.list_models())
    out["paths and URIs"] = [
        "/data/imagenet/train",
        "s3://team-data/datasets/coco/annotations/instances_train2017.json",
        "gs://vision-bucket/checkpoints/epoch=12-step=4800.ckpt",
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "runs:/0a1b2c3d4e5f67890a1b2c3d4e5f6789/model",
        "models:/digits-classifier@champion",
        "hf://datasets/ylecun/mnist/train-00000-of-00001.parquet",
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "lightning_mlflow_cv.callbacks.ModelRegistryCallback",
        "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
        "postgresql+psycopg2://mlflow@db.internal:5432/mlflow",
        "file:///home/alice/mlruns",
    ]
    files = sorted((REPO / "lightning_mlflow_cv").rglob("*.py"))
    commits = subprocess.run(
        ["git", "rev-list", "--max-count=200", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.split()
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    digests += [hashlib.md5(f.read_bytes()).hexdigest() for f in files[:50]]  # noqa: S324 - checksums, not security
    digests += ["sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() for f in files[:50]]
    digests += [base64.b64encode(hashlib.sha256(f.read_bytes()).digest()).decode() for f in files[:50]]
    digests += [hashlib.sha1(f.read_bytes()).hexdigest() for f in files[:50]]  # noqa: S324
    out["digests, commits, run ids"] = digests + commits + [uuid.uuid4().hex for _ in range(100)]
    out["package source lines (free text)"] = [
        line.strip() for f in files for line in f.read_text().splitlines() if line.strip()
    ]
    return out


def positives() -> dict[str, str]:
    import fake_secrets as fake

    shapes = {
        "AWS access key id": fake.aws_key_id(),
        "GitHub token": fake.github_token(),
        "GitHub fine-grained token": fake.github_fine_grained(),
        "GitLab token": fake.gitlab_token(),
        "Hugging Face token": fake.hf_token(),
        "Slack bot token": fake.slack_bot_token(),
        "JWT": fake.jwt(),
        "Stripe secret key": fake.stripe_secret_key(),
        "OpenAI project key": fake.openai_key(),
        "OpenAI legacy key": fake.openai_legacy_key(),
        "Google API key": fake.google_api_key(),
        "PyPI token": fake.pypi_token(),
        "Azure AccountKey": fake.azure_connection_string(),
        "PEM private key": fake.pem_private_key(),
        "GCP service account": fake.gcp_service_account_json(),
        "Authorization: Bearer": "Authorization: Bearer " + fake.opaque_token(),
        "Basic credential": "Basic " + fake.basic_auth_value(),
    }
    return shapes


def _secret_parts(value: str) -> list[str]:
    """The parts of a planted value that must not survive (the credential, not its label)."""
    import fake_secrets as fake

    if value.startswith("DefaultEndpoints"):
        return [fake.azure_account_key()]
    if "PRIVATE KEY" in value and not value.startswith("{"):
        return fake.pem_body().splitlines()
    if value.startswith("{"):
        return fake.pem_body(17).splitlines()
    return [value.split()[-1]]


def ours() -> Callable[[str], str]:
    from lightning_mlflow_cv._facts.redact import redact_text

    return redact_text


@contextlib.contextmanager
def detect_secrets_scanner(entropy: bool) -> Iterator[Callable[[str], str]]:
    """detect-secrets' ad hoc ``scan_line`` under its default settings (its settings are process-global: one
    scanner at a time)."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import default_settings, get_plugins

    with default_settings() as settings:
        if not entropy:
            settings.disable_plugins("Base64HighEntropyString", "HexHighEntropyString")
            get_plugins.cache_clear()

        by_type = {p.secret_type: p for p in get_plugins()}

        def scan(text: str) -> str:
            for line in text.splitlines() or [text]:
                for s in scan_line(line):
                    plugin = by_type.get(s.type)
                    # ad hoc scanning reports every unquoted string an entropy plugin sees, whatever its entropy
                    # (its CLI prints "False (2.3)" for those): a redactor keeps only those over the plugin's limit
                    if hasattr(plugin, "entropy_limit") and s.secret_value:
                        if plugin.calculate_shannon_entropy(s.secret_value) <= plugin.entropy_limit:
                            continue
                    if s.secret_value:
                        text = text.replace(s.secret_value, "***REDACTED***")
            return text

        yield scan
    get_plugins.cache_clear()


def per_value_us(fn: Callable[[str], str], values: list[str], passes: int = 5) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        for v in values:
            fn(v)
        times.append((time.perf_counter() - t) / len(values) * 1e6)
    return statistics.median(times)


def evaluate(fn: Callable[[str], str], neg: dict[str, list[str]], pos: dict[str, str]) -> dict[str, Any]:
    """False positives by category (with examples), shapes caught, and the cost per value."""
    fp = {cat: [v for v in values if fn(v) != v] for cat, values in neg.items()}
    caught = {
        shape: all(all(p not in fn(v) for p in _secret_parts(value)) for v in (value, f"storage = {value}"))
        for shape, value in pos.items()
    }
    short = neg["fit params (live objects)"] + neg["torchvision model names"] + neg["digests, commits, run ids"]
    cost = {
        "us per param value": per_value_us(fn, short),
        "us per requirements.txt line": per_value_us(fn, neg["requirements.txt lines"]),
        "us per source line": per_value_us(fn, neg["package source lines (free text)"][:2000], passes=3),
    }
    return {"fp": fp, "caught": caught, "cost": cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detect-secrets-path", help="a folder holding detect_secrets (appended to sys.path)")
    args = ap.parse_args()
    if args.detect_secrets_path:
        sys.path.append(args.detect_secrets_path)
    neg, pos = negatives(), positives()
    from lightning_mlflow_cv._facts.redact import redact_shapes

    results = {"ours": evaluate(ours(), neg, pos), "ours-shapes-only": evaluate(redact_shapes, neg, pos)}
    try:
        for name, entropy in (("ds-default", True), ("ds-no-entropy", False)):
            with detect_secrets_scanner(entropy) as fn:
                results[name] = evaluate(fn, neg, pos)
    except ImportError:
        print("detect-secrets not importable: only `ours` is measured (see --detect-secrets-path)")
    names = list(results)
    print(
        f"\nnegatives: {sum(map(len, neg.values()))} values; positives: {len(pos)} shapes, alone and as `key = value`"
    )
    print("\n| values that must stay | n | " + " | ".join(f"{s}: changed" for s in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for cat, values in neg.items():
        print(f"| {cat} | {len(values)} | " + " | ".join(str(len(results[s]["fp"][cat])) for s in names) + " |")
    print("\n| shape caught | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for shape in pos:
        print(f"| {shape} | " + " | ".join("yes" if results[s]["caught"][shape] else "**no**" for s in names) + " |")
    print("| total | " + " | ".join(f"{sum(results[s]['caught'].values())}/{len(pos)}" for s in names) + " |")
    print("\n| cost | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for what in results["ours"]["cost"]:
        print(f"| {what} | " + " | ".join(f"{results[s]['cost'][what]:.1f}" for s in names) + " |")
    for s in names:
        print(f"\nchanged by {s}:")
        for cat, values in results[s]["fp"].items():
            for v in values[:12]:
                print(f"    [{cat}] {v[:150]}")


if __name__ == "__main__":
    main()
