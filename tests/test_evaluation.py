"""evaluate on a logged servable model against oracle networks, checked with scikit-learn, a confusion matrix and
pycocotools (the classification path also runs end to end in tests/callbacks/test_model_registry.py)."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from conftest import skip_needs_newer
from mlflow import MlflowClient


# ------------------------------------------------------------------------------------------------
# evaluate: the task metrics (the classification path runs end to end in tests/callbacks/test_model_registry.py)
# ------------------------------------------------------------------------------------------------
class _Lookup(torch.nn.Module):
    """An oracle network: for an image whose first pixel holds the raw value i, it returns ``table[i]``. The
    predictions are therefore known exactly, whatever the rest of the image holds."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x[:, 0, 0, 0] * 255  # the pyfunc scaled the uint8 pixel to [0, 1] (mean 0, std 1)
        rows = torch.arange(self.table.shape[0], dtype=x.dtype)
        onehot = ((idx[:, None] - rows[None]).abs() < 0.5).to(x.dtype)
        return torch.tensordot(onehot, self.table, dims=1)


def _log_oracle(tmp_path, uri: str, table: torch.Tensor, postprocess: str, size: int) -> tuple[str, str]:
    """Log `_Lookup(table)` as the package's servable pyfunc (what ModelRegistryCallback logs); (model uri, run id)."""
    import inspect
    import shutil

    from lightning_mlflow_cv._compat import mlflow_api as _compat
    from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
    from lightning_mlflow_cv._shipping import export as _export
    from lightning_mlflow_cv._shipping import pyfunc as _pyfunc

    if not _compat.has_models_from_code():  # the package's own < 2.13 pyfunc path is covered by tests/test_compat.py
        skip_needs_newer("mlflow", "2.13", "logs the oracle as a models-from-code pyfunc")
    if not _compat_frameworks.has_torch_export():
        skip_needs_newer("torch", "2.2", "saves the oracle as a torch.export archive")
    work = tmp_path / "oracle"
    work.mkdir()
    net = _export.export_pt2(_Lookup(table), torch.zeros(2, 1, size, size), work / "network.pt2")
    cfg = {"mean": [0.0], "std": [1.0], "size": [size, size], "channels": 1, "layout": "NCHW", "postprocess": postprocess}
    (work / _pyfunc.CONFIG_FILE).write_text(json.dumps(cfg))
    (work / "model_code.py").write_text(_pyfunc.MODEL_CODE)
    shutil.copy(_pyfunc.__file__, work / "lmc_pyfunc.py")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("evaluate")
        with mlflow.start_run() as run:
            where = {"name": "model"} if "name" in inspect.signature(mlflow.pyfunc.log_model).parameters else {"artifact_path": "model"}
            info = mlflow.pyfunc.log_model(
                **where, python_model=str(work / "model_code.py"), code_paths=[str(work / "lmc_pyfunc.py")],
                artifacts={"network": str(net), "config": str(work / _pyfunc.CONFIG_FILE)},
            )  # fmt: skip
    finally:
        mlflow.set_tracking_uri(None)
    return info.model_uri, run.info.run_id


def _images(n: int, size: int) -> torch.Tensor:
    """uint8 (n, 1, size, size) images whose first pixel is the image's index (the oracle's key), noise elsewhere."""
    x = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return x


def test_evaluate_classification_matches_scikit_learn(tmp_path):
    from sklearn import metrics as skm

    from lightning_mlflow_cv.evaluation import evaluate

    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    logits = torch.tensor(
        [[3.0, 0.5, 0.1], [0.2, 2.5, 0.3], [0.1, 0.4, 1.9], [1.2, 1.0, 0.2], [0.3, 0.2, 0.9], [0.1, 1.5, 1.4],
         [2.0, 0.1, 2.2], [0.5, 0.4, 0.3]]
    )  # fmt: skip
    labels = torch.tensor([0, 1, 2, 1, 2, 2, 0, 0])  # predictions 0 1 2 0 2 1 2 0: five right
    model_uri, run_id = _log_oracle(tmp_path, uri, logits, "softmax", 4)
    x = _images(len(labels), 4)
    batches = [(x[:5], labels[:5]), (x[5:], labels[5:])]
    got = evaluate(model_uri, batches, task="classification", tracking_uri=uri)

    probs = logits.softmax(-1).numpy()
    y, pred = labels.numpy(), probs.argmax(1)
    assert pred.tolist() == [0, 1, 2, 0, 2, 1, 2, 0]
    expected = {
        "accuracy_score": skm.accuracy_score(y, pred),
        "f1_score": skm.f1_score(y, pred, average="weighted"),
        "precision_score": skm.precision_score(y, pred, average="weighted"),
        "recall_score": skm.recall_score(y, pred, average="weighted"),
        "roc_auc_macro": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
    }
    assert expected["accuracy_score"] == pytest.approx(5 / 8)
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
        assert logged[k] == pytest.approx(v, abs=1e-6), k


def test_evaluate_segmentation_matches_a_confusion_matrix_over_the_dataset(tmp_path):
    from lightning_mlflow_cv.evaluation import evaluate

    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    pred = torch.tensor(
        [[[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
         [[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
         [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]
    )  # fmt: skip
    target = torch.tensor(
        [[[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]],
         [[2, 2, 2, 0], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
         [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]]
    )  # fmt: skip
    table = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 4  # logits whose argmax is `pred`
    model_uri, run_id = _log_oracle(tmp_path, uri, table, "masks", 4)
    x = _images(3, 4)
    got = evaluate(model_uri, [(x[:2], target[:2]), (x[2:], target[2:])], task="segmentation", tracking_uri=uri)

    # the standard definition (PASCAL VOC, Cityscapes; CVMetricsCallback's val/mIoU): per class, intersection
    # over union of the pixels of the whole dataset, then the mean over classes
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in range(3)]
    assert ious == pytest.approx([36 / 41, 4 / 7, 3 / 5])
    expected = {"mean_iou": sum(ious) / 3, "pixel_accuracy": (p == t).mean()}
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
        assert logged[f"eval/{k}"] == pytest.approx(v, abs=1e-6), k


def test_evaluate_detection_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from lightning_mlflow_cv.evaluation import evaluate

    uri = f"sqlite:///{tmp_path / 'eval.db'}"

    def anchor(box, label, score):  # one (4 + 2 classes) row: the class logit whose sigmoid is `score`
        logits = [-12.0, -12.0]
        logits[label] = math.log(score / (1 - score))
        return [*box, *logits]

    none = anchor([0, 0, 1, 1], 0, 1e-4)  # below the 0.05 score threshold: dropped
    table = torch.tensor(
        [
            [anchor([2, 2, 12, 12], 0, 0.9), anchor([20, 20, 30, 30], 1, 0.6), none],  # a hit and a false positive
            [anchor([6, 6, 16, 16], 1, 0.8), anchor([40, 40, 50, 50], 0, 0.3), none],  # IoU 0.68 hit; a miss
        ]
    )
    targets = [
        {"boxes": torch.tensor([[2.0, 2, 12, 12]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[5.0, 5, 15, 15], [18, 18, 28, 28]]), "labels": torch.tensor([1, 0])},
    ]
    model_uri, run_id = _log_oracle(tmp_path, uri, table, "boxes", 64)
    got = evaluate(model_uri, [(_images(2, 64), targets)], task="detection", tracking_uri=uri)

    # pycocotools (the COCO reference) on the same boxes, in its own xywh format
    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    gt = {"images": [{"id": i} for i in range(2)], "categories": [{"id": c} for c in range(2)], "annotations": []}
    for i, t in enumerate(targets):
        for b, c in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": c, "bbox": xywh(b),
                 "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
            )  # fmt: skip
    dets = [
        {"image_id": i, "category_id": int(torch.tensor(r[4:]).argmax()), "bbox": xywh(r[:4]),
         "score": float(torch.tensor(r[4:]).sigmoid().max())}
        for i, rows in enumerate(table.tolist()) for r in rows if torch.tensor(r[4:]).sigmoid().max() >= 0.05
    ]  # fmt: skip
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    expected = {"map": ev.stats[0], "map_50": ev.stats[1]}
    assert 0 < expected["map"] < expected["map_50"] < 1  # a set where the thresholds matter
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k
        assert logged[f"eval/{k}"] == pytest.approx(v, abs=1e-4), k


def test_evaluate_new_task_metrics_from_served_outputs():
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from lightning_mlflow_cv.tasks import get_task

    scores = [{"scores": np.array([0.1, 0.8, 0.4], np.float32)}, {"scores": np.array([0.3], np.float32)}]
    ys = [torch.tensor([0, 1, 1]), torch.tensor([0])]
    an = get_task("anomaly").served_metrics(scores, ys, None)
    assert an["AUROC"] == pytest.approx(roc_auc_score([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.3]))
    depth = get_task("depth").served_metrics([np.full((1, 4, 4), 2.0, np.float32)], [torch.tensor([[[[2.0, 0, 4.0, 2.0]] * 4]])], None)
    assert depth["AbsRel"] == pytest.approx((0 + 0.5 + 0) / 3) and depth["delta_1"] == pytest.approx(2 / 3)
    m = np.zeros((1, 8, 8), bool)
    m[0, 2:6, 2:6] = True
    inst = get_task("instance").served_metrics(
        [[{"boxes": np.array([[2, 2, 6, 6]], np.float32), "scores": np.array([0.9], np.float32), "labels": np.array([1]), "masks": m}]],
        [[{"boxes": torch.tensor([[2.0, 2, 6, 6]]), "labels": torch.tensor([1]), "masks": torch.from_numpy(m)}]],
        None,
    )
    assert inst["mask_AP"] == pytest.approx(1.0) and inst["bbox_AP50"] == pytest.approx(1.0)


def test_evaluate_rejects_unknown_task():
    from lightning_mlflow_cv.evaluation import evaluate

    with pytest.raises(ValueError, match=r"evaluate: `task` must be one of \['classification', .*'depth-estimation'\].*got 'ocr'"):
        evaluate("models:/m@champion", [], task="ocr")
