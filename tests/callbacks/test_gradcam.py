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
from conftest import import_real
from torch.utils.data import DataLoader

from lightning_mlflow_cv.callbacks.gradcam import GradCAMCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger

import_real("captum", "captum")
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


@pytest.mark.slow
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


class Evidence(pl.LightningModule):
    """A model whose evidence is known by construction: two 1x1-conv feature maps copy the red and the green
    input channel, and class c's logit is the sum of feature map c. Grad-CAM on the feature maps is therefore
    exactly the red channel for class 0 and the green channel for class 1 (the other map gets weight 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[1, 1] = 1.0

    def forward(self, x):
        return self.features(x).sum((2, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay as constructed


def squares(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """Images with a red and a green square; the bigger one decides the class (0 red, 1 green).

    Returns images (n, 3, size, size), labels and, per image, the top-left corners (red y, x, green y, x)."""
    x = torch.zeros(n, 3, size, size)
    y = torch.zeros(n, dtype=torch.long)
    corners = []
    for i in range(n):
        big, small = 6, 3
        ry, rx = (1 + i) % 4, 1 + (i % 3)  # red in the top-left area
        gy, gx = 9 + (i % 3), 9 + (i * 2) % 4  # green in the bottom-right area
        rs, gs = (big, small) if i % 2 == 0 else (small, big)
        x[i, 0, ry : ry + rs, rx : rx + rs] = 1.0
        x[i, 1, gy : gy + gs, gx : gx + gs] = 1.0
        y[i] = 0 if rs > gs else 1
        corners.append((ry, rx, gy, gx, rs, gs))
    return x, y, corners


def independent_gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM from its definition (Selvaraju et al.), with autograd only: ReLU(sum_k mean(dy_c/dA_k) A_k)."""
    acts = model.features(x)
    logits = acts.sum((2, 3))
    grads = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), acts)[0]
    return (grads.mean((2, 3), keepdim=True) * acts).sum(1).clamp_min(0).detach()


@pytest.mark.slow
def test_logged_heatmap_is_grad_cam_of_the_evidence_region(tracking_uri, tmp_path):
    import matplotlib

    x, y, corners = squares()
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    cb = GradCAMCallback("features.1", num_samples=len(x), alpha=1.0)  # every image: both classes, any seed
    logger = MLflowCVLogger(experiment_name="gradcam-evidence", tracking_uri=tracking_uri)
    model = Evidence()
    trainer = pl.Trainer(
        max_epochs=1, logger=logger, callbacks=[cb], num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, loader, loader)
    assert logger.flush()
    (grid,) = images(tracking_uri, logger.run_id, "gradcam/features.1", tmp_path).values()
    arr = np.asarray(grid.convert("RGB")).astype(int)
    idx = cb.indices
    assert sorted(idx) == list(range(len(x)))
    with torch.no_grad():
        assert model(x[idx]).argmax(1).tolist() == y[idx].tolist()  # right predictions: no red frame
    cams = independent_gradcam(model, x[idx], y[idx])  # the predicted (= true) class
    panel_w, panel_h, display = 2 * 96 + 2, 96 + 34, 96  # image | overlay (16 px enlarged 6x), two caption lines
    assert arr.shape[:2] == (4 + 3 * (panel_h + 4), 4 + 3 * (panel_w + 4))  # 8 panels, 3 per row
    for j, i in enumerate(idx):
        top, left = 4 + (j // 3) * (panel_h + 4), 4 + (j % 3) * (panel_w + 4) + display + 2
        overlay = arr[top : top + display, left : left + display]
        # expected overlay: the independent map, scaled to [0, 1], enlarged bilinearly, through the jet colormap
        cam = cams[j] / cams[j].max()
        big = nn.functional.interpolate(cam[None, None], size=(display, display), mode="bilinear")[0, 0].clamp(0, 1)
        expected = np.round(matplotlib.colormaps["jet"](big.numpy())[..., :3] * 255).astype(int)
        assert np.abs(overlay - expected).max() <= 2, f"sample {i}: logged heat map differs from Grad-CAM"
        # and by construction: hot on the evidence square, cold on the other one
        ry, rx, gy, gx, rs, gs = corners[i]
        (ey, ex, es), (oy, ox, os_) = ((ry, rx, rs), (gy, gx, gs)) if y[i] == 0 else ((gy, gx, gs), (ry, rx, rs))
        hot = overlay[6 * ey + 6 * es // 2, 6 * ex + 6 * es // 2]
        cold = overlay[6 * oy + 6 * os_ // 2, 6 * ox + 6 * os_ // 2]
        assert tuple(hot) == (128, 0, 0) and tuple(cold) == (0, 0, 128), (i, hot, cold)


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
