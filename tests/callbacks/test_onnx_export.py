"""ONNXExportCallback: real digits fits, a real SQLite store, real onnx/onnxruntime."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback, onnx_parity
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('onnx') / 'store.db'}"


@pytest.fixture
def tracking_uri(store) -> str:
    """One real SQLite store for the module (creating one costs seconds); each fit is its own run."""
    return store


def _fit(tracking_uri, callbacks, model=None, checkpoint=True, steps=8):
    pl.seed_everything(0)
    logger = MLflowCVLogger(experiment_name="onnx", tracking_uri=tracking_uri, flush_interval_s=0.5)
    cbs = [*callbacks, *([ModelCheckpoint(monitor="val/acc", mode="max", dirpath="ckpt")] if checkpoint else [])]
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=steps, limit_val_batches=2, logger=logger, callbacks=cbs,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=".",
        enable_checkpointing=checkpoint,
    )
    model = model or DigitsClassifier()
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, augment=False))
    assert logger.flush()
    return trainer, model, MlflowClient(tracking_uri).get_run(logger.run_id)


@pytest.mark.slow
def test_export_best_weights_parity_two_batch_sizes(tracking_uri):
    cb = ONNXExportCallback()
    trainer, model, run = _fit(tracking_uri, [cb])
    assert cb.status == "ok" and cb.onnx_path is not None and cb.onnx_path.is_file()
    assert run.data.tags["onnx.status"] == "ok"
    assert "best checkpoint" in run.data.tags["onnx.weights"] and "val/acc=" in run.data.tags["onnx.weights"]
    assert 0.0 <= run.data.metrics["onnx/max_abs_err"] <= 1e-4
    files = [f.path for f in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "onnx")]
    assert files == ["onnx/model.onnx"]

    # the file holds the best checkpoint's weights and a dynamic batch axis
    best = DigitsClassifier()
    best.load_state_dict(torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"])
    best.eval()
    import onnxruntime as ort

    # the logged artifact on its own (weights included, no side files) is what is checked
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="onnx/model.onnx", dst_path="dl",
                                                tracking_uri=tracking_uri)
    sess = ort.InferenceSession(logged, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"] and [o.name for o in sess.get_outputs()] == ["output"]
    x = DigitsDataModule(augment=False)
    x.setup()
    for b in (1, 4):
        imgs = torch.stack([x.val_set[i][0] for i in range(b)])
        got = sess.run(None, {"images": imgs.numpy()})[0]
        np.testing.assert_allclose(got, best(imgs).detach().numpy(), atol=1e-4)
    assert onnx_parity(logged, best, torch.randn(4, 1, 8, 8), (1, 4)) <= 1e-4


# an operator ONNX has no translation for, in both exporters
if hasattr(torch.library, "custom_op"):  # torch >= 2.4, which the torch.export-based exporter needs

    @torch.library.custom_op("lmc_onnx_test::no_onnx", mutates_args=())
    def _no_onnx(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @_no_onnx.register_fake
    def _(x):
        return torch.empty_like(x)

else:  # the same operator through the older torch.library API (torch 2.0 exports with TorchScript only)
    _lib = torch.library.Library("lmc_onnx_test", "DEF")
    _lib.define("no_onnx(Tensor x) -> Tensor")
    _lib.impl("no_onnx", lambda x: x.clone(), "CompositeExplicitAutograd")
    _no_onnx = torch.ops.lmc_onnx_test.no_onnx


def _exporting() -> bool:
    """Whether torch is tracing or exporting the module (``torch.compiler.is_exporting``: torch >= 2.3)."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return torch.jit.is_tracing() or bool(is_exporting and is_exporting())


class Unexportable(DigitsClassifier):
    def forward(self, x):
        return super().forward(_no_onnx(x))


class ExportsDifferently(DigitsClassifier):
    """Eager and exported graphs differ, so parity must fail."""

    def forward(self, x):
        out = super().forward(x)
        if _exporting():
            out = out + 1.0
        return out


def test_export_failure_warns_tags_and_fit_finishes(tracking_uri):
    cb = ONNXExportCallback()
    with pytest.warns(RuntimeWarning, match="ONNXExportCallback: export failed: .*The fit goes on"):
        trainer, _, run = _fit(tracking_uri, [cb], model=Unexportable(), steps=2)
    assert trainer.state.finished and trainer.current_epoch == 2
    assert cb.status == "failed_export" and cb.onnx_path is None
    assert run.data.tags["onnx.status"] == "failed_export"
    assert run.data.tags["onnx.error"].startswith("export failed:")
    assert "onnx/max_abs_err" not in run.data.metrics
    assert "val/acc" in run.data.metrics  # the fit's own results are all there


def test_parity_failure_warns_and_still_logs_file(tracking_uri):
    cb = ONNXExportCallback(dynamo=False)
    with pytest.warns(RuntimeWarning, match=r"onnxruntime differs from PyTorch by 1 > atol=0.0001 \(batches \[1, 4\]\)"):
        _, _, run = _fit(tracking_uri, [cb], model=ExportsDifferently(), checkpoint=False, steps=2)
    assert cb.status == "failed_parity"
    assert run.data.tags["onnx.status"] == "failed_parity"
    assert run.data.metrics["onnx/max_abs_err"] == pytest.approx(1.0, abs=1e-4)
    assert "final weights" in run.data.tags["onnx.weights"]
    assert [f.path for f in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "onnx")] == ["onnx/model.onnx"]


def test_also_torchscript_and_sample_shape(tracking_uri):
    cb = ONNXExportCallback(dynamo=False, also_torchscript=True, sample_shape=(1, 8, 8), dynamic_batch=False)
    _, _, run = _fit(tracking_uri, [cb], checkpoint=False, steps=2)
    assert cb.status == "ok"
    files = sorted(f.path for f in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "onnx"))
    assert files == ["onnx/model.onnx", "onnx/model.torchscript.pt"]
    ts = torch.jit.load(os.path.join(os.path.dirname(cb.onnx_path), "model.torchscript.pt"))
    assert ts(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"opset": 5}, r"`opset` must be an int in 7\.\.25, got 5"),
        ({"opset": "17"}, r"`opset` must be an int in 7\.\.25, got '17'"),
        ({"input_names": "images"}, r"`input_names` must be a non-empty sequence of non-empty strings.*got 'images'"),
        ({"input_names": ("a", "b")}, r"`input_names` must name exactly one input"),
        ({"output_names": ()}, r"`output_names` must be a non-empty sequence"),
        ({"sample_shape": (1, 0, 8)}, r"`sample_shape` must be None or the per-sample shape"),
        ({"atol": 0}, r"`atol` must be a number > 0, got 0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ONNXExportCallback(**kwargs)


def test_needs_mlflow_logger_before_training():
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[ONNXExportCallback()], enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="ONNXExportCallback needs an MLflowCVLogger"):
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
