"""CVMetricsCallback: metric values against independent computations, artifacts, best epoch, errors, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
from lightning_mlflow_cv.logger import MLflowCVLogger
from lightning_mlflow_cv.metrics.best_epoch import fit_summary, is_new_best, resolve_monitor
from lightning_mlflow_cv.metrics.functional import confusion_matrix_record, normalize_by_true_class, table_csv
from lightning_mlflow_cv.tasks.object_detection import match_detections

CPU = SimpleNamespace(device=torch.device("cpu"))  # what _update needs of a LightningModule
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_cv_metrics.py"


def compute(cb: CVMetricsCallback, outputs: list, stage: str = "val"):
    for out in outputs:
        cb._update(stage, CPU, out, None)
    return cb._compute(stage)


def walk(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += walk(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def artifact_json(client: MlflowClient, run_id: str, path: str, dst: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(dst))).read_text())


def trainer(logger, callbacks, max_epochs=1, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return pl.Trainer(
        max_epochs=max_epochs, logger=logger, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, deterministic=True, **kw,
    )


# ----------------------------------------------------------------------------------------------
# metric values against independent computations (no Trainer)
# ----------------------------------------------------------------------------------------------
def _cls_batches(n=240, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    logits = torch.randn(n, c, generator=g) + 1.5 * nn.functional.one_hot(y, c)
    return logits, y, [{"logits": logits[i : i + 50], "targets": y[i : i + 50]} for i in range(0, n, 50)]


def test_classification_values_match_sklearn():
    from sklearn import metrics as skm

    logits, y, batches = _cls_batches()
    c = logits.shape[1]
    cb = CVMetricsCallback("classification", c, class_names=list("abcdefg"), curve_thresholds=None)
    scalars, snap = compute(cb, batches)
    pred = logits.argmax(1).numpy()
    probs = logits.softmax(1).numpy()
    yn = y.numpy()
    assert scalars["top1_acc"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-6)
    assert scalars["top5_acc"] == pytest.approx(skm.top_k_accuracy_score(yn, probs, k=5, labels=range(c)), abs=1e-6)
    assert scalars["precision"] == pytest.approx(skm.precision_score(yn, pred, average="macro"), abs=1e-6)
    assert scalars["recall"] == pytest.approx(skm.recall_score(yn, pred, average="macro"), abs=1e-6)
    assert scalars["f1"] == pytest.approx(skm.f1_score(yn, pred, average="macro"), abs=1e-6)
    per_f1 = skm.f1_score(yn, pred, average=None)
    for i, name in enumerate("abcdefg"):
        assert scalars[f"per_class_f1/{name}"] == pytest.approx(per_f1[i], abs=1e-6)
    np.testing.assert_array_equal(snap["confmat"].numpy(), skm.confusion_matrix(yn, pred))
    for i, row in enumerate(snap["table"]):
        assert row["class"] == "abcdefg"[i]
        assert row["support"] == int((yn == i).sum())
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(yn == i, probs[:, i]), abs=1e-6)
        assert row["average_precision"] == pytest.approx(skm.average_precision_score(yn == i, probs[:, i]), abs=1e-6)
        assert row["f1"] == pytest.approx(per_f1[i], abs=1e-6)


def test_classification_binned_curves_approximate_exact_auc_and_topk_is_capped():
    from sklearn import metrics as skm

    logits, y, batches = _cls_batches(c=3)
    cb = CVMetricsCallback("classification", 3, top_k=5)  # k capped at 3: top5_acc is 1
    scalars, snap = compute(cb, batches)
    assert cb.top_k == 3 and scalars["top5_acc"] == pytest.approx(1.0)
    probs = logits.softmax(1).numpy()
    for i, row in enumerate(snap["table"]):
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy() == i, probs[:, i]), abs=0.01)


def test_segmentation_values_match_numpy_with_ignore_index():
    g = torch.Generator().manual_seed(1)
    c, n, h, w = 5, 3, 12, 10
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c - 1, (n, h, w), generator=g)  # class 4 never in targets...
    logits[:, 4] = -10.0  # ... nor predicted: IoU undefined, left out of mIoU
    target[0, :3] = 255
    cb = CVMetricsCallback("segmentation", c, class_names=["bg", "a", "b", "c", "d"], ignore_index=255)
    scalars, snap = compute(cb, [{"logits": logits[:2], "targets": target[:2]}, {"logits": logits[2:], "targets": target[2:]}])
    p = logits.argmax(1).numpy().ravel()
    t = target.numpy().ravel()
    keep = t != 255
    cm = np.bincount(t[keep] * c + p[keep], minlength=c * c).reshape(c, c)
    np.testing.assert_array_equal(snap["confmat"].numpy(), cm)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    assert scalars["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert scalars["pixel_acc"] == pytest.approx((p[keep] == t[keep]).mean(), abs=1e-6)
    for i, name in enumerate(["bg", "a", "b", "c"]):
        assert scalars[f"per_class_IoU/{name}"] == pytest.approx(iou[i], abs=1e-6)
    assert "per_class_IoU/d" not in scalars
    assert snap["table"][4]["iou"] is None


def box(x, y, s=10.0):
    return [x, y, x + s, y + s]


def test_detection_hand_computed_map_precision_recall():
    # class 1: GT A, B; class 2: GT C. A box shifted by 1 px has IoU 90/110 = 0.818 with A.
    gt = {"boxes": torch.tensor([box(0, 0), box(40, 40), box(20, 0)]), "labels": torch.tensor([1, 1, 2])}
    pred = {
        "boxes": torch.tensor([box(1, 0), box(0, 1), box(20, 0), box(60, 60)]),
        "scores": torch.tensor([0.9, 0.8, 0.3, 0.7]),
        "labels": torch.tensor([1, 1, 2, 2]),
    }
    # at score >= 0.5: class 1 -> TP (A), FP (duplicate of A), FN (B); class 2 -> FP (60,60), FN (C: score 0.3)
    tp, fp, fn = match_detections(pred["boxes"], pred["scores"], pred["labels"], gt["boxes"], gt["labels"], 3)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([0, 1, 0], [0, 1, 1], [0, 1, 1])
    cb = CVMetricsCallback("detection", 3, class_names=["bg", "one", "two"])
    scalars, snap = compute(cb, [{"preds": [pred], "targets": [gt]}])
    assert scalars["precision"] == pytest.approx((1 / 2 + 0 / 1) / 2)
    assert scalars["recall"] == pytest.approx((1 / 2 + 0 / 1) / 2)
    # COCO AP50: class 1 -> precision 1 up to recall 0.5, then nothing: 51/101; class 2 -> C found at rank 2 of 2
    # (precision 1/2 at recall 1): 0.5 at every recall point. IoU of the class 1 match is 0.818: counted at
    # thresholds 0.50 .. 0.80 (7 of 10); class 2's match is exact (10 of 10).
    ap50_c1 = 51 / 101
    assert scalars["mAP50"] == pytest.approx((ap50_c1 + 0.5) / 2, abs=1e-4)
    assert scalars["mAP50-95"] == pytest.approx((ap50_c1 * 7 / 10 + 0.5) / 2, abs=1e-4)
    rows = {r["class"]: r for r in snap["table"]}
    assert rows["one"]["ap50"] == pytest.approx(ap50_c1, abs=1e-4)
    assert rows["two"]["ap50_95"] == pytest.approx(0.5, abs=1e-4)
    assert (rows["one"]["tp"], rows["one"]["fp"], rows["one"]["fn"]) == (1, 1, 1)


def _coco_stats(preds, targets):
    """mAP50-95 and mAP50 straight from pycocotools' COCOeval on the same boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets, aid = [], [], [], 1
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i, "width": 100, "height": 100})
        for b, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": aid, "image_id": i, "category_id": lab, "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
            aid += 1
        for b, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            dets.append({"image_id": i, "category_id": lab, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(10)]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.stats[1]


def _random_detections(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 70
        wh = 8 + torch.rand(k, 2, generator=g) * 20
        gtb = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 3, (k,), generator=g)
        jitter = torch.randn(k, 4, generator=g) * 2.5
        extra = torch.tensor([[5.0, 5.0, 20.0, 20.0]])
        preds.append({
            "boxes": torch.cat([gtb + jitter, extra]),
            "scores": torch.rand(k + 1, generator=g),
            "labels": torch.cat([labels, torch.randint(1, 3, (1,), generator=g)]),
        })
        targets.append({"boxes": gtb, "labels": labels})
    return preds, targets


def test_detection_map_matches_pycocotools():
    preds, targets = _random_detections()
    cb = CVMetricsCallback("object-detection", 3)
    scalars, _ = compute(cb, [{"preds": preds[:6], "targets": targets[:6]}, {"preds": preds[6:], "targets": targets[6:]}])
    map5095, map50 = _coco_stats(preds, targets)
    assert 0.05 < map50 < 0.99
    assert scalars["mAP50"] == pytest.approx(map50, abs=1e-6)
    assert scalars["mAP50-95"] == pytest.approx(map5095, abs=1e-6)


def test_table_csv():
    assert table_csv([{"class": "a", "iou": 0.5, "n": 3}, {"class": "b", "iou": None, "n": 0}]) == (
        "class,iou,n\na,0.5,3\nb,,0\n"
    )
    assert table_csv([]) == ""


@pytest.mark.parametrize(
    ("score", "best", "mode", "expected"),
    [
        (0.5, None, "max", True),  # first epoch: any real score
        (0.5, None, "min", True),
        (0.6, 0.5, "max", True),
        (0.4, 0.5, "max", False),
        (0.4, 0.5, "min", True),
        (0.6, 0.5, "min", False),
        (0.5, 0.5, "max", False),  # tie: the earlier epoch stays best, as in ModelCheckpoint
        (0.5, 0.5, "min", False),
        (float("nan"), None, "max", False),  # NaN never wins, not even first
        (float("nan"), 0.5, "min", False),
        (None, None, "max", False),  # monitor not logged this epoch
        (torch.tensor(0.7), 0.5, "max", True),  # callback_metrics hold 0-d tensors
        (torch.tensor(float("nan")), None, "max", False),
        (float("inf"), 0.5, "max", True),
    ],
)
def test_is_new_best(score, best, mode, expected):
    assert is_new_best(score, best, mode) is expected


def test_best_epoch_helpers_track_like_model_checkpoint():
    # a whole history: the best is the first epoch reaching the extreme; NaN epochs are skipped
    for mode, history, best_epoch in (
        ("max", [0.2, float("nan"), 0.7, 0.7, 0.1], 2),
        ("min", [float("nan"), 0.9, 0.3, 0.3, 0.5], 2),
        ("max", [float("nan"), float("nan")], None),
    ):
        best, epoch = None, None
        for e, score in enumerate(history):
            if is_new_best(score, best, mode):
                best, epoch = score, e
        assert epoch == best_epoch, (mode, history)
    with pytest.raises(ValueError, match=r"is_new_best: `mode` must be 'min' or 'max', got 'maximum'"):
        is_new_best(0.5, None, "maximum")
    ckpt = ModelCheckpoint(monitor="val/loss", mode="min")
    assert resolve_monitor(None, None, [ModelCheckpoint(), ckpt]) == ("val/loss", "min")
    assert resolve_monitor(None, "max", [ckpt]) == ("val/loss", "max")
    assert resolve_monitor("val/f1", None, [ckpt]) == ("val/f1", "max")
    assert resolve_monitor(None, None, [ModelCheckpoint()]) == (None, "max")
    assert fit_summary(7200.0, 4, "val/f1", 0.75) == {"time/train_hrs": 2.0, "best/epoch": 4.0, "best/val/f1": 0.75}
    assert fit_summary(0.0, None, None, 0.75) == {"time/train_hrs": 0.0}


def test_confusion_matrix_normalisation_and_record_match_sklearn():
    from sklearn import metrics as skm

    y = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3])  # class 2 never true: its row stays 0, not NaN
    p = np.array([0, 1, 2, 1, 1, 3, 0, 3, 2])
    cm = torch.from_numpy(skm.confusion_matrix(y, p, labels=range(4)))
    expected = skm.confusion_matrix(y, p, labels=range(4), normalize="true")
    np.testing.assert_allclose(normalize_by_true_class(cm).numpy(), expected, atol=1e-12)
    record = confusion_matrix_record(cm, list("abcd"), "val", 3)
    assert record["matrix"] == cm.tolist() and record["labels"] == list("abcd") and record["epoch"] == 3
    np.testing.assert_allclose(np.array(record["normalized"]), expected, atol=1e-6)
    assert json.loads(json.dumps(record)) == record  # JSON as is


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "keypoints"}, r"`task` must be one of \['classification', 'object-detection', 'semantic-segmentation', 'instance-segmentation', 'anomaly-detection', 'depth-estimation'\].*'keypoints'"),
        ({"num_classes": 1}, r"`num_classes` must be an int >= 2, got 1"),
        ({"num_classes": "3"}, r"`num_classes` must be an int >= 2, got '3'"),
        ({"class_names": ["a", "b"]}, r"`class_names` has 2 names but num_classes=3.*one name per class"),
        ({"class_names": "abc"}, r"`class_names` must be a list of 3 strings, got str"),
        ({"class_names": ["a", "a", "b"]}, r"`class_names` must be unique, these repeat: \['a'\]"),
        ({"stages": ["train"]}, r"`stages` must be a non-empty subset of \['val', 'test'\], got \['train'\]"),
        ({"stages": []}, r"`stages` must be a non-empty subset"),
        ({"top_k": 0}, r"`top_k` must be an int >= 1, got 0"),
        ({"ignore_index": 1.5}, r"`ignore_index` must be an int or None, got 1.5"),
        ({"iou_threshold": 1.5}, r"`iou_threshold` must be a number in \[0, 1\], got 1.5"),
        ({"score_threshold": -0.1}, r"`score_threshold` must be a number in \[0, 1\], got -0.1"),
        ({"curve_thresholds": 1}, r"`curve_thresholds` must be an int >= 2 .* or None .*got 1"),
        ({"mode": "maximum"}, r"`mode` must be 'min', 'max' or None, got 'maximum'"),
        ({"monitor": ""}, r"`monitor` must be a metric name or None"),
        ({"detection_backend": "coco"}, r"`detection_backend` must be 'pycocotools' or 'faster_coco_eval', got 'coco'"),
        ({"max_plot_classes": 0}, r"`max_plot_classes` must be an int >= 1, got 0"),
        ({"confusion_matrix_history": "yes"}, r"`confusion_matrix_history` must be True or False, got 'yes'"),
        ({"output_fn": "nowhere_module_q:f"}, r"`output_fn` 'nowhere_module_q:f': module 'nowhere_module_q' cannot be imported"),
    ],
)
def test_argument_errors(kwargs, match):
    args = {"task": "classification", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=f"CVMetricsCallback: {match}"):
        CVMetricsCallback(**args)


# ----------------------------------------------------------------------------------------------
# with a real Trainer and a real SQLite store
# ----------------------------------------------------------------------------------------------
class ShiftDetector(pl.LightningModule):
    """A 'detector' whose predictions are its targets shifted by a fixed amount, plus one false positive."""

    def __init__(self, shift: float = 0.5):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.shift = shift

    def training_step(self, batch, batch_idx):
        return ((self.w - 1) ** 2).sum()

    def predict_boxes(self, targets):
        out = []
        for i, t in enumerate(targets):
            k = len(t["labels"])
            out.append({
                "boxes": torch.cat([t["boxes"] + self.shift * (1 + i % 3), torch.tensor([[0.0, 0.0, 9.0, 9.0]])]),
                "scores": torch.linspace(0.95, 0.4, k + 1),
                "labels": torch.cat([t["labels"], torch.tensor([1])]),
            })
        return out

    def validation_step(self, batch, batch_idx):
        _, targets = batch
        return {"preds": self.predict_boxes(targets), "targets": targets}

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _task_setup(task: str):
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
    from lightning_mlflow_cv.demos.detection import ShapesDetectionDataModule
    from lightning_mlflow_cv.demos.segmentation import ShapesSegmentationDataModule, ShapesSegmenter
    from lightning_mlflow_cv.demos.shapes import SHAPE_CLASSES

    if task == "classification":
        return DigitsClassifier(width=4), DigitsDataModule(batch_size=128, augment=False), 10, None
    if task == "object-detection":
        dm = ShapesDetectionDataModule(num_train=16, num_val=24, image_size=32, batch_size=8)
        return ShiftDetector(), dm, 4, SHAPE_CLASSES
    dm = ShapesSegmentationDataModule(num_train=16, num_val=16, image_size=16, batch_size=8)
    return ShapesSegmenter(width=4), dm, 4, SHAPE_CLASSES


EXPECTED = {
    "classification": (
        ["top1_acc", "top5_acc", "precision", "recall", "f1", "per_class_f1/0", "per_class_f1/9"],
        ["confusion_matrix.png", "confusion_matrix_normalized.png", "confusion_matrix.json", "pr_curve.png",
         "roc_curve.png", "per_class.json", "per_class.csv"],
    ),
    "object-detection": (["mAP50", "mAP50-95", "precision", "recall"], ["per_class.json", "per_class.csv"]),
    "semantic-segmentation": (
        ["mIoU", "pixel_acc", "per_class_IoU/background"],
        ["confusion_matrix.png", "confusion_matrix_normalized.png", "confusion_matrix.json", "per_class.json",
         "per_class.csv"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "object-detection", "semantic-segmentation"])
def test_fit_and_test_log_scalars_per_epoch_and_artifacts_once(task, tracking_uri, tmp_path):
    pl.seed_everything(0)
    model, dm, num_classes, names = _task_setup(task)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    cb = CVMetricsCallback(task, num_classes, class_names=names)
    tr = trainer(logger, [cb], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1)
    tr.fit(model, datamodule=dm)
    tr.test(model, datamodule=dm, verbose=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(logger.run_id)
    scalars, files = EXPECTED[task]
    for stage in ("val", "test"):
        for name in scalars:
            assert f"{stage}/{name}" in run.data.metrics, (stage, name, sorted(run.data.metrics))
    # every validation epoch, not the sanity check; test once
    assert len(client.get_metric_history(logger.run_id, f"val/{scalars[0]}")) == 2
    assert len(client.get_metric_history(logger.run_id, f"test/{scalars[0]}")) == 1
    # no ModelCheckpoint monitor: the last epoch; summary metrics
    assert run.data.metrics["best/epoch"] == 1
    assert 0 < run.data.metrics["time/train_hrs"] < 1
    assert not any(k.startswith("best/val") for k in run.data.metrics)
    artifacts = walk(client, logger.run_id)
    for stage in ("val", "test"):
        for f in files:
            assert f"cv_metrics/{stage}/{f}" in artifacts
    assert len([a for a in artifacts if a.startswith("cv_metrics/")]) == 2 * len(files)
    table = artifact_json(client, logger.run_id, "cv_metrics/val/per_class.json", tmp_path / "dl")
    assert table["epoch"] == 1 and table["task"] == cb.task and table["classes"]
    for f in files:
        if f.endswith(".png"):
            from PIL import Image

            with Image.open(client.download_artifacts(logger.run_id, f"cv_metrics/val/{f}", str(tmp_path / "png"))) as im:
                assert im.format == "PNG" and min(im.size) >= 300, (f, im.size)
    if task == "object-detection":  # shifted boxes: found at IoU 0.5, not all at 0.95
        assert 0.3 < run.data.metrics["val/mAP50"] <= 1.0
        assert run.data.metrics["val/mAP50-95"] < run.data.metrics["val/mAP50"]


def _image_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Steps of the image series ``key`` in the store (MLflow's ``images/<key>+step+N+...png`` names)."""
    prefix = key.replace("/", "~") + "+step+"
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    return sorted(int(n[len(prefix) :].split("+")[0]) for n in names if n.startswith(prefix) and n.endswith(".png"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "history"),
    [("classification", True), ("semantic-segmentation", True), ("object-detection", True), ("classification", False)],
)
def test_confusion_matrix_history_one_image_per_validation_step(task, history, tracking_uri, tmp_path):
    from PIL import Image

    pl.seed_everything(0)
    model, dm, num_classes, names = _task_setup(task)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    cb = CVMetricsCallback(task, num_classes, class_names=names, stages=["val"], confusion_matrix_history=history)

    class GlobalSteps(pl.Callback):
        steps: list[int] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.steps.append(trainer.current_epoch)

    rec = GlobalSteps()
    trainer(logger, [cb, rec], max_epochs=2, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=1).fit(
        model, datamodule=dm
    )
    client = MlflowClient(tracking_uri)
    scalars, files = EXPECTED[task]
    # one image per validation epoch (as many as val metric points; none for the sanity check), at step = epoch
    steps = rec.steps
    assert steps == [0, 1] and len(client.get_metric_history(logger.run_id, f"val/{scalars[0]}")) == 2
    has_confmat = "confusion_matrix.json" in files
    assert _image_steps(client, logger.run_id, "val/confusion_matrix") == (steps if history and has_confmat else [])
    if history and has_confmat:
        images = [f.path for f in client.list_artifacts(logger.run_id, "images") if f.path.endswith(".png")]
        first = next(p for p in images if f"+step+{steps[0]}+" in p)
        with Image.open(client.download_artifacts(logger.run_id, first, str(tmp_path / "img"))) as im:
            assert min(im.size) >= 300, im.size
    # the fit-end artifacts are the same with and without the history
    artifacts = [a for a in walk(client, logger.run_id) if a.startswith("cv_metrics/")]
    assert sorted(artifacts) == sorted(f"cv_metrics/val/{f}" for f in files)
    if has_confmat:
        assert artifact_json(client, logger.run_id, "cv_metrics/val/confusion_matrix.json", tmp_path / "dl")["epoch"] == 1


def _predict(model, loader):
    model.eval()
    with torch.no_grad():
        outs = [(model(x), y) for x, y in loader]
    return torch.cat([o for o, _ in outs]), torch.cat([y for _, y in outs])


@pytest.mark.slow
def test_classification_fit_best_epoch_and_test_values_match_sklearn(tracking_uri, tmp_path):
    from sklearn import metrics as skm

    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, augment=False)
    model = DigitsClassifier(width=8, lr=1e-2)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/f1", mode="max")
    cb = CVMetricsCallback("classification", 10, curve_thresholds=None)
    tr = trainer(logger, [ckpt, cb], max_epochs=3, limit_train_batches=3)
    tr.fit(model, datamodule=dm)
    tr.test(model, datamodule=dm, ckpt_path="best", verbose=False)
    client = MlflowClient(tracking_uri)
    run_id = logger.run_id
    metrics = client.get_run(run_id).data.metrics
    # best epoch: the argmax of val/f1 (the epoch ModelCheckpoint kept), its value and confusion matrix
    f1_hist = [m.value for m in sorted(client.get_metric_history(run_id, "val/f1"), key=lambda m: m.step)]
    assert len(f1_hist) == 3
    assert metrics["best/epoch"] == int(np.argmax(f1_hist)) == cb.best_epoch
    assert metrics["best/val/f1"] == pytest.approx(max(f1_hist)) == pytest.approx(float(ckpt.best_model_score))
    best = DigitsClassifier.load_from_checkpoint(ckpt.best_model_path)
    dm.setup()
    logits, y = _predict(best, dm.val_dataloader())
    cm_val = artifact_json(client, run_id, "cv_metrics/val/confusion_matrix.json", tmp_path / "dl")
    assert cm_val["epoch"] == cb.best_epoch
    np.testing.assert_array_equal(np.array(cm_val["matrix"]), skm.confusion_matrix(y, logits.argmax(1), labels=range(10)))
    # test metrics (on the best checkpoint) against sklearn on the same predictions
    logits, y = _predict(best, dm.test_dataloader())
    pred, probs = logits.argmax(1).numpy(), logits.softmax(1).numpy()
    assert metrics["test/top1_acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-5)
    assert metrics["test/top5_acc"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5), abs=1e-5)
    assert metrics["test/f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-5)
    assert metrics["test/per_class_f1/3"] == pytest.approx(skm.f1_score(y, pred, average=None)[3], abs=1e-5)
    table = artifact_json(client, run_id, "cv_metrics/test/per_class.json", tmp_path / "dl2")["classes"]
    for i, row in enumerate(table):
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]), abs=1e-5)
    cm_test = artifact_json(client, run_id, "cv_metrics/test/confusion_matrix.json", tmp_path / "dl3")
    np.testing.assert_array_equal(np.array(cm_test["matrix"]), skm.confusion_matrix(y, pred, labels=range(10)))
    assert np.allclose(np.array(cm_test["normalized"]).sum(1), 1.0, atol=1e-4)


def test_detection_test_values_match_pycocotools(tracking_uri):
    from lightning_mlflow_cv.demos.detection import ShapesDetectionDataModule

    dm = ShapesDetectionDataModule(num_train=8, num_val=20, image_size=48, batch_size=6)
    model = ShiftDetector(shift=2.0)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    tr = trainer(logger, [CVMetricsCallback("object-detection", 4, stages=["test"])])
    tr.test(model, datamodule=dm, verbose=False)
    targets = [t for _, ts in dm.test_dataloader() for t in ts]
    map5095, map50 = _coco_stats(model.predict_boxes(targets), targets)
    metrics = MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics
    assert metrics["test/mAP50"] == pytest.approx(map50, abs=1e-6)
    assert metrics["test/mAP50-95"] == pytest.approx(map5095, abs=1e-6)


def test_validate_logs_plots_and_wrong_outputs_fail_at_first_batch(tracking_uri):
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    dm = DigitsDataModule(batch_size=256, augment=False)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    tr = trainer(logger, [CVMetricsCallback("classification", 10, stages=["val"])])
    tr.validate(DigitsClassifier(width=4), datamodule=dm, verbose=False)
    client = MlflowClient(tracking_uri)
    assert "cv_metrics/val/confusion_matrix.json" in walk(client, logger.run_id)
    assert "val/top1_acc" in client.get_run(logger.run_id).data.metrics

    class Wrong(DigitsClassifier):
        def validation_step(self, batch, batch_idx):
            self.calls = getattr(self, "calls", 0) + 1
            return {"logits": self(batch[0]), "labels": batch[1]}

    wrong = Wrong(width=4)
    tr = trainer(MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri), [CVMetricsCallback("classification", 10)])
    with pytest.raises(ValueError, match=r"CVMetricsCallback: .*'classification' format.*Expected: .*Got: dict\{'logits': Tensor"):
        tr.validate(wrong, datamodule=dm, verbose=False)
    assert wrong.calls == 1


def test_output_fn_by_import_path_and_missing_logger(tracking_uri):
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    class RawLogits(DigitsClassifier):
        def validation_step(self, batch, batch_idx):
            return self(batch[0])

    dm = DigitsDataModule(batch_size=256, augment=False)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    cb = CVMetricsCallback("classification", 10, output_fn="lightning_mlflow_cv.tasks:logits_and_batch_targets", stages=["val"])
    trainer(logger, [cb]).validate(RawLogits(width=4), datamodule=dm, verbose=False)
    assert "val/f1" in MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics
    with pytest.raises(RuntimeError, match="CVMetricsCallback needs an MLflowCVLogger.*found: none"):
        trainer(False, [CVMetricsCallback("classification", 10)]).validate(RawLogits(width=4), datamodule=dm)


@pytest.mark.slow
def test_state_dict_round_trip_and_resume_keeps_best_epoch_and_time(tracking_uri, tmp_path):
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, augment=False)
    logger = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/top1_acc", mode="max", save_last=True)
    cb = CVMetricsCallback("classification", 10)
    trainer(logger, [ckpt, cb], max_epochs=2, limit_train_batches=2).fit(DigitsClassifier(width=4), datamodule=dm)
    state = cb.state_dict()
    assert state["monitor"] == "val/top1_acc" and state["best_epoch"] == cb.best_epoch
    assert state["best_snapshot"]["confmat"].shape == (10, 10)
    fresh = CVMetricsCallback("classification", 10)
    fresh.load_state_dict(state)
    assert (fresh.best_epoch, fresh.best_score, fresh.train_time_s) == (cb.best_epoch, cb.best_score, state["train_time_s"])
    # resume from last.ckpt for a third epoch: best and time carry over
    cb2 = CVMetricsCallback("classification", 10)
    logger2 = MLflowCVLogger(experiment_name="cvm", tracking_uri=tracking_uri)
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/top1_acc", mode="max")
    tr = trainer(logger2, [ckpt2, cb2], max_epochs=3, limit_train_batches=2)
    tr.fit(DigitsClassifier(width=4), datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb2.train_time_s > state["train_time_s"] > 0
    assert cb2.best_score >= cb.best_score
    metrics = MlflowClient(tracking_uri).get_run(logger2.run_id).data.metrics
    assert metrics["best/epoch"] == cb2.best_epoch
    assert len(MlflowClient(tracking_uri).get_metric_history(logger2.run_id, "val/top1_acc")) == 3


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_confusion_matrix_equals_single_process(tracking_uri, tmp_path):
    from sklearn import metrics as skm

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(  # bounded: a deadlock fails the test instead of hanging CI
        [sys.executable, str(SCRIPT), tracking_uri, str(out)], capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "rank0.json").read_text())
    assert info["world"] == 2
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_cv_metrics import build_model, val_dataset
    finally:
        sys.path.remove(str(SCRIPT.parent))
    model = build_model()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    logits, y = _predict(model, DataLoader(val_dataset(), batch_size=1000))
    pred = logits.argmax(1)
    client = MlflowClient(tracking_uri)
    cm = artifact_json(client, info["run_id"], "cv_metrics/val/confusion_matrix.json", tmp_path / "dl")
    expected = skm.confusion_matrix(y, pred, labels=range(10))
    assert expected.sum() == len(y) == 400
    np.testing.assert_array_equal(np.array(cm["matrix"]), expected)
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["val/top1_acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert metrics["val/f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert len(client.get_metric_history(info["run_id"], "val/top1_acc")) == 1  # rank 0 only
    # the new tasks' metrics (sum states, cat states, COCO lists) equal one process over the whole set
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_cv_metrics import task_callbacks
    finally:
        sys.path.remove(str(SCRIPT.parent))
    x, yy = val_dataset().tensors
    for cb in task_callbacks():
        for i in range(0, 400, 64):
            cb._update("val", CPU, {"logits": logits[i : i + 64], "targets": y[i : i + 64]}, (x[i : i + 64], yy[i : i + 64]))
        scalars, _ = cb._compute("val")
        for k, v in scalars.items():
            assert metrics[f"val/{k}"] == pytest.approx(v, abs=1e-6, nan_ok=True), (cb.task, k)
    assert {"val/AUROC", "val/AbsRel", "val/delta_1", "val/mask_AP", "val/bbox_AP50"} <= set(metrics)


def test_deterministic_mode_is_restored_and_counts_stay_exact():
    from sklearn import metrics as skm

    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        logits, y, batches = _cls_batches(c=3)
        scalars, snap = compute(CVMetricsCallback("classification", 3), batches)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    np.testing.assert_array_equal(snap["confmat"].numpy(), skm.confusion_matrix(y, logits.argmax(1)))
