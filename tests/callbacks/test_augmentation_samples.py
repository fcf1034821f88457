"""AugmentationSamplesCallback with a real Trainer and a real SQLite store."""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mlflow_cv.callbacks.augmentation_samples import AugmentationSamplesCallback
from lightning_mlflow_cv.demo import DIGITS_MEAN, DIGITS_STD, DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    d = DigitsDataModule(batch_size=8, augment=False)
    d.setup()
    return d


def fit(store, model, train, callbacks, max_epochs=1, limit_train_batches=3, **kw):
    logger = MLflowCVLogger(experiment_name="aug", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=max_epochs, logger=logger, callbacks=callbacks, limit_train_batches=limit_train_batches,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", **kw,
    )  # fmt: skip
    trainer.fit(model, train)
    assert logger.flush()
    return trainer, logger


def artifact(store, run_id, path, dst) -> Image.Image:
    client = mlflow.MlflowClient(store)
    assert [f.path for f in client.list_artifacts(run_id, path.rsplit("/", 1)[0])] == [path]
    return Image.open(client.download_artifacts(run_id, path, str(dst))).convert("RGB")


def test_grid_of_first_batch_as_the_model_sees_it(store, dm, tmp_path):
    loader = DataLoader(dm.train_set, batch_size=16, shuffle=False)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, batch[0].clone()))

    cb = AugmentationSamplesCallback(num_samples=16, mean=DIGITS_MEAN, std=DIGITS_STD)
    _, logger = fit(store, DigitsClassifier(width=4), loader, [cb, Spy()])
    img = artifact(store, logger.run_id, "augmentations/train_samples.png", tmp_path)
    assert img.size == (4 * 96 + 5 * 4, 4 * 96 + 5 * 4)  # 16 panels, 4x4, 8x8 digits shown at 96x96
    arr = np.asarray(img)
    raw = dm.train_set.images[:16, 0].numpy()  # uint8 originals of the first batch (no shuffle, no augmentation)
    for i in range(16):
        r, c = divmod(i, 4)
        y0, x0 = 4 + r * 100, 4 + c * 100
        shown = arr[y0 : y0 + 96 : 12, x0 : x0 + 96 : 12, 0].astype(int)  # one pixel per 12x12 block
        assert np.abs(shown - raw[i].astype(int)).max() <= 1, i
    assert cb.logged and seen[0][0] == 0


def test_collects_across_batches_and_logs_once(store, dm, tmp_path):
    loader = DataLoader(dm.train_set, batch_size=4, shuffle=True)
    cb = AugmentationSamplesCallback(num_samples=10, task="classification", class_names=[f"d{i}" for i in range(10)])
    _, logger = fit(store, DigitsClassifier(width=4), loader, [cb], max_epochs=2)
    img = artifact(store, logger.run_id, "augmentations/train_samples.png", tmp_path)
    # 10 panels -> 4 per row, 3 rows; each 96 wide and 96 + one caption line high
    assert img.size == (4 * 96 + 5 * 4, 3 * (96 + 19) + 4 * 4)


def test_short_epoch_logs_what_it_has(store, dm, tmp_path):
    cb = AugmentationSamplesCallback(num_samples=16, artifact_file="aug/few.png")
    _, logger = fit(store, DigitsClassifier(width=4), DataLoader(dm.train_set, batch_size=3), [cb],
                    limit_train_batches=1)  # fmt: skip
    img = artifact(store, logger.run_id, "aug/few.png", tmp_path)
    assert img.size == (2 * 96 + 3 * 4, 2 * 96 + 3 * 4)  # 3 panels in a 2x2 layout


def test_does_not_change_training_randomness(store):
    """Images come from the batches themselves: data order and augmentation streams are untouched."""

    def run(callbacks):
        pl.seed_everything(7)
        d = DigitsDataModule(batch_size=16, augment=True)
        model = DigitsClassifier(width=4)
        fit(store, model, d, callbacks, limit_train_batches=3)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a = run([])
    b = run([AugmentationSamplesCallback(num_samples=8)])
    assert torch.equal(a, b)


class MaskShapes(Dataset):
    def __init__(self, n=8):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[i : i + 4, i : i + 4] = 1 + i % 2
        return {"image": mask[None].float().expand(3, -1, -1) * 0.5, "mask": mask}


class OneConv(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.conv(batch["image"]), batch["mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_segmentation_masks_drawn_from_dict_batches(store, tmp_path):
    cb = AugmentationSamplesCallback(num_samples=4, task="semantic-segmentation", num_classes=3, background_class=0)
    _, logger = fit(store, OneConv(), DataLoader(MaskShapes(), batch_size=4), [cb])
    img = artifact(store, logger.run_id, "augmentations/train_samples.png", tmp_path)
    w, h = 2 * 96 + 2, 96 + 19  # image | truth overlay
    assert img.size == (2 * w + 12, 2 * h + 12)
    arr = np.asarray(img).astype(int)
    truth = arr[4:100, 4 + 98 : 4 + 194]
    coloured = np.abs(truth[..., 0] - truth[..., 2]) > 20  # overlay colours, not grey
    assert coloured[0:24, 0:24].any() and not coloured[30:, 30:].any()  # first mask: rows/cols 0..3 (x6)


def test_detection_boxes_drawn(store, tmp_path):
    class Boxes(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1])}

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = AugmentationSamplesCallback(num_samples=2, task="object-detection", nrow=2)
    loader = DataLoader(Boxes(), batch_size=2, collate_fn=lambda b: tuple(zip(*b)))
    _, logger = fit(store, M(), loader, [cb])
    arr = np.asarray(artifact(store, logger.run_id, "augmentations/train_samples.png", tmp_path))
    panel = arr[4:100, 4:100]
    assert panel[6, 6:36].any() and not panel[50:, 50:].any()  # box edge (scaled x3) drawn, rest black


def test_needs_mlflow_cv_logger(dm):
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[AugmentationSamplesCallback()], enable_progress_bar=False)
    with pytest.raises(RuntimeError, match=r"AugmentationSamplesCallback needs an MLflowCVLogger"):
        trainer.fit(DigitsClassifier(width=4), DataLoader(dm.train_set, batch_size=4))


def test_bad_batch_and_targets(store, dm):
    bad = DataLoader([torch.zeros(1, 8, 8)] * 4, batch_size=2)  # images only: no targets
    with pytest.raises(ValueError, match=r"AugmentationSamplesCallback: expected a batch `\(images, targets, \.\.\.\)`.*got Tensor\(2, 1, 8, 8\)"):
        fit(store, OneConv(), bad, [AugmentationSamplesCallback()])
    cb = AugmentationSamplesCallback(task="object-detection")
    with pytest.raises(ValueError, match=r"task='object-detection' expects targets as list of N dicts.*got Tensor\(4,\) int64"):
        fit(store, DigitsClassifier(width=4), DataLoader(dm.train_set, batch_size=4), [cb])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, r"`num_samples` must be an int >= 1, got 0"),
        ({"mean": (0.5,)}, r"pass both `mean` and `std` or neither"),
        ({"artifact_file": "aug/samples.jpg"}, r"`artifact_file` must be a path ending in \.png, got 'aug/samples.jpg'"),
        ({"task": "detect"}, r"`task` must be one of .* got 'detect'"),
        ({"num_classes": 0}, r"`num_classes` must be an int >= 1 or None, got 0"),
        ({"class_names": "abc"}, r"`class_names` must be a list of names or None"),
        ({"batch_transform": "nocolon"}, r"`batch_transform` must be a callable or an import path"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=r"^AugmentationSamplesCallback: " + match):
        AugmentationSamplesCallback(**kwargs)
