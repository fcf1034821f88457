"""GradCAMCallback (captum) with a real Trainer and a real SQLite store."""

from __future__ import annotations

import re
import sys

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lightning_mlflow_cv.callbacks.gradcam import GradCAMCallback
from lightning_mlflow_cv.demo import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger

pytest.importorskip("captum")
STEP = re.compile(r"\+step\+(\d+)\+")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"


@pytest.fixture(scope="module")
def loaders():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return DataLoader(dm.train_set, batch_size=32, shuffle=True), DataLoader(dm.val_set, batch_size=64)


def fit(store, callbacks, loaders, max_epochs=2, model=None):
    model = model or DigitsClassifier(width=4)
    logger = MLflowCVLogger(experiment_name="gradcam", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=max_epochs, logger=logger, callbacks=callbacks, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, *loaders)
    assert logger.flush()
    return trainer, logger, model


def images(store, run_id, prefix, dst) -> dict[int, Image.Image]:
    client = mlflow.MlflowClient(store)
    out = {}
    for f in client.list_artifacts(run_id, "images"):
        name = f.path.split("/")[-1]
        if name.startswith(prefix.replace("/", "~") + "+") and name.endswith(".png"):
            out[int(STEP.search(name).group(1))] = Image.open(client.download_artifacts(run_id, f.path, str(dst)))
    return out


def test_once_at_fit_end(store, loaders, tmp_path):
    grads = []

    class GradSpy(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            if not grads:  # plant known .grad values before the callback runs
                for p in pl_module.parameters():
                    p.grad = torch.full_like(p, 0.5)
            grads.append([p.grad.clone() for p in pl_module.parameters()])

    cb = GradCAMCallback("features.3", num_samples=4)
    trainer, logger, model = fit(store, [GradSpy(), cb, GradSpy()], loaders, max_epochs=2)
    got = images(store, logger.run_id, "gradcam/features.3", tmp_path)
    assert sorted(got) == [1]  # once, at the last epoch
    panel_w, panel_h = 2 * 96 + 2, 96 + 34  # image | overlay, two caption lines
    assert got[1].size == (2 * panel_w + 12, 2 * panel_h + 12)
    assert model.training
    before, after = grads
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # .grad untouched by Grad-CAM
    # the overlay half differs from the plain image half (the heat map is drawn), the image half is grey
    arr = np.asarray(got[1].convert("RGB")).astype(int)
    plain, overlay = arr[4:100, 4:100], arr[4:100, 102:198]
    assert (np.ptp(plain, axis=-1) == 0).all() or (plain[0, 0] == (230, 30, 30)).all()
    assert (np.ptp(overlay, axis=-1) > 20).mean() > 0.5


def test_every_n_epochs_and_true_target(store, loaders, tmp_path):
    cb = GradCAMCallback("features.0", num_samples=2, every_n_epochs=1, target="true", key="cam")
    _, logger, _ = fit(store, [cb], loaders, max_epochs=2)
    assert sorted(images(store, logger.run_id, "cam", tmp_path)) == [0, 1]


def test_overlay_follows_captum(loaders):
    """The callback's heat map peak is where captum's LayerGradCam (called directly) puts it."""
    from captum.attr import LayerGradCam

    from lightning_mlflow_cv import _grid

    torch.manual_seed(0)
    model = DigitsClassifier(width=4).eval()
    x, y = next(iter(loaders[1]))
    x, y = x[:1], y[:1]
    cam = LayerGradCam(model, model.features[3]).attribute(x, target=int(model(x).argmax()), relu_attributions=True)
    cam = cam[0].sum(0)
    if cam.max() <= 0:
        pytest.skip("degenerate map for this random init")
    img = torch.zeros(3, 96, 96, dtype=torch.uint8)
    overlay = _grid.heatmap_overlay(img, cam, alpha=1.0)
    peak = np.unravel_index(int(cam.argmax()), tuple(cam.shape))
    cy, cx = int(peak[0] * 96 / cam.shape[0] + 96 / cam.shape[0] / 2), int(peak[1] * 96 / cam.shape[1] + 96 / cam.shape[1] / 2)
    assert overlay[0, cy, cx] > 100  # red end of the jet colormap at the captum peak


def test_wrong_layer_fails_at_setup_with_close_matches(store, loaders):
    cb = GradCAMCallback("feature.3", num_samples=2)
    with pytest.raises(ValueError, match=r"GradCAMCallback: `target_layer`='feature\.3' is not a submodule of DigitsClassifier\. Close matches: \['features\.3'"):
        trainer, _, _ = fit(store, [cb], loaders)


def test_non_classification_output_fails(store, loaders):
    class Seg(DigitsClassifier):
        def forward(self, x):
            return self.features[0](x)  # (N, C, H, W)

        def _step(self, batch, stage):
            x, y = batch
            return {"loss": nn.functional.cross_entropy(DigitsClassifier.forward(self, x), y)}

    cb = GradCAMCallback("features.0", num_samples=2, every_n_epochs=1)
    with pytest.raises(ValueError, match=r"GradCAMCallback: task='classification' expects model outputs as logits Tensor \(N, C\).*got Tensor\(2, 4, 8, 8\)"):
        fit(store, [cb], loaders, max_epochs=1, model=Seg(width=4))


def test_output_transform(store, loaders, tmp_path):
    class DictOut(DigitsClassifier):
        def forward(self, x):
            return {"logits": super().forward(x)}

        def _step(self, batch, stage):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x)["logits"], y)
            return {"loss": loss}

    cb = GradCAMCallback("features.3", num_samples=2, output_transform=lambda out: out["logits"])
    _, logger, _ = fit(store, [cb], loaders, max_epochs=1, model=DictOut(width=4))
    assert sorted(images(store, logger.run_id, "gradcam/features.3", tmp_path)) == [0]


def test_missing_captum_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r'GradCAMCallback needs the optional dependency captum.*pip install "lightning-mlflow-cv\[captum\]"'):
        GradCAMCallback("features.3")


def test_needs_mlflow_cv_logger(loaders):
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[GradCAMCallback("features.3")], enable_progress_bar=False)
    with pytest.raises(RuntimeError, match=r"GradCAMCallback needs an MLflowCVLogger"):
        trainer.fit(DigitsClassifier(width=4), *loaders)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_layer": ""}, r"`target_layer` must be a dotted module path \(str\), got ''"),
        ({"target_layer": 3}, r"`target_layer` must be a dotted module path \(str\), got 3"),
        ({"num_samples": 0}, r"`num_samples` must be an int >= 1, got 0"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be an int >= 1 or None, got 0"),
        ({"target": "label"}, r"`target` must be 'predicted' or 'true', got 'label'"),
        ({"alpha": 0}, r"`alpha` must be a number in \(0, 1\], got 0"),
        ({"mean": 0.5}, r"pass both `mean` and `std` or neither"),
        ({"key": ""}, r"`key` must be a non-empty string or None"),
        ({"output_transform": "os.path:nope"}, r"`output_transform`='os.path:nope': module 'os.path' has no attribute 'nope'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = {"target_layer": "features.3", **kwargs}
    with pytest.raises(ValueError, match=r"^GradCAMCallback: " + match):
        GradCAMCallback(**kwargs)
