"""The new tasks' servable models: ModelRegistryCallback(task=...) logs a pyfunc whose post-processing is the
task's (instances, anomaly score and map, depth map), with a signature and input example; gates on the task's
metric names; evaluate() reads the task's served metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._shipping import pyfunc as _pyfunc
from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback

S, K = 16, 3


class Net(pl.LightningModule):
    """Tiny export-friendly networks: anomaly (score, map), depth (N, 1, H, W), instances (fixed-K tuple)."""

    def __init__(self, task: str):
        super().__init__()
        self.task = task
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.task == "anomaly-detection":
            m = y[:, 0].abs()
            return m.flatten(1).amax(1), m
        if self.task == "depth-estimation":
            return y.abs() + 0.5
        n = x.shape[0]
        scores = torch.sigmoid(y.mean((1, 2, 3)))[:, None].expand(n, K) * torch.tensor([1.0, 0.9, 0.1])
        boxes = torch.tensor([[1.0, 1, 8, 8], [6.0, 6, 15, 15], [0.0, 0, 4, 4]]).expand(n, K, 4)
        labels = torch.tensor([1, 2, 1]).expand(n, K)
        masks = torch.sigmoid(y).expand(n, K, S, S)
        return boxes, scores, labels, masks

    def training_step(self, batch, _):
        return self.conv(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        x, y = batch
        if self.task == "anomaly-detection":
            s, _maps = self(x)
            return {"scores": s + y.float(), "targets": y}
        if self.task == "depth-estimation":
            return {"preds": self(x), "targets": y}
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(task):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, S, S, generator=g)
    y = torch.tensor([0, 1] * 4) if task == "anomaly-detection" else torch.rand(8, 1, S, S, generator=g) + 0.5
    return DataLoader(TensorDataset(x, y), batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "gate"),
    [("anomaly", {"val/AUROC": ">=0.99"}), ("depth", {"val/AbsRel": "<=100"}), ("instance", None)],
)
def test_served_post_processing_per_task(task, gate, tracking_uri, monkeypatch):
    from lightning_mlflow_cv.tasks import normalize_task

    name = normalize_task(task)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    reg = ModelRegistryCallback(f"m-{task}", preprocess={"mean": [0.5], "std": [0.25]}, gates=gate, task=task)
    assert reg.postprocess == {"anomaly": "anomaly", "depth": "depth", "instance": "instances"}[task]
    cbs = [reg] + ([CVMetricsCallback(task, stages=["val"])] if task != "instance" else [])
    logger = MLflowCVLogger(experiment_name="serve", tracking_uri=tracking_uri)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=cbs, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=2 if task != "instance" else 0, default_root_dir=".")  # fmt: skip
    trainer.fit(Net(name), _loader(name), _loader(name))
    assert reg.version == "1", trainer.logger.experiment.get_run(logger.run_id).data.tags.get("registry.error")
    if gate:
        assert reg.decision.promoted, reg.decision
    served = mlflow.pyfunc.load_model(f"models:/m-{task}/1")
    raw = (np.random.default_rng(0).random((2, S, S, 3)) * 255).astype(np.uint8)
    out = served.predict(raw)
    if name == "anomaly-detection":
        assert set(out) == {"scores", "maps"} and out["scores"].shape == (2,) and out["maps"].shape == (2, S, S)
        np.testing.assert_allclose(out["scores"], out["maps"].reshape(2, -1).max(1), rtol=1e-6)
        schema = served.metadata.get_output_schema()
        assert [s.name for s in schema.inputs] == ["scores", "maps"]
    elif name == "depth-estimation":
        assert out.shape == (2, S, S) and out.dtype == np.float32 and (out >= 0.5).all()
    else:
        assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels", "masks"}
        assert out[0]["masks"].dtype == bool and out[0]["masks"].shape[1:] == (S, S)
        assert (out[0]["scores"] >= 0.5).all() and len(out[0]["scores"]) <= 2  # the 0.1-scaled candidate dropped
    assert served.metadata.get_input_schema().inputs[0].type == np.dtype("uint8")
    mlflow.set_tracking_uri(None)


def test_pyfunc_post_processing_of_the_network_forms():
    maps = torch.rand(2, 1, 5, 5)
    a = _pyfunc.postprocess(maps, "anomaly")
    np.testing.assert_allclose(a["scores"], maps.flatten(1).amax(1).numpy())
    assert _pyfunc.postprocess(torch.tensor([0.3, 0.9]), "anomaly")["scores"].tolist() == pytest.approx([0.3, 0.9])
    assert _pyfunc.postprocess({"scores": torch.tensor([0.5]), "maps": torch.zeros(1, 4, 4)}, "anomaly")["maps"].shape == (1, 4, 4)
    assert _pyfunc.postprocess(torch.ones(3, 1, 4, 6), "depth").shape == (3, 4, 6)
    mrcnn = [{"boxes": torch.tensor([[0.0, 0, 2, 2], [1.0, 1, 3, 3]]), "scores": torch.tensor([0.4, 0.8]),
              "labels": torch.tensor([1, 2]), "masks": torch.tensor([0.2, 0.7]).view(2, 1, 1, 1).expand(2, 1, 4, 4)}]  # fmt: skip
    inst = _pyfunc.postprocess(mrcnn, "instances", {"score_threshold": 0.3})
    assert inst[0]["scores"].tolist() == pytest.approx([0.8, 0.4])  # sorted by score
    assert inst[0]["labels"].tolist() == [2, 1] and inst[0]["masks"][0].all() and not inst[0]["masks"][1].any()
