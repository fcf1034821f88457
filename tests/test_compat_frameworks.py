"""The torch / Lightning / torchmetrics differences (lightning_mlflow_cv._compat.frameworks): each path gives the
newest releases' result, whichever release is installed."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import skip_needs_newer

from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv.metrics.plots import curve_figure


@pytest.mark.parametrize("native", [True, False])
def test_pr_curves_are_named_after_the_classes(monkeypatch, native):
    if native and not _compat_frameworks.plot_curve_takes_labels():
        skip_needs_newer("torchmetrics", "1.4", "plot_curve(labels=) names the curves itself")
    monkeypatch.setattr(_compat_frameworks, "plot_curve_takes_labels", lambda: native)
    x = [torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0])]
    y = [torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.0])]
    fig = curve_figure((x, y, None), torch.tensor([0.75, 0.5]), ("Recall", "Precision"), "PR", ["cat", "dog"], "best")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["cat AUC=0.750", "dog AUC=0.500"], texts


def test_seed_everything_seeds_and_logs_no_seed_line(caplog):
    with caplog.at_level(logging.INFO):
        assert _compat_frameworks.seed_everything(123) == 123
        a = torch.rand(3)
        _compat_frameworks.seed_everything(123)
        assert torch.equal(a, torch.rand(3))
    assert not [r for r in caplog.records if "Seed set" in r.getMessage()]


def test_load_checkpoint_reads_weights_only(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"callbacks": {"MLflowCVLogger": {"run_id": "abc"}}, "w": torch.ones(2)}, path)
    ckpt = _compat_frameworks.load_checkpoint(path)
    assert ckpt["callbacks"]["MLflowCVLogger"]["run_id"] == "abc" and torch.equal(ckpt["w"], torch.ones(2))
