"""The three new tasks' metrics against independent computations: pycocotools (mask and box AP),
scikit-learn (AUROC, AUPRC, best-threshold F1) and NumPy (depth formulas), through CVMetricsCallback."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback

CPU = SimpleNamespace(device=torch.device("cpu"))


def compute(cb: CVMetricsCallback, outputs: list, stage: str = "val"):
    for out in outputs:
        cb._update(stage, CPU, out, None)
    return cb._compute(stage)


# ----------------------------------------------------------------------------------------------
# instance segmentation vs pycocotools
# ----------------------------------------------------------------------------------------------
H = W = 40


def _blob(g: torch.Generator) -> torch.Tensor:
    """A random ellipse mask (H, W) bool."""
    cy, cx = (torch.rand(2, generator=g) * 24 + 8).tolist()
    ry, rx = (torch.rand(2, generator=g) * 6 + 3).tolist()
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _box(m: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _shift(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(m, shifts=(dy, dx), dims=(0, 1))


def random_instances(n: int = 10, seed: int = 0):
    """Images with 0-3 ground-truth blobs of classes 1-2; predictions shifted by 0-2 px, random scores, plus a
    false positive. Image 0 has no ground truth (only a false positive); image 1 has no predictions."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for i in range(n):
        k = 0 if i == 0 else int(torch.randint(1, 4, (1,), generator=g))
        gm = [_blob(g) for _ in range(k)]
        labels = torch.randint(1, 3, (k,), generator=g)
        pm = [_shift(m, *torch.randint(-2, 3, (2,), generator=g).tolist()) for m in gm] + [_blob(g)]
        plabels = torch.cat([labels, torch.randint(1, 3, (1,), generator=g)])
        if i == 1:
            pm, plabels = [], plabels[:0]
        targets.append({
            "boxes": torch.stack([_box(m) for m in gm]) if gm else torch.zeros(0, 4),
            "labels": labels, "masks": torch.stack(gm) if gm else torch.zeros(0, H, W, dtype=torch.bool),
        })  # fmt: skip
        pmasks = torch.stack(pm) if pm else torch.zeros(0, H, W, dtype=torch.bool)
        probs = pmasks.float() * 0.9 + 0.05  # probabilities, binarised at 0.5
        # predicted boxes are sub-pixel (as a box head regresses them): integer boxes put IoUs exactly on the COCO
        # thresholds, where torchmetrics and a direct COCOeval call can round differently
        jitter = torch.rand(len(pm), 4, generator=g) * 0.5
        preds.append({
            "boxes": torch.stack([_box(m) for m in pm]) + jitter if pm else torch.zeros(0, 4),
            "scores": torch.rand(len(pm), generator=g), "labels": plabels, "masks": probs[:, None],  # (K, 1, H, W)
        })  # fmt: skip
    return preds, targets


def coco_ap(preds, targets, iou_type: str) -> tuple[float, float]:
    """(AP 0.50:0.95, AP50) from pycocotools' COCOeval on the same instances."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        return r

    images, anns, dets, aid = [], [], [], 1
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i, "width": W, "height": H})
        for b, lab, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            ann = {"id": aid, "image_id": i, "category_id": lab, "iscrowd": 0,
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}  # fmt: skip
            if iou_type == "segm":
                ann.update(segmentation=rle(m), area=float(m.sum()))
            else:
                ann["area"] = (b[2] - b[0]) * (b[3] - b[1])
            anns.append(ann)
            aid += 1
        for b, s, lab, m in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), p["masks"]):
            det = {"image_id": i, "category_id": lab, "score": s}
            if iou_type == "segm":
                det["segmentation"] = rle(m[0] > 0.5)
            else:
                det["bbox"] = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            dets.append(det)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(4)]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def test_instance_mask_and_box_ap_match_pycocotools_with_an_empty_image():
    preds, targets = random_instances()
    cb = CVMetricsCallback("instance", num_classes=3, class_names=["bg", "disc", "blob"])
    scalars, snap = compute(cb, [{"preds": preds[:5], "targets": targets[:5]}, {"preds": preds[5:], "targets": targets[5:]}])
    mask_ap, mask_ap50 = coco_ap(preds, targets, "segm")
    bbox_ap, bbox_ap50 = coco_ap(preds, targets, "bbox")
    assert 0.05 < mask_ap < 0.95 and mask_ap != pytest.approx(bbox_ap, abs=1e-3)  # a real, non-trivial difference
    assert scalars["mask_AP"] == pytest.approx(mask_ap, abs=1e-6)
    assert scalars["mask_AP50"] == pytest.approx(mask_ap50, abs=1e-6)
    assert scalars["bbox_AP"] == pytest.approx(bbox_ap, abs=1e-6)
    assert scalars["bbox_AP50"] == pytest.approx(bbox_ap50, abs=1e-6)
    rows = {r["class"]: r for r in snap["table"]}
    assert set(rows) == {"disc", "blob"}
    for c, name in ((1, "disc"), (2, "blob")):
        only = [{k: v[p["labels"] == c] for k, v in p.items()} for p in preds]
        only_t = [{k: v[t["labels"] == c] for k, v in t.items()} for t in targets]
        assert rows[name]["mask_AP"] == pytest.approx(coco_ap(only, only_t, "segm")[0], abs=1e-6)
        assert rows[name]["bbox_AP50"] == pytest.approx(coco_ap(only, only_t, "bbox")[1], abs=1e-6)


def test_instance_needs_num_classes_and_checks_masks():
    with pytest.raises(ValueError, match=r"CVMetricsCallback: `num_classes` must be an int >= 2, got None"):
        CVMetricsCallback("instance-segmentation")
    preds, targets = random_instances(2)
    cb = CVMetricsCallback("instance", num_classes=3)
    bad = [dict(p, masks=p["masks"][:, 0, :10]) for p in preds]
    with pytest.raises(ValueError, match=r"'instance-segmentation' format: 'targets'\[0\]\['masks'\] are \(40, 40\) but 'preds'\[0\]\['masks'\] are \(10, 40\)"):
        compute(cb, [{"preds": bad, "targets": targets}])
    no_masks = [{k: v for k, v in p.items() if k != "masks"} for p in preds]
    with pytest.raises(ValueError, match=r"'preds'\[0\] must be a dict with keys \['boxes', 'scores', 'labels', 'masks'\].*Expected: .*\"masks\": \(K, H, W\)"):
        compute(cb, [{"preds": no_masks, "targets": targets}])


# ----------------------------------------------------------------------------------------------
# anomaly detection vs scikit-learn
# ----------------------------------------------------------------------------------------------
def anomaly_batches(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3).long()
    scores = torch.randn(n, generator=g) * 3 + 2.5 * y + 10  # raw units far outside [0, 1]
    scores[:20] = scores[:20].round()  # ties
    return scores, y, [{"scores": scores[i : i + 64], "targets": y[i : i + 64]} for i in range(0, n, 64)]


def test_anomaly_metrics_match_sklearn():
    from sklearn import metrics as skm

    scores, y, batches = anomaly_batches()
    cb = CVMetricsCallback("anomaly")
    scalars, snap = compute(cb, batches)
    s, t = scores.numpy().astype(np.float64), y.numpy()
    assert scalars["AUROC"] == pytest.approx(skm.roc_auc_score(t, s), abs=1e-6)
    assert scalars["AUPRC"] == pytest.approx(skm.average_precision_score(t, s), abs=1e-6)
    p, r, thr = skm.precision_recall_curve(t, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)[:-1]
    best = int(np.argmax(f1))
    assert scalars["best_threshold"] == pytest.approx(thr[best], abs=1e-5)  # in the model's own score units
    assert scalars["F1_at_best_threshold"] == pytest.approx(f1[best], abs=1e-6)
    assert scalars["F1_at_best_threshold"] == pytest.approx(skm.f1_score(t, s >= scalars["best_threshold"]), abs=1e-6)
    assert set(scalars) == {"AUROC", "AUPRC", "F1_at_best_threshold", "best_threshold"}
    assert "pr" in snap and "roc" in snap


def test_anomaly_single_class_is_nan_and_format_errors():
    cb = CVMetricsCallback("anomaly-detection")
    scalars, _ = compute(cb, [{"scores": torch.rand(5), "targets": torch.zeros(5, dtype=torch.long)}])
    assert np.isnan(scalars["AUROC"]) and np.isnan(scalars["AUPRC"])
    with pytest.raises(ValueError, match=r"task='anomaly-detection' has no classes, got num_classes=2"):
        CVMetricsCallback("anomaly", num_classes=2)
    cases = [
        ({"scores": torch.rand(4, 3), "targets": torch.zeros(4, dtype=torch.long)}, r"'scores' must be a float tensor of shape \(N,\)"),
        ({"scores": torch.rand(4), "targets": torch.tensor([0, 1, 2, 0])}, r"'targets' must be 0 \(normal\) or 1 \(anomalous\)"),
        ({"scores": torch.rand(4), "targets": torch.zeros(3, dtype=torch.long)}, r"'targets' has 3 values but 'scores' has 4"),
        ({"logits": torch.rand(4), "targets": torch.zeros(4, dtype=torch.long)}, r"expected a dict with keys 'scores' and 'targets'"),
    ]
    for out, match in cases:
        with pytest.raises(ValueError, match=r"^CVMetricsCallback: the step outputs are not in the 'anomaly-detection' format: " + match + r".*Expected: .*Got: dict"):
            compute(CVMetricsCallback("anomaly"), [out])


# ----------------------------------------------------------------------------------------------
# depth estimation vs NumPy
# ----------------------------------------------------------------------------------------------
def numpy_depth(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    valid = np.isfinite(target) & (target > 0)
    p, t = pred[valid].astype(np.float64), target[valid].astype(np.float64)
    p = np.maximum(p, 1e-6)
    ratio = np.maximum(p / t, t / p)
    return {
        "AbsRel": np.mean(np.abs(p - t) / t), "SqRel": np.mean((p - t) ** 2 / t),
        "RMSE": np.sqrt(np.mean((p - t) ** 2)), "RMSE_log": np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2)),
        "delta_1": np.mean(ratio < 1.25), "delta_2": np.mean(ratio < 1.25**2), "delta_3": np.mean(ratio < 1.25**3),
    }  # fmt: skip


def depth_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 1, 24, 32, generator=g) * 9 + 1
    pred = target * (1 + 0.3 * torch.randn(n, 1, 24, 32, generator=g)).clamp_min(0.05)
    target[:, :, :3] = 0.0  # invalid rows (no return)
    target[0, 0, 10, 10:20] = float("nan")
    pred[:, :, :3] = 1e6  # wildly wrong where invalid: must not count
    return pred, target


def test_depth_metrics_match_numpy_and_exclude_invalid_pixels():
    pred, target = depth_data()
    cb = CVMetricsCallback("depth")
    scalars, snap = compute(cb, [{"preds": pred[:4], "targets": target[:4]}, {"preds": pred[4:, 0], "targets": target[4:, 0]}])
    want = numpy_depth(pred.numpy(), target.numpy())
    for k, v in want.items():
        assert scalars[k] == pytest.approx(v, rel=1e-9), k
    assert scalars["RMSE"] < 100  # the 1e6 predictions on invalid pixels were excluded
    assert snap["summary"] == scalars


def test_depth_format_errors():
    pred, target = depth_data(2)
    cb = CVMetricsCallback("depth")
    with pytest.raises(ValueError, match=r"'targets' shape \(2, 24, 31\) does not match the predictions' \(2, 24, 32\)"):
        compute(cb, [{"preds": pred, "targets": target[..., :31]}])
    with pytest.raises(ValueError, match=r"'targets' must be a float tensor of shape \(N, 1, H, W\) or \(N, H, W\)"):
        compute(cb, [{"preds": pred, "targets": target.long()}])
