"""Key naming rules (pure, no store): metrics as Lightning's MLFlowLogger names them, params/tags as MLflow accepts
them, and every result valid for MLflow's own validators. The store-level comparison with Lightning's logger is in
tests/test_parity.py."""

from __future__ import annotations

import pytest
from mlflow.utils.validation import _validate_metric_name, _validate_param_name

from lightning_mlflow_cv._facts.keys import MAX_KEY_LENGTH, metric_key, sanitize_key


def _mlflow_accepts(char: str) -> bool:
    try:
        _validate_param_name(f"a{char}b")
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.parametrize(
    ("key", "metric", "param"),
    [
        ("val/acc", "val/acc", "val/acc"),  # valid everywhere: unchanged
        ("x y-1.5_z", "x y-1.5_z", "x y-1.5_z"),
        ("[some_metric]", "some_metric", "some_metric"),  # Lightning's examples
        ("a@b", "ab", "ab"),
        # Lightning deletes ":" from metric keys; newer MLflow accepts it in params (off Windows), 2.4 does not
        ("val:acc", "valacc", "val:acc" if _mlflow_accepts(":") else "valacc"),
        ("é/acc", "acc", "é/acc"),  # \w in MLflow is Unicode; Lightning's metric rule is ASCII (then "/acc": repaired)
        ("a//b", "a/b", "a/b"),  # accepted by Lightning's rule, rejected by MLflow: repaired
        ("/lead/", "lead", "lead"),
        ("a/../b", "a/__/b", "a/__/b"),
        ("./x", "_/x", "_/x"),
        ("@@", "_", "_"),
        ("k" * 300, "k" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH),
    ],
)
def test_metric_and_param_key_rules(key, metric, param):
    assert metric_key(key) == metric
    assert sanitize_key(key) == param
    _validate_metric_name(metric_key(key))  # MLflow's own check: raises on an invalid key
    _validate_param_name(sanitize_key(key))
