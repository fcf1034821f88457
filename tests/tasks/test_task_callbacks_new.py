"""The three new tasks through the callbacks with a real Trainer and a real SQLite store: CVMetricsCallback's
scalars and fit-end artifacts, and PredictionGridCallback's panels."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mlflow_cv import tasks
from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
from lightning_mlflow_cv.callbacks.prediction_grid import PredictionGridCallback
from lightning_mlflow_cv.logger import MLflowCVLogger

S = 24  # image size


def _instances(i: int) -> tuple[dict, dict]:
    m = torch.zeros(2, S, S, dtype=torch.bool)
    m[0, 2:10, 3:12] = True
    m[1, 12 + i % 3 : 20, 10:22] = True
    boxes = torch.tensor([[3.0, 2, 12, 10], [10.0, 12 + i % 3, 22, 20]])
    t = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": m}
    p = {"boxes": boxes + 0.3, "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 2]), "masks": m.float()}
    return p, t


class TaskModel(pl.LightningModule):
    """forward maps images to the task's prediction format; validation_step returns the step-output dict."""

    def __init__(self, task: str):
        super().__init__()
        self.task = task
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        y = self.conv(x)[:, 0]  # (N, S, S)
        if self.task == "anomaly-detection":
            return {"scores": y.mean((1, 2)), "maps": y}
        if self.task == "depth-estimation":
            return y[:, None].abs() + 1.0
        return [_instances(i)[0] for i in range(x.shape[0])]

    def training_step(self, batch, _):
        return self.conv(batch[0]).mean() ** 2

    def validation_step(self, batch, _):
        x, y = batch
        out = self(x)
        if self.task == "anomaly-detection":
            return {"scores": out["scores"] + 3 * y.float(), "targets": y, "maps": out["maps"]}
        if self.task == "depth-estimation":
            return {"preds": out, "targets": y}
        return {"preds": out, "targets": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(task: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, S, S, generator=g)
    if task == "anomaly-detection":
        return TensorDataset(x, torch.tensor([0, 1] * 4)), None
    if task == "depth-estimation":
        y = torch.rand(8, 1, S, S, generator=g) + 1
        y[:, :, :4] = 0  # invalid
        return TensorDataset(x, y), None
    targets = [_instances(i)[1] for i in range(8)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return x[i], targets[i]

    return DS(), lambda b: (torch.stack([s[0] for s in b]), [s[1] for s in b])


def _walk(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _walk(client, run_id, f.path) if f.is_dir else [f.path]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "kwargs", "keys", "files"),
    [
        ("anomaly", {}, ["AUROC", "AUPRC", "F1_at_best_threshold", "best_threshold"], ["pr_curve.png", "roc_curve.png", "summary.json"]),
        ("depth", {}, ["AbsRel", "SqRel", "RMSE", "RMSE_log", "delta_1", "delta_2", "delta_3"], ["summary.json"]),
        ("instance", {"num_classes": 3}, ["mask_AP", "bbox_AP", "mask_AP50", "bbox_AP50"], ["per_class.json", "per_class.csv"]),
    ],
)
def test_new_tasks_log_metrics_artifacts_and_prediction_grid(task, kwargs, keys, files, tracking_uri, tmp_path):
    name = tasks.normalize_task(task)
    ds, collate = _data(name)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    logger = MLflowCVLogger(experiment_name="tasks", tracking_uri=tracking_uri, tags={"task": name})
    cbs = [CVMetricsCallback(task, stages=["val"], **kwargs), PredictionGridCallback(task, num_samples=3)]
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=cbs, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(TaskModel(name), loader, loader)
    logger.finalize("success")
    client = MlflowClient(tracking_uri)
    run = client.get_run(logger.run_id)
    for k in keys:
        assert np.isfinite(run.data.metrics[f"val/{k}"]), k
    arts = _walk(client, logger.run_id)
    for f in files:
        assert f"cv_metrics/val/{f}" in arts
    assert any(a.startswith("images/val~predictions") for a in arts)
    if name == "anomaly-detection":
        assert run.data.metrics["val/AUROC"] == 1.0  # the +3 shift separates the classes
        summary = json.loads(Path(client.download_artifacts(logger.run_id, "cv_metrics/val/summary.json", str(tmp_path))).read_text())
        assert summary["AUROC"] == 1.0 and summary["task"] == "anomaly-detection"
    if name == "instance-segmentation":
        assert run.data.metrics["val/mask_AP50"] == pytest.approx(1.0)
        table = json.loads(Path(client.download_artifacts(logger.run_id, "cv_metrics/val/per_class.json", str(tmp_path))).read_text())
        assert [r["class"] for r in table["classes"]] == ["1", "2"] and table["classes"][0]["mask_AP50"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# panels (pure functions)
# ----------------------------------------------------------------------------------------------
def _img() -> torch.Tensor:
    return torch.full((3, 48, 48), 128, dtype=torch.uint8)


def test_instance_panel_colours_each_instance_and_shows_truth_beside_prediction():
    p, t = _instances(0)
    p = dict(p, scores=torch.tensor([0.9, 0.2]))  # the second prediction is below the threshold
    out = tasks.check_model_outputs("instance", [p], [t], 1, "X")
    img = torch.full((3, 96, 96), 128, dtype=torch.uint8)  # display scale 4
    panel = tasks.get_task("instance").panel(img, (S, S), tasks.get_task("instance").to_cpu(out), 0, tasks.PanelOptions())
    left, right = panel[:, :96, :96], panel[:, :96, 98:194]
    # ground truth: two instances, two different colours; prediction: only the first (score >= 0.5)
    a, b = left[:, 36, 40], left[:, 76, 80]  # inside instance 0 and instance 1, clear of boxes and label text
    assert not torch.equal(a, b) and not torch.equal(a, img[:, 0, 0]) and not torch.equal(b, img[:, 0, 0])
    assert torch.equal(right[:, 36, 40], a) and torch.equal(right[:, 76, 80], img[:, 0, 0])


def test_anomaly_panel_heatmap_score_and_label():
    maps = torch.zeros(1, S, S)
    maps[0, :12] = 1.0  # top half anomalous
    out = tasks.check_model_outputs("anomaly", {"scores": torch.tensor([0.7]), "maps": maps}, torch.tensor([1]), 1, "X")
    panel = tasks.get_task("anomaly").panel(_img(), (S, S), out, 0, tasks.PanelOptions())
    heat = panel[:, :48, 50:98]
    assert not torch.equal(heat[:, 5, 5], heat[:, 40, 5])  # the map shows where
    assert panel.shape[1] > 48  # caption with score and label below
    no_map = tasks.get_task("anomaly").panel(_img(), (S, S), tasks.check_model_outputs("anomaly", torch.tensor([0.7]), [0], 1, "X"), 0, tasks.PanelOptions())
    assert no_map.shape[2] == 48


def test_depth_panel_shares_one_scale_and_blacks_out_invalid_pixels():
    t = torch.linspace(1, 5, S * S).reshape(1, 1, S, S)
    t[0, 0, :4] = 0.0
    out = tasks.check_model_outputs("depth", t.clone(), t, 1, "X")  # perfect prediction
    panel = tasks.get_task("depth").panel(_img(), (S, S), out, 0, tasks.PanelOptions())
    pred, target = panel[:, :48, 50:98], panel[:, :48, 100:148]
    assert torch.equal(pred[:, 20:], target[:, 20:])  # same colours for the same depth: one shared scale
    assert int(target[:, :8].max()) == 0  # invalid rows black


def test_grid_errors_name_the_part_and_the_new_formats():
    with pytest.raises(ValueError, match=r"^X: task='depth-estimation' expects targets as depth Tensor .*got Tensor\(2, 3\) int64.*batch_transform"):
        tasks.check_model_outputs("depth", torch.rand(2, 1, 4, 4), torch.zeros(2, 3, dtype=torch.long), 2, "X")
    with pytest.raises(ValueError, match=r"^X: task='instance-segmentation' expects model outputs as list of N dicts with .*'masks' \(K, H, W\).*output_transform"):
        tasks.check_model_outputs("instance", [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}], [], 1, "X")


def anomaly_fn(outputs, batch):
    """The shared mapping hook: (a (scores, maps) tuple, batch) -> the anomaly step-output dict."""
    return {"scores": outputs[0], "targets": batch[1], "maps": outputs[1]}


@pytest.mark.slow
def test_prediction_grid_takes_the_same_output_fn_hook_by_import_path(tracking_uri):
    ds, _ = _data("anomaly-detection")
    loader = DataLoader(ds, batch_size=4)
    logger = MLflowCVLogger(experiment_name="hook", tracking_uri=tracking_uri)
    hook = f"{__name__}:anomaly_fn"
    cbs = [CVMetricsCallback("anomaly", stages=["val"], output_fn=hook), PredictionGridCallback("anomaly", num_samples=2, output_fn=hook)]
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=cbs, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip

    class Plain(TaskModel):
        def forward(self, x):  # a tuple, which only the hook knows how to read
            out = super().forward(x)
            return out["scores"], out["maps"]

        def validation_step(self, batch, _):
            return self(batch[0])  # forward's output as is: the hook adds the targets

    trainer.fit(Plain("anomaly-detection"), loader, loader)
    logger.finalize("success")
    client = MlflowClient(tracking_uri)
    assert "val/AUROC" in client.get_run(logger.run_id).data.metrics
    assert any(a.startswith("images/val~predictions") for a in _walk(client, logger.run_id))
    with pytest.raises(ValueError, match=r"PredictionGridCallback: pass `output_fn` or `output_transform`, not both"):
        PredictionGridCallback("anomaly", output_fn=hook, output_transform=hook)
