"""PredictionGridCallback with a real Trainer and a real SQLite store, for the three tasks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mlflow_cv.callbacks.prediction_grid import PredictionGridCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger

STEP = re.compile(r"\+step\+(\d+)\+")


# ------------------------------------------------------------------------------------------------
# tiny tasks: generated shapes, tiny models
# ------------------------------------------------------------------------------------------------
class Shapes(Dataset):
    """A bright square on a dark 3xSxS image; detection targets (box, label) or a segmentation mask."""

    def __init__(self, n: int, task: str, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.task, self.size = task, size
        self.items = []
        for _ in range(n):
            s = int(torch.randint(4, size // 2, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            img = torch.rand(3, size, size, generator=g) * 0.2
            img[:, y0 : y0 + s, x0 : x0 + s] += 0.7
            mask = torch.zeros(size, size, dtype=torch.long)
            mask[y0 : y0 + s, x0 : x0 + s] = 1
            box = torch.tensor([[x0, y0, x0 + s, y0 + s]], dtype=torch.float32)
            self.items.append((img, mask, box))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, mask, box = self.items[i]
        x = (img - 0.5) / 0.25
        if self.task == "object-detection":
            return x, {"boxes": box, "labels": torch.tensor([1])}
        return x, mask


def det_collate(batch):
    return tuple(zip(*batch, strict=True))


class TinySegmenter(pl.LightningModule):
    """One conv: logits (N, 2, H, W)."""

    def __init__(self, out: str = "logits") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.out = out

    def forward(self, x):
        logits = self.conv(x)
        if self.out == "dict":
            return {"seg": logits}
        if self.out == "flat":
            return logits.flatten(1)
        return logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.conv(x)
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.conv(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyDetector(pl.LightningModule):
    """Torchvision-style outputs: the bounding box of bright pixels (threshold learnt) plus a decoy box."""

    def __init__(self, out: str = "dicts") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.out = out

    def forward(self, images):
        outs = []
        for img in images:
            heat = torch.sigmoid(self.conv(img[None]))[0, 0]
            ys, xs = torch.nonzero(heat > heat.mean(), as_tuple=True)
            if len(xs):
                box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            else:
                box = torch.zeros(4)
            boxes = torch.stack([box, torch.tensor([0.0, 0.0, 3.0, 3.0], device=img.device)])
            scores = torch.stack([heat.max(), heat.min() * 0])  # decoy box has score 0 (below threshold)
            outs.append({"boxes": boxes, "scores": scores, "labels": torch.tensor([1, 1], device=img.device)})
        if self.out == "tuple":
            return [(o["boxes"], o["scores"], o["labels"]) for o in outs]
        return outs

    def training_step(self, batch, batch_idx):
        images, _ = batch
        return torch.stack([self.conv(img[None]).mean() ** 2 for img in images]).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_task(task: str, out: str | None = None):
    """(model, train loader, val loader) of a tiny model for ``task``."""
    if task == "classification":
        dm = DigitsDataModule(batch_size=32)
        dm.setup()
        return DigitsClassifier(width=4), DataLoader(dm.train_set, batch_size=32), DataLoader(dm.val_set, batch_size=64)
    if task == "object-detection":
        collate = det_collate
        model = TinyDetector(out or "dicts")
    else:
        collate = None
        model = TinySegmenter(out or "logits")
    train = DataLoader(Shapes(32, task, seed=0), batch_size=8, collate_fn=collate)
    val = DataLoader(Shapes(40, task, seed=1), batch_size=8, collate_fn=collate)
    return model, train, val


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One real SQLite store for the module (each fit is its own run)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"


def fit(store: str, model, train, val, callbacks, max_epochs: int = 2, **kw):
    ckpt_path = kw.pop("ckpt_path", None)
    logger = MLflowCVLogger(experiment_name="grid", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=kw.pop("num_sanity_val_steps", 1),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        accelerator="cpu",
        default_root_dir="ckpt",
        **kw,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    assert logger.flush()
    return trainer, logger


def logged_images(store: str, run_id: str, prefix: str, dst: Path) -> dict[int, Image.Image]:
    """{step: PIL image} of the PNGs of image series ``prefix`` (``/`` as ``~``) in the run."""
    client = mlflow.MlflowClient(store)
    out: dict[int, Image.Image] = {}
    Path(dst).mkdir(parents=True, exist_ok=True)  # MLflow 2.x needs the destination to exist
    for f in client.list_artifacts(run_id, "images"):
        name = f.path.split("/")[-1]
        if name.startswith(prefix.replace("/", "~") + "+") and name.endswith(".png"):
            step = int(STEP.search(name).group(1))
            assert step not in out, f"two images for step {step}"
            local = client.download_artifacts(run_id, f.path, str(dst))
            out[step] = Image.open(local).convert("RGB")
    return out


# panel (width, height) of one sample; grids are padded by 4 px and laid out landscape (_panels.grid_columns);
# tiles are enlarged to >= 128 px, captions in a 16 px font (lines of 19 px + 4 px margin)
PANEL = {
    "classification": (128, 128 + 2 * 19 + 4),  # 8x8 digits x16, two caption lines
    "object-detection": (2 * 128 + 2, 128 + 19 + 4),  # 16x16 shapes x8, truth | prediction
    "semantic-segmentation": (3 * 128 + 4, 128 + 19 + 4),  # image | truth | prediction
}


class StepRecorder(pl.Callback):
    """``trainer.current_epoch`` at each validation epoch end (outside the sanity check)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.current_epoch)


# ------------------------------------------------------------------------------------------------
# images per epoch, steps, sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "object-detection", "semantic-segmentation"])
def test_one_grid_per_epoch_with_expected_size(task, store, tmp_path):
    model, train, val = make_task(task)
    cb = PredictionGridCallback(task, num_samples=4, mean=0.5, std=0.25) if task != "classification" else (
        PredictionGridCallback(task, num_samples=4, class_names=[f"digit{i}" for i in range(10)],
                               mean=(0.2662,), std=(0.3830,))
    )  # fmt: skip
    rec = StepRecorder()
    trainer, logger = fit(store, model, train, val, [cb, rec], max_epochs=3, num_sanity_val_steps=2)
    images = logged_images(store, logger.run_id, "val/predictions", tmp_path / "dl")
    assert sorted(images) == rec.steps == [0, 1, 2]  # one per epoch at step = epoch, none for the sanity check
    w, h = PANEL[task]
    cols = {"classification": 4}.get(task, 2)  # landscape: 4 tall digit panels in one row, wide panels 2x2
    rows = -(-4 // cols)
    for img in images.values():
        assert img.size == (cols * w + (cols + 1) * 4, rows * h + (rows + 1) * 4)
    assert model.training  # train mode restored
    assert cb.indices is not None and len(cb.indices) == 4 and max(cb.indices) < len(val.dataset)


def test_classification_grid_content_matches_predictions(store, tmp_path):
    """A panel is framed red exactly when the model's prediction on that sample is wrong."""
    model, train, val = make_task("classification")
    cb = PredictionGridCallback("classification", num_samples=4, nrow=4, mean=(0.2662,), std=(0.3830,))
    trainer, logger = fit(store, model, train, val, [cb], max_epochs=1)
    img = logged_images(store, logger.run_id, "val/predictions", tmp_path / "dl")[trainer.current_epoch - 1]
    x = torch.stack([val.dataset[i][0] for i in cb.indices])
    y = torch.stack([val.dataset[i][1] for i in cb.indices])
    model.eval()
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).tolist()
    import numpy as np

    arr = np.asarray(img)
    for i, is_wrong in enumerate(wrong):
        x0 = 4 + i * (128 + 4)
        top_left = arr[4, x0]
        assert (tuple(top_left) == (230, 30, 30)) == is_wrong, (i, top_left, wrong)


def test_every_n_epochs(store, tmp_path):
    model, train, val = make_task("semantic-segmentation")
    cb = PredictionGridCallback("semantic-segmentation", num_samples=2, every_n_epochs=2, key="seg/grid")
    _, logger = fit(store, model, train, val, [cb], max_epochs=4)
    assert sorted(logged_images(store, logger.run_id, "seg/grid", tmp_path / "dl")) == [1, 3]  # epochs 1 and 3


def test_datamodule_supplies_names_and_stats(store, tmp_path):
    """Without mean/std/class_names the datamodule's attributes are used (digits: normalised -> de-normalised)."""
    dm = DigitsDataModule(batch_size=64)
    cb = PredictionGridCallback("classification", num_samples=1)
    logger = MLflowCVLogger(tracking_uri=store)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[cb], limit_train_batches=1, limit_val_batches=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(DigitsClassifier(width=4), datamodule=dm)
    logger.flush()
    img = logged_images(store, logger.run_id, "val/predictions", tmp_path / "dl")[trainer.current_epoch - 1]
    # digit backgrounds are 0 before normalisation: de-normalised with the datamodule's stats they are black
    import numpy as np

    arr = np.asarray(img)[4:100, 4:100]
    raw = dm.val_set.images[cb.indices[0], 0]
    assert int(raw[0, 0]) == 0 and tuple(arr[2, 2]) in {(0, 0, 0), (230, 30, 30)}
    assert (arr.reshape(-1, 3) == 0).all(axis=1).mean() > 0.2


def test_resume_shows_the_same_samples(store, tmp_path):
    model, train, val = make_task("classification")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = PredictionGridCallback("classification", num_samples=3, seed=1)
    fit(store, model, train, val, [first, ckpt_cb], max_epochs=1, enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert any(v.get("indices") == first.indices for v in ckpt["callbacks"].values() if isinstance(v, dict))

    second = PredictionGridCallback("classification", num_samples=3, seed=12345)
    assert second.state_dict()["indices"] is None
    model2, _, _ = make_task("classification")
    _, logger = fit(store, model2, train, val, [second], max_epochs=2, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert second.indices == first.indices
    # the resumed fit continues the checkpoint's run: epoch 0 from the first fit, epoch 1 from the second
    assert sorted(logged_images(store, logger.run_id, "val/predictions", tmp_path / "dl")) == [0, 1]


# ------------------------------------------------------------------------------------------------
# output adapters by import path
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def adapters(tmp_path, monkeypatch):
    (tmp_path / "grid_adapters.py").write_text(
        "def seg_from_dict(out):\n    return out['seg']\n\n"
        "def det_from_tuples(out):\n"
        "    return [{'boxes': b, 'scores': s, 'labels': l} for b, s, l in out]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("grid_adapters", None)


@pytest.mark.parametrize(
    ("task", "out", "fn"),
    [("semantic-segmentation", "dict", "seg_from_dict"), ("object-detection", "tuple", "det_from_tuples")],
)
def test_output_transform_by_import_path(task, out, fn, adapters, store, tmp_path):
    model, train, val = make_task(task, out)
    cb = PredictionGridCallback(task, num_samples=2, output_transform=f"grid_adapters:{fn}")
    trainer, logger = fit(store, model, train, val, [cb], max_epochs=1)
    assert sorted(logged_images(store, logger.run_id, "val/predictions", tmp_path / "dl")) == [0]


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "model_out", "match"),
    [
        ("classification", "seg", r"task='classification' expects model outputs as logits Tensor \(N, C\).*got Tensor\(8, 2, 16, 16\)"),
        ("semantic-segmentation", "flat", r"task='semantic-segmentation' expects model outputs as logits Tensor \(N, C, H, W\).*got Tensor\(8, 512\)"),
        ("object-detection", "tuple", r"task='object-detection' expects model outputs as list of N dicts.*got list\[8\] of tuple\[3\]"),
    ],
)
def test_wrong_output_format_fails_at_first_validation_batch(task, model_out, match, store):
    """The worst-mistakes collection reads the first validation batch (8 images), before the first grid."""
    if task == "object-detection":
        model, train, val = make_task(task, model_out)
    else:  # a segmenter (logits (N, 2, 16, 16) or flattened) where the callback expects another format
        model, train, val = make_task("semantic-segmentation", "logits" if model_out == "seg" else model_out)
    cb = PredictionGridCallback(task, num_samples=2)
    with pytest.raises(ValueError, match=r"^PredictionGridCallback: " + match + r".*output_transform='pkg\.mod:fn'"):
        fit(store, model, train, val, [cb], max_epochs=1)


def test_wrong_target_format(store):
    model, train, val = make_task("semantic-segmentation")
    cb = PredictionGridCallback("object-detection", num_samples=2, output_transform=lambda out: [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ] * out.shape[0])  # fmt: skip
    with pytest.raises(ValueError, match=r"task='object-detection' expects targets as list of N dicts .*got Tensor\(8, 16, 16\) int64"):
        fit(store, model, train, val, [cb], max_epochs=1)


def test_needs_mlflow_cv_logger(tmp_path):
    model, train, val = make_task("semantic-segmentation")
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[PredictionGridCallback("semantic-segmentation")],
                         enable_progress_bar=False, limit_train_batches=1)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"PredictionGridCallback needs an MLflowCVLogger .*Fix: Trainer\(logger=MLflowCVLogger"):
        trainer.fit(model, train, val)
    assert trainer.global_step == 0  # failed before training started


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "segm"}, r"`task` must be one of \['classification', 'object-detection', 'semantic-segmentation'.*got 'segm'"),
        ({"num_samples": 0}, r"`num_samples` must be an int >= 1, got 0"),
        ({"every_n_epochs": 1.5}, r"`every_n_epochs` must be an int >= 1, got 1.5"),
        ({"score_threshold": 1.5}, r"`score_threshold` must be a number in \[0, 1\], got 1.5"),
        ({"mean": (0.5,)}, r"pass both `mean` and `std` or neither"),
        ({"mean": (0.5, 0.5), "std": (0.2,)}, r"`mean` and `std` need the same length"),
        ({"key": ""}, r"`key` must be a non-empty string"),
        ({"class_names": "cat,dog"}, r"`class_names` must be a list of names"),
        ({"dataloader_idx": -1}, r"`dataloader_idx` must be an int >= 0, got -1"),
        ({"nrow": 0}, r"`nrow` must be an int >= 1 or None, got 0"),
        ({"display_min_size": 300}, r"`display_max_size` \(256\) must be >= `display_min_size` \(300\)"),
        ({"output_transform": "no_such_pkg_zz:fn"}, r"`output_transform`='no_such_pkg_zz:fn': cannot import module"),
        ({"batch_transform": "json.loads"}, r"`batch_transform` must be a callable or an import path"),
        ({"worst_mistakes": "yes"}, r"`worst_mistakes` must be True or False, got 'yes'\. Fix: worst_mistakes=False"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = {"task": "classification", **kwargs}
    with pytest.raises(ValueError, match=r"^PredictionGridCallback: " + match):
        PredictionGridCallback(**kwargs)


def test_yaml_config_names_the_callbacks_and_an_adapter(adapters):
    """LightningCLI-style YAML (class_path/init_args, jsonargparse) builds the callbacks, adapter by import path."""
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_mlflow_cv.callbacks.augmentation_samples import AugmentationSamplesCallback

    config = yaml.safe_load(
        """
        grid:
          class_path: lightning_mlflow_cv.callbacks.prediction_grid.PredictionGridCallback
          init_args: {task: semantic-segmentation, num_samples: 4, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25],
                      output_transform: "grid_adapters:seg_from_dict", background_class: 0}
        aug:
          class_path: lightning_mlflow_cv.callbacks.augmentation_samples.AugmentationSamplesCallback
          init_args: {num_samples: 8, mean: 0.5, std: 0.25}
        """
    )
    parser = ArgumentParser()
    parser.add_argument("--grid", type=PredictionGridCallback)
    parser.add_argument("--aug", type=AugmentationSamplesCallback)
    built = parser.instantiate_classes(parser.parse_object(config))
    assert built.grid.task == "semantic-segmentation" and built.grid.mean == (0.5, 0.5, 0.5)
    assert built.grid.output_transform({"seg": 1}) == 1 and built.aug.std == (0.25,)


def test_two_grids_coexist_and_each_resumes_its_own_samples(store, tmp_path):
    """Two grids (different sample counts and image series) in one Trainer: distinct state keys, no
    duplicate-state error, and each gets its own samples back from the checkpoint."""
    model, train, val = make_task("classification")

    def grids(seed: int) -> tuple[PredictionGridCallback, PredictionGridCallback]:
        return (
            PredictionGridCallback("classification", num_samples=3, seed=seed),
            PredictionGridCallback("classification", num_samples=5, seed=seed + 7, key="val/predictions_5"),
        )

    a, b = grids(1)
    assert a.state_key != b.state_key
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(store, model, train, val, [a, b, ckpt_cb], max_epochs=1, enable_checkpointing=True)
    assert len(a.indices) == 3 and len(b.indices) == 5 and a.indices != b.indices[:3]
    states = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["callbacks"]
    assert states[a.state_key]["indices"] == a.indices and states[b.state_key]["indices"] == b.indices

    a2, b2 = grids(12345)  # other seeds: only the checkpoint can give back the first fit's samples
    model2, _, _ = make_task("classification")
    fit(store, model2, train, val, [a2, b2], max_epochs=2, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert a2.indices == a.indices and b2.indices == b.indices


# ------------------------------------------------------------------------------------------------
# one step axis with the metrics; readable tiles
# ------------------------------------------------------------------------------------------------
def test_images_one_per_epoch_at_step_epoch_and_tiles_are_readable(store, tmp_path):
    """Both image series are logged once per epoch at step = epoch (MLflow 3.17's image card opens at step 0, so
    images at global steps showed nothing until the slider moved); digits tiles are 128 px."""
    model, train, val = make_task("classification")
    cb = PredictionGridCallback("classification", num_samples=16, mean=(0.2662,), std=(0.3830,))
    rec = StepRecorder()
    _, logger = fit(store, model, train, val, [cb, rec], max_epochs=2, num_sanity_val_steps=0)
    fixed = logged_images(store, logger.run_id, "val/predictions", tmp_path / "a")
    worst = logged_images(store, logger.run_id, cb.worst_key, tmp_path / "b")
    assert sorted(fixed) == sorted(worst) == rec.steps == [0, 1]
    # 16 samples in a 4x4 grid of 128-px tiles (8x8 digits enlarged x16) with two 19-px caption lines
    assert fixed[1].size == (6 * 128 + 7 * 4, 3 * (128 + 2 * 19 + 4) + 4 * 4)  # 16 panels, 6 per row (landscape)


# ------------------------------------------------------------------------------------------------
# worst mistakes
# ------------------------------------------------------------------------------------------------
def test_worst_mistakes_are_exactly_the_most_confident_errors(store, tmp_path):
    """Differential: the logged worst-mistakes grid equals the grid of the top-k most confident wrong predictions
    found by a brute-force sort over the same validation outputs (2 batches of 64 digits)."""
    import numpy as np

    from lightning_mlflow_cv._draw import pixels as _pixels
    from lightning_mlflow_cv._draw import panels as _panels

    model, train, val = make_task("classification")
    k, names, mean, std = 5, [f"d{i}" for i in range(10)], (0.2662,), (0.3830,)
    cb = PredictionGridCallback("classification", num_samples=k, class_names=names, mean=mean, std=std)
    trainer, logger = fit(store, model, train, val, [cb], max_epochs=1, num_sanity_val_steps=0)
    logged = logged_images(store, logger.run_id, "val/predictions_worst_mistakes", tmp_path / "dl")
    assert sorted(logged) == [0]

    # brute force over the same outputs: the model after fit is the model that was validated (no step after it)
    model.eval()
    rows = []  # (confidence, arrival order, image, target, prediction) of every wrong prediction
    with torch.no_grad():
        for b, (x, y) in enumerate(val):
            if b == 2:  # limit_val_batches=2
                break
            prob = model(x).softmax(1)
            conf, pred = prob.max(1)
            rows += [(float(conf[i]), b * 64 + i, x[i], int(y[i]), int(pred[i])) for i in range(len(y)) if pred[i] != y[i]]
    assert len(rows) > k  # a barely trained model: plenty of mistakes to choose from
    top = sorted(rows, key=lambda r: (-r[0], r[1]))[:k]
    panels = []
    for rank, (conf, _, x, y, pred) in enumerate(top, start=1):
        img = _pixels.to_display(x, mean, std, 128, 256)
        panel = _panels.classification_panel(img, y, pred, conf, names, font_size=16)
        panels.append(_pixels.caption(panel, [f"#{rank} conf {conf:.3g}"], font_size=16))
    expected = _panels.make_image_grid(panels).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(logged[0]), expected)


@pytest.mark.parametrize("task", ["object-detection", "semantic-segmentation"])
def test_worst_mistakes_without_step_outputs_and_switched_off(task, store, tmp_path):
    """A validation_step that returns nothing: the batches go through forward once more; ``worst_mistakes=False``
    logs only the fixed samples."""
    model, train, val = make_task(task)
    on = PredictionGridCallback(task, num_samples=3, mean=0.5, std=0.25)
    off = PredictionGridCallback(task, num_samples=2, mean=0.5, std=0.25, key="plain", worst_mistakes=False)
    trainer, logger = fit(store, model, train, val, [on, off], max_epochs=1)
    client = mlflow.MlflowClient(store)
    names = [f.path.split("/")[-1] for f in client.list_artifacts(logger.run_id, "images") if f.path.endswith(".png")]
    worst = logged_images(store, logger.run_id, on.worst_key, tmp_path / "dl")
    assert list(worst) == [0]
    assert any(n.startswith("plain+") for n in names) and not any(n.startswith("plain_worst") for n in names)
    w, h = PANEL[task]  # the untrained model errs on every image: 3 panels (2x2 layout), each with a rank line
    assert worst[0].size == (2 * w + 12, 2 * (h + 19 + 4) + 12)
