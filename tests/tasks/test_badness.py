"""Per-image badness of every task (what PredictionGridCallback's worst-mistakes grid ranks by), without a Trainer.

Each case is a batch in the task's step-output format with one deliberately bad image among good and slightly
wrong ones: the task's badness must rank that image worst and must not call a perfect image a mistake.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mlflow_cv import tasks
from lightning_mlflow_cv.tasks import PanelOptions

S = 8


def _box(x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
    return torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)


def _mask(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(1, S, S, dtype=torch.bool)
    m[0, rows, cols] = True
    return m


def classification() -> tuple[dict, int, int]:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 9.0], [0.5, 0.0, 0.4]])
    targets = torch.tensor([0, 1, 0, 2])  # image 2: confidently wrong; image 3: wrong, unsure; 0 and 1 right
    return {"logits": logits, "targets": targets}, 2, 0


def detection() -> tuple[dict, int, int]:
    gt = [{"boxes": _box(0, 0, 4, 4), "labels": torch.tensor([1])} for _ in range(3)]
    perfect = {"boxes": _box(0, 0, 4, 4), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    extra = {  # the right box plus a false positive: 1 - F1 = 1/3
        "boxes": torch.cat([_box(0, 0, 4, 4), _box(5, 5, 8, 8)]), "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 1]),
    }  # fmt: skip
    missed = {"boxes": _box(5, 5, 8, 8), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}  # wrong place
    return {"preds": [perfect, extra, missed], "targets": gt}, 2, 0


def instance() -> tuple[dict, int, int]:
    truth = {"boxes": _box(0, 0, 4, 4), "labels": torch.tensor([1]), "masks": _mask(slice(0, 4), slice(0, 4))}
    perfect = dict(truth, scores=torch.tensor([0.9]))
    # same box, but the mask covers the wrong half: a box-based score would call it right, mask IoU does not
    bad = dict(perfect, masks=_mask(slice(4, 8), slice(4, 8)))
    partial = dict(perfect, masks=_mask(slice(0, 4), slice(0, 3)))  # mask IoU 0.75: still a match
    return {"preds": [perfect, bad, partial], "targets": [truth] * 3}, 1, 0


def segmentation() -> tuple[dict, int, int]:
    t = torch.zeros(3, S, S, dtype=torch.long)
    t[:, :4] = 1
    t[:, 6:, 6:] = 2
    pred = t.clone()
    pred[1, 0, 0] = 0  # one pixel wrong
    pred[2] = 0  # everything background
    targets = t.clone()
    targets[0, 7, 7] = 255  # an ignore index: the prediction there (class 2) does not count
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    return {"logits": logits, "targets": targets}, 2, 0


def anomaly() -> tuple[dict, int, int]:
    scores = torch.tensor([0.1, 0.2, 0.45, 0.8, 0.9, 0.05])
    targets = torch.tensor([0, 0, 0, 1, 1, 1])  # image 5: an anomaly scored lowest of all (missed)
    return {"scores": scores, "targets": targets}, 5, 0


def depth() -> tuple[dict, int, int]:
    t = torch.linspace(1.0, 4.0, S * S).reshape(1, 1, S, S).repeat(3, 1, 1, 1)
    t[:, :, 0, :] = 0.0  # invalid row
    t[:, :, 1, 0] = float("nan")  # invalid pixel
    p = t.nan_to_num(0.0).clone()
    p[1] *= 1.05  # slightly off
    p[2] *= 3.0  # far off
    p[2, :, 0, :] = 100.0  # wrong where the target is invalid too: must not matter (see below)
    p[0, :, 0, :] = 1e6  # perfect on valid pixels, garbage on invalid ones: still perfect
    return {"preds": p, "targets": t}, 2, 0


CASES = {
    "classification": classification,
    "object-detection": detection,
    "instance-segmentation": instance,
    "semantic-segmentation": segmentation,
    "anomaly-detection": anomaly,
    "depth-estimation": depth,
}


@pytest.mark.parametrize("task", list(CASES))
def test_badness_ranks_the_deliberately_bad_image_worst(task):
    step_outputs, worst, perfect = CASES[task]()
    t = tasks.get_task(task)
    out = tasks.check_outputs(task, step_outputs)
    bad = t.badness(out, PanelOptions(decision_threshold=0.5))
    assert bad.ndim == 1 and len(bad) == len(out.targets)  # one value per image
    ranked = torch.nan_to_num(bad.double(), nan=-math.inf)
    assert int(ranked.argmax()) == worst, bad.tolist()
    assert ranked[worst] > 0  # a mistake
    assert not float(ranked[perfect]) > 0  # a perfect image is not one (NaN or <= 0)
    assert (ranked[worst] > torch.cat([ranked[:worst], ranked[worst + 1 :]])).all()  # strictly worst


def test_badness_values():
    """The figures behind the ranks: F1 and IoU arithmetic, ignore index and invalid pixels left out."""
    get = tasks.get_task

    def badness(task):
        return get(task).badness(tasks.check_outputs(task, CASES[task]()[0]), PanelOptions(decision_threshold=0.5))

    assert badness("object-detection").tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert badness("instance-segmentation").tolist() == pytest.approx([0.0, 1.0, 0.0])
    seg = badness("semantic-segmentation").tolist()
    assert seg[0] == 0.0 and 0 < seg[1] < 0.1 and seg[2] == pytest.approx(1 - (28 / 64) / 3)  # IoU 28/64, 0, 0
    assert badness("depth-estimation").tolist() == pytest.approx([0.0, 0.05, 2.0])
    assert badness("anomaly-detection").tolist() == pytest.approx([-0.4, -0.3, -0.05, -0.3, -0.4, 0.45])
    cls = badness("classification")
    assert math.isnan(cls[0]) and math.isnan(cls[1])
    assert float(cls[2]) == pytest.approx(torch.tensor([0.0, 0.0, 9.0]).softmax(0)[2].item())


def test_anomaly_without_a_threshold_centres_scores_at_zero():
    scores, targets = torch.tensor([-2.0, 1.0, -0.5]), torch.tensor([0, 0, 1])
    out = tasks.check_outputs("anomaly", {"scores": scores, "targets": targets})
    assert tasks.get_task("anomaly").badness(out, PanelOptions()).tolist() == [-2.0, 1.0, 0.5]


@pytest.mark.parametrize("task", list(CASES))
def test_take_keeps_the_chosen_images(task):
    """``take(out, [i])`` is image ``i`` alone: its panel is the panel of image ``i`` of the whole batch."""
    t = tasks.get_task(task)
    out = t.to_cpu(tasks.check_outputs(task, CASES[task]()[0]))
    img = torch.full((3, 4 * S, 4 * S), 100, dtype=torch.uint8)
    opts = PanelOptions(class_names=None, num_classes=3)
    for i in (0, 2):
        one = t.take(out, [i])
        assert torch.equal(t.panel(img, (S, S), one, 0, opts), t.panel(img, (S, S), out, i, opts))
