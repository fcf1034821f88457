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

from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv.callbacks.augmentation_samples import AugmentationSamplesCallback
from lightning_mlflow_cv.demos.digits import DIGITS_MEAN, DIGITS_STD, DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger


def grid_size(n: int, w: int, h: int) -> tuple[int, int]:
    """(width, height) of n panels of w x h in the default landscape layout, 4 px padding."""
    cols = _panels.grid_columns(n, h, w)
    rows = -(-n // cols)
    return cols * w + (cols + 1) * 4, rows * h + (rows + 1) * 4


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
    assert img.size == (6 * 96 + 7 * 4, 3 * 96 + 4 * 4)  # 16 panels, 6 per row (landscape), 8x8 digits at 96x96
    arr = np.asarray(img)
    raw = dm.train_set.images[:16, 0].numpy()  # uint8 originals of the first batch (no shuffle, no augmentation)
    for i in range(16):
        r, c = divmod(i, 6)  # 6 per row
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
    assert img.size == grid_size(10, 96, 96 + 19)


def test_short_epoch_logs_what_it_has(store, dm, tmp_path):
    cb = AugmentationSamplesCallback(num_samples=16, artifact_file="aug/few.png")
    _, logger = fit(store, DigitsClassifier(width=4), DataLoader(dm.train_set, batch_size=3), [cb],
                    limit_train_batches=1)  # fmt: skip
    img = artifact(store, logger.run_id, "aug/few.png", tmp_path)
    assert img.size == (3 * 96 + 4 * 4, 96 + 2 * 4)  # 3 panels in one row (landscape)


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
    assert img.size == grid_size(4, w, h)
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


def _image_and_target(task: str, i: int):
    """A black 16x16 image and its target in the task's convention (target pixels at rows/cols 2..7)."""
    if task == "instance":
        masks = torch.zeros(1, 16, 16, dtype=torch.bool)
        masks[0, 2:8, 2:8] = True
        target = {"boxes": torch.tensor([[2.0, 2.0, 8.0, 8.0]]), "labels": torch.tensor([1]), "masks": masks}
    elif task == "anomaly":
        target = torch.tensor(1 - i)  # the first sample anomalous, the second normal
    else:  # depth: left half invalid (0), right half 1..2 metres
        target = torch.zeros(1, 16, 16)
        target[:, :, 8:] = torch.linspace(1.0, 2.0, 8)
    return torch.zeros(3, 16, 16), target


def _as_lists(items):
    images, targets = zip(*items, strict=True)
    return torch.stack(images), list(targets)


@pytest.mark.parametrize("task", ["instance", "anomaly", "depth"])
def test_targets_of_the_new_tasks_drawn(store, tmp_path, task):
    """Each sample's target is drawn as the task draws its ground truth; the images themselves are black."""

    class Data(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return _image_and_target(task, i)

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    collate = _as_lists if task == "instance" else None
    cb = AugmentationSamplesCallback(num_samples=2, task=task, nrow=1)  # panels stacked vertically
    _, logger = fit(store, M(), DataLoader(Data(), batch_size=2, collate_fn=collate), [cb], limit_train_batches=1)
    arr = np.asarray(artifact(store, logger.run_id, "augmentations/train_samples.png", tmp_path)).astype(int)
    if task == "instance":  # mask overlay and box over the instance (display x6: pixels 12..47), black elsewhere
        panel = arr[4:100, 4:100]
        assert (panel[18:42, 18:42].sum(-1) > 0).all() and (panel[56:, 56:] == 0).all()
        assert arr.shape[0] == 2 * (96 + 19) + 3 * 4  # "truth: 1" caption under each panel
    elif task == "anomaly":  # the label written under each image, red when anomalous, green when normal
        h = (arr.shape[0] - 3 * 4) // 2
        assert h == 96 + 19
        red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
        green = (arr[..., 1] > 120) & (arr[..., 0] < 100) & (arr[..., 2] < 100)
        first, second = slice(4 + 96, 4 + h), slice(8 + h + 96, 8 + 2 * h)
        assert red[first].any() and not green[first].any()
        assert green[second].any() and not red[second].any()
    else:  # image | colour-mapped target: invalid half black, valid half coloured
        view = arr[4:100, 4 + 98 : 4 + 194]
        assert (view[:, :48] == 0).all() and (view[:, 48:].sum(-1) > 0).all()
        assert len(np.unique(view[:, 48:].reshape(-1, 3), axis=0)) >= 4  # a colour ramp, not one flat colour


def test_every_task_draws_its_ground_truth_as_the_prediction_grid_does():
    """One drawing code per task: the target alone is the prediction grid's ground-truth part, pixel for pixel."""
    from lightning_mlflow_cv import tasks

    img = torch.full((3, 96, 96), 128, dtype=torch.uint8)
    _, inst_target = _image_and_target("instance", 0)
    inst_pred = dict(inst_target, scores=torch.tensor([0.9]), masks=inst_target["masks"].float())
    depth = _image_and_target("depth", 0)[1]
    outputs = {  # (step outputs, the first sample's checked target)
        "instance": (([inst_pred], [inst_target]), inst_target),
        "depth": ((depth.clone(), depth), depth[0]),  # a perfect prediction: the shared scale is the target's
        "semantic-segmentation": ((torch.randn(1, 3, 16, 16), torch.randint(0, 3, (1, 16, 16))), None),
    }
    opts = tasks.PanelOptions(num_classes=3)
    for name, ((preds, targets), target) in outputs.items():
        task = tasks.get_task(name)
        out = task.to_cpu(tasks.check_model_outputs(name, preds, targets, 1, "X"))
        target = out.targets[0] if target is None else target
        alone = task.target_panel(img, (16, 16), target, opts)
        both = task.panel(img, (16, 16), out, 0, opts)
        if name == "depth":  # image | pred | target | error: the target's colours (captions aside) are the same
            assert torch.equal(both[:, :96, 196:292], alone[:, :96, 98:194]) and alone[:, :96, 98:194].any()
        else:  # the ground truth comes first
            assert torch.equal(both[:, : alone.shape[1], : alone.shape[2]], alone), name
    for name in tasks.TASKS:  # every registered task can draw a target alone
        assert type(tasks.get_task(name)).target_panel is not tasks.CVTask.target_panel, name
