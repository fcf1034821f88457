"""The model card (``MODEL_CARD.md``) of a registered model: pure text built from the run's records.

Used by :class:`~lightning_mlflow_cv.callbacks.model_registry.ModelRegistryCallback`, which logs the card as a run
artifact, bundles it with the model and sets it as the version description.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv.environment import framework_versions

#: Sections of ``model_card=`` with a fixed place in the card; any other key becomes an extra section.
CARD_KEYS = ("intended_use", "limitations")


def card_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a model card lists: one row per quantity (``train/acc``, not also ``train/acc_step`` and
    ``train/acc_epoch``), no ``system/*`` figures and no ``epoch`` counter.

    Example::

        >>> card_metrics({"train/acc": 0.9, "train/acc_step": 0.8, "train/acc_epoch": 0.9, "epoch": 3.0,
        ...               "val/acc": 0.95, "system/cpu_utilization_percentage": 50.0})
        {'train/acc': 0.9, 'val/acc': 0.95}
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k == "epoch" or k.startswith("system/") or k.endswith("_step"):
            continue
        if k.endswith("_epoch") and k[: -len("_epoch")] in metrics:
            continue
        out[k[: -len("_epoch")] if k.endswith("_epoch") else k] = v
    return out


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    """Markdown table lines of :func:`card_metrics`, sorted by name."""
    shown = card_metrics(metrics)
    return ["| metric | value |", "|---|---|"] + [f"| `{k}` | {float(shown[k]):.6g} |" for k in sorted(shown)]


def dataset_rows(run: Any) -> list[tuple[str, str, str]]:
    """``(name, digest, context)`` of each dataset input of an MLflow ``Run``."""
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return [
        (d.dataset.name, d.dataset.digest, next((t.value for t in d.tags if t.key == "mlflow.data.context"), ""))
        for d in inputs
    ]


def serving_contract(cfg: Mapping[str, Any], output: str, network_file: str) -> dict[str, Any]:
    """The card's "Input and output" rows, from the pyfunc's config (``preprocess.json``).

    Example::

        >>> serving_contract({"layout": "NHWC", "channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.25],
        ...                   "class_names": ["cat", "dog"]}, "softmax", "network.pt2")["output"]
        'softmax: a DataFrame with one float32 probability column per class (cat, dog)'
    """
    shape = "(N, H, W, C)" if cfg["layout"] == "NHWC" else "(N, C, H, W)"
    names = cfg.get("class_names")
    if output in ("softmax", "sigmoid"):
        columns = ", ".join(names) if names else "class ids 0, 1, ..."
        output = f"{output}: a DataFrame with one float32 probability column per class ({columns})"
    return {
        "input": f"uint8 {cfg['layout']} images {shape}, C={cfg['channels']}, any H, W (resized to {tuple(cfg['size'])})",
        "preprocess": f"resize, /255, (x - {cfg['mean']}) / {cfg['std']}",
        "output": output,
        "classes": list(names) if names else "unnamed",
        "network": network_file,
    }


def model_card_markdown(
    model_name: str,
    *,
    run_id: str,
    weights: str,
    intended_use: str | None,
    limitations: str | None,
    metrics: Mapping[str, float],
    params: Mapping[str, str],
    tags: Mapping[str, str],
    datasets: Sequence[tuple[str, str, str]] = (),
    io: Mapping[str, Any] | None = None,
    extra: Mapping[str, str] | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The ``MODEL_CARD.md`` text (pure: everything comes in as arguments), secrets redacted (the user's own
    sections are free text).

    Args:
        model_name: Registered model name.
        run_id: The training run.
        weights: Where the shipped weights came from.
        intended_use: What the model is for (``None``: says it was not stated).
        limitations: Known limitations (``None``: says they were not stated).
        metrics: The run's final metric values.
        params: The run's params; those whose key contains ``sha256`` or ``dataset`` are listed as lineage.
        tags: The run's tags (``hardware``, ``git_commit``, ``latency.device`` are shown).
        datasets: ``(name, digest, context)`` of the run's dataset inputs.
        io: The serving input/output contract (see :func:`serving_contract`).
        extra: More sections, ``{title: text}``.
        versions: Package versions (default: the installed ones).

    Example::

        text = model_card_markdown("digits", run_id="abc", weights="final weights", intended_use="demo",
                                   limitations="8x8 digits only", metrics={"val/acc": 0.97}, params={}, tags={})
    """
    not_stated = "_Not stated. Pass `model_card={{'{}': '...'}}` to ModelRegistryCallback._"
    lines = [
        f"# Model card: {model_name}",
        "",
        f"- Training run: `{run_id}`",
        f"- Weights: {weights}",
        f"- Git commit: `{tags.get('git_commit', 'unknown')}`",
        "",
        "## Intended use",
        "",
        intended_use or not_stated.format("intended_use"),
        "",
        "## Limitations",
        "",
        limitations or not_stated.format("limitations"),
        "",
        "## Training data",
        "",
    ]
    lineage = [(k, v) for k, v in sorted(params.items()) if "sha256" in k.lower() or "dataset" in k.lower()]
    if not datasets and not lineage:
        lines.append("_No dataset lineage recorded (add DatasetLineageCallback)._")
    for name, digest, ctx in datasets:
        lines.append(f"- dataset `{name}` ({ctx or 'unknown context'}), digest `{digest}`")
    for k, v in lineage:
        lines.append(f"- `{k}`: `{v}`")
    lines += ["", "## Metrics", ""]
    lines += metrics_table(metrics)
    if io:
        lines += ["", "## Input and output", ""]
        lines += [f"- {k}: `{v}`" for k, v in io.items()]
    lines += [
        "",
        "## Hardware",
        "",
        f"- Training: {tags.get('hardware', 'unknown')}",
        f"- Latency measured on: {tags.get('latency.device', 'not measured')}",
        f"- Host: {platform.platform()}",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in (versions or framework_versions()).items()]
    for title, text in (extra or {}).items():
        lines += ["", f"## {title}", "", str(text)]
    return redact_text("\n".join(lines) + "\n")
