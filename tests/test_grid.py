"""Pure drawing/layout helpers of the image callbacks, without a Trainer."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv._draw import panels as _panels
from lightning_mlflow_cv.callbacks import _checks, _samples

WHO = "SomeCallback"


# ------------------------------------------------------------------------------------------------
# samples
# ------------------------------------------------------------------------------------------------
def test_pick_indices_is_seeded_distinct_and_bounded():
    a = _samples.pick_indices(1000, 8, seed=3)
    assert a == _samples.pick_indices(1000, 8, seed=3)
    assert a != _samples.pick_indices(1000, 8, seed=4)
    assert len(set(a)) == 8 and all(0 <= i < 1000 for i in a) and a == sorted(a)
    assert _samples.pick_indices(5, 8) == [0, 1, 2, 3, 4]
    assert _samples.pick_indices(0, 8) == []


def test_fixed_samples_map_style_uses_indices_and_collate():
    ds = TensorDataset(torch.arange(100).float().view(100, 1, 1, 1), torch.arange(100))
    loader = DataLoader(ds, batch_size=7, shuffle=True)
    x, y, idx = _samples.fixed_samples(WHO, loader, 5, seed=1)
    assert idx == _samples.pick_indices(100, 5, seed=1)
    assert y.tolist() == idx and x.shape == (5, 1, 1, 1)
    # indices restored from a checkpoint win over the seed; invalid ones are re-picked
    _, y2, idx2 = _samples.fixed_samples(WHO, loader, 5, seed=99, indices=[1, 2, 3])
    assert idx2 == [1, 2, 3] and y2.tolist() == [1, 2, 3]
    _, _, idx3 = _samples.fixed_samples(WHO, loader, 5, seed=1, indices=[1, 500])
    assert idx3 == idx


def test_fixed_samples_iterable_dataset_takes_first_batch():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(50):
                yield torch.full((1, 2, 2), float(i)), i

    x, y, idx = _samples.fixed_samples(WHO, DataLoader(Stream(), batch_size=10), 4, seed=0)
    assert idx is None and y.tolist() == [0, 1, 2, 3] and x.shape == (4, 1, 2, 2)


def test_split_batch_forms_and_error():
    assert _samples.split_batch(WHO, (1, 2, 3)) == (1, 2)
    assert _samples.split_batch(WHO, {"image": 1, "mask": 2}) == (1, 2)
    with pytest.raises(ValueError, match=r"SomeCallback: expected a batch .* got dict\{'foo'.*batch_transform"):
        _samples.split_batch(WHO, {"foo": torch.zeros(2)})


# ------------------------------------------------------------------------------------------------
# output conventions
# ------------------------------------------------------------------------------------------------
def _det(k: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.rand(k, 4), "scores": torch.rand(k), "labels": torch.randint(0, 3, (k,))}


@pytest.mark.parametrize(
    ("task", "good", "bad", "got"),
    [
        ("classification", torch.randn(2, 5), torch.randn(2, 5, 4, 4), r"Tensor\(2, 5, 4, 4\) float32"),
        ("classification", torch.randn(2, 5), torch.randn(3, 5), r"Tensor\(3, 5\)"),
        ("semantic-segmentation", torch.randn(2, 3, 4, 4), torch.randn(2, 3), r"Tensor\(2, 3\) float32"),
        ("object-detection", [_det(2), _det(0)], torch.randn(2, 4), r"Tensor\(2, 4\)"),
        ("object-detection", [_det(2), _det(0)], [{"boxes": torch.rand(2, 4)}] * 2, r"list\[2\] of dict\{'boxes'"),
        ("object-detection", [_det(2), _det(0)], [dict(_det(2), scores=torch.rand(3))] * 2, r"list\[2\]"),
    ],
)
def test_check_outputs(task, good, bad, got):
    out = _samples.check_outputs(WHO, task, good, 2)
    assert len(out) == 2
    expected = _samples.EXPECTED_OUTPUT[task].split(" ")[0]
    with pytest.raises(ValueError, match=rf"SomeCallback: task='{task}' expects model outputs as {expected}.*got {got}.*output_transform"):
        _samples.check_outputs(WHO, task, bad, 2)


@pytest.mark.parametrize(
    ("task", "good", "bad"),
    [
        ("classification", torch.tensor([1, 2]), torch.tensor([0.5, 1.0])),
        ("classification", [1, 2], torch.tensor([[1, 2]])),
        ("semantic-segmentation", torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4)),
        ("object-detection", [{"boxes": torch.rand(1, 4), "labels": torch.tensor([1])}] * 2, [{"boxes": torch.rand(1, 5), "labels": torch.tensor([1])}] * 2),
    ],
)
def test_check_targets(task, good, bad):
    assert len(_samples.check_targets(WHO, task, good, 2)) == 2
    with pytest.raises(ValueError, match=rf"SomeCallback: task='{task}' expects targets as .*got .*batch_transform"):
        _samples.check_targets(WHO, task, bad, 2)


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def test_argument_checks():
    with pytest.raises(ValueError, match=r"SomeCallback: `task` must be one of .*'classification'.*got 'detect'"):
        _checks.check_task(WHO, "detect")
    # one registry of task names: the short names work in every callback
    assert _checks.check_task(WHO, "detection") == "object-detection"
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"SomeCallback: `n` must be an int >= 1, got"):
            _checks.check_int(WHO, "n", bad)
    assert _checks.check_int(WHO, "n", None, allow_none=True) is None
    assert _checks.check_mean_std(WHO, 0.5, 0.25) == ((0.5,), (0.25,))
    with pytest.raises(ValueError, match=r"both `mean` and `std` or neither"):
        _checks.check_mean_std(WHO, (0.5,), None)
    with pytest.raises(ValueError, match=r"same length, got 3 and 1"):
        _checks.check_mean_std(WHO, (0.5, 0.5, 0.5), (0.2,))
    with pytest.raises(ValueError, match=r"every `std` value must be > 0"):
        _checks.check_mean_std(WHO, (0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"`mean` must be a number or a sequence"):
        _checks.check_mean_std(WHO, "abc", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"`mean` must not be empty"):
        _checks.check_mean_std(WHO, (), ())


def test_resolve_callable(tmp_path, monkeypatch):
    (tmp_path / "my_adapters.py").write_text("def to_logits(out):\n    return out['logits']\nVALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = _checks.resolve_callable(WHO, "output_transform", "my_adapters:to_logits")
    assert fn({"logits": 7}) == 7
    assert _checks.resolve_callable(WHO, "output_transform", len) is len
    assert _checks.resolve_callable(WHO, "output_transform", None) is None
    with pytest.raises(ValueError, match=r"`output_transform` must be a callable or an import path .*got 'my_adapters.to_logits'"):
        _checks.resolve_callable(WHO, "output_transform", "my_adapters.to_logits")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz'"):
        _checks.resolve_callable(WHO, "output_transform", "no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"module 'my_adapters' has no attribute 'nope'"):
        _checks.resolve_callable(WHO, "output_transform", "my_adapters:nope")
    with pytest.raises(ValueError, match=r"is a int, not a callable"):
        _checks.resolve_callable(WHO, "output_transform", "my_adapters:VALUE")
    sys.modules.pop("my_adapters", None)


def test_resolve_module_lists_close_matches():
    m = torch.nn.Module()
    m.features = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 3))
    assert isinstance(_checks.resolve_module(WHO, m, "features.2"), torch.nn.Conv2d)
    with pytest.raises(ValueError, match=r"`target_layer`='feature.2' is not a submodule of Module\. Close matches: \['features.2'"):
        _checks.resolve_module(WHO, m, "feature.2")
    with pytest.raises(ValueError, match=r"No close matches\..*'features.0', 'features.2'"):
        _checks.resolve_module(WHO, m, "zzzzzz")


# ------------------------------------------------------------------------------------------------
# pixels and panels
# ------------------------------------------------------------------------------------------------
def test_denormalize():
    x = torch.tensor([[[0.0, 1.0]], [[-1.0, 2.0]]])  # (2, 1, 2)
    out = _pixels.denormalize(x, mean=(0.5, 0.2), std=(0.25, 0.1))
    assert torch.allclose(out, torch.tensor([[[0.5, 0.75]], [[0.1, 0.4]]]))
    assert _pixels.denormalize(x, (0.5,), (0.25,)).shape == x.shape  # one value broadcast to all channels
    assert torch.equal(_pixels.denormalize(torch.tensor([[[0, 255]]], dtype=torch.uint8)), torch.tensor([[[0.0, 1.0]]]))
    mm = _pixels.denormalize(torch.tensor([[[-2.0, 0.0, 2.0]]]))  # no stats, out of range -> min-max
    assert torch.allclose(mm, torch.tensor([[[0.0, 0.5, 1.0]]]))
    with pytest.raises(ValueError, match=r"mean/std have 2 values but the images have 3 channels"):
        _pixels.denormalize(torch.zeros(3, 2, 2), (0.1, 0.2), (1.0, 1.0))


def test_display_size_and_to_display():
    assert _pixels.display_size(8, 8) == (96, 96)
    assert _pixels.display_size(30, 20) == (120, 80)
    assert _pixels.display_size(100, 200) == (100, 200)
    assert _pixels.display_size(1000, 500) == (256, 128)
    img = _pixels.to_display(torch.zeros(1, 8, 8), (0.5,), (1.0,))
    assert img.shape == (3, 96, 96) and img.dtype == torch.uint8 and int(img[0, 0, 0]) == 128
    big = _pixels.to_display(torch.rand(3, 512, 384), None, None)
    assert big.shape == (3, 256, 192)


def test_classification_panel_marks_wrong_predictions():
    img = torch.zeros(3, 96, 96, dtype=torch.uint8)
    right = _panels.classification_panel(img, target=3, pred=3, score=0.9, class_names=None)
    wrong = _panels.classification_panel(img, target=3, pred=5, score=0.9, class_names=None)
    assert right.shape == wrong.shape == (3, 96 + 2 * 15 + 4, 96)
    red = torch.tensor(_pixels.RED, dtype=torch.uint8).view(3, 1)
    assert torch.equal(wrong[:, 0, :], red.expand(3, 96))  # red frame
    assert torch.equal(right[:, :96], img)  # no frame
    caption = wrong[:, 96:]
    is_red = (caption[0] > 200) & (caption[1] < 80)
    assert is_red.any() and not ((right[:, 96:][0] > 200) & (right[:, 96:][1] < 80)).any()


def test_detection_panel_draws_truth_and_thresholded_predictions():
    img = torch.zeros(3, 96, 96, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    pred = {
        "boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.9, 0.2]),
        "labels": torch.tensor([2, 2]),
    }
    panel = _panels.detection_panel(img, (32, 32), target, pred, score_threshold=0.5)
    assert panel.shape == (3, 96 + 19, 96 * 2 + 2)
    left, right = panel[:, :96, :96], panel[:, :96, 98:]
    # truth box scaled by 3 (32 -> 96): its edge at x=6..30, y=6
    assert left[:, 6, 6:30].any() and not left[:, 50:90, 50:90].any()
    # the 0.9 box (scaled to 60..90) is drawn; the 0.2 box is not
    assert right[:, 60, 60:90].any() and not right[:, 1:14, 1:14].any()


def test_segmentation_panel_and_overlay():
    img = torch.zeros(3, 96, 96, dtype=torch.uint8)
    target = torch.zeros(16, 16, dtype=torch.long)
    target[:8] = 1
    pred = torch.ones(16, 16, dtype=torch.long)
    panel = _panels.segmentation_panel(img, target, pred, num_classes=2, background_class=0)
    assert panel.shape == (3, 96 + 19, 96 * 3 + 4)
    truth = panel[:, :96, 98:194]
    assert truth[:, :48].any() and not truth[:, 48:].any()  # background class stays uncoloured
    overlay = _panels.overlay_mask(img, torch.full((16, 16), 255), num_classes=2)  # ignore index: nothing drawn
    assert not overlay.any()


@pytest.mark.parametrize("n", [4, 8, 9, 16, 32])
def test_default_grid_is_landscape_so_mlflow_image_card_shows_all_of_it(n):
    """MLflow 3.17's image card draws an image in a square box under the run name, in a body ~250 px tall at the
    default card size: a portrait 4x4 grid of captioned digits (~256 px tall) overflowed it (tests/browser_check.py)."""
    panels = [torch.zeros(3, 150, 128, dtype=torch.uint8)] * n  # a 128-px digit tile with its caption
    _, h, w = _panels.make_image_grid(panels).shape
    assert 1.4 <= w / h <= 3.5, (n, h, w)


def test_make_image_grid_pads_mixed_sizes():
    panels = [torch.zeros(3, 10, 20, dtype=torch.uint8), torch.zeros(3, 30, 5, dtype=torch.uint8)] * 2
    grid = _panels.make_image_grid(panels, nrow=2, padding=4)
    assert grid.shape == (3, 2 * 30 + 3 * 4, 2 * 20 + 3 * 4) and grid.dtype == torch.uint8
    assert _panels.make_image_grid(panels, nrow=4).shape == (3, 30 + 8, 4 * 20 + 5 * 4)
    with pytest.raises(ValueError, match="no panels"):
        _panels.make_image_grid([])


def test_heatmap_overlay_follows_the_map():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    cam = torch.zeros(4, 4)
    cam[0, 0] = 1.0
    out = _pixels.heatmap_overlay(img, cam, alpha=1.0)
    assert out.shape == (3, 32, 32)
    hot, cold = out[:, 0, 0].float(), out[:, 31, 31].float()
    assert hot[0] > 100 and cold[2] > 100  # red at the peak, blue far away (jet colormap)


# ------------------------------------------------------------------------------------------------
# running top-k of the worst predictions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 16])
def test_worst_k_equals_a_brute_force_sort_and_holds_at_most_k(k):
    """Differential against sorting the whole stream: the same items in the same order (ties: earlier first);
    NaN, inf and values <= 0 are never kept; ``make`` is asked only for entrants, never more than k per batch."""
    g = torch.Generator().manual_seed(k)
    top = _samples.WorstK(k)
    stream: list[tuple[float, int]] = []
    made = 0
    for _ in range(30):
        n = int(torch.randint(1, 12, (1,), generator=g))
        bad = torch.randint(-3, 6, (n,), generator=g).double() / 4  # coarse values: many ties
        bad[torch.rand(n, generator=g) < 0.2] = float("nan")
        bad[torch.rand(n, generator=g) < 0.05] = float("inf")
        base = len(stream)
        stream += [(float(v), base + i) for i, v in enumerate(bad.tolist())]

        def make(idx, base=base):
            nonlocal made
            assert len(idx) <= k and idx == sorted(idx)
            made += len(idx)
            return [base + i for i in idx]

        top.push(bad, make)
        assert len(top) <= k
    keep = [(v, i) for v, i in stream if math.isfinite(v) and v > 0]
    expected = sorted(keep, key=lambda t: (-t[0], t[1]))[:k]
    assert top.items() == expected
    assert made < len(keep) or k >= len(keep)  # later batches offer only what beats the k-th


def test_font_grows_with_the_tile():
    assert [_pixels.font_size_for(n) for n in (64, 96, 128, 200, 1000)] == [12, 12, 16, 24, 24]
    small = _pixels.caption(torch.zeros(3, 128, 128, dtype=torch.uint8), ["pred: 7 (93%)"], font_size=12)
    large = _pixels.caption(torch.zeros(3, 128, 128, dtype=torch.uint8), ["pred: 7 (93%)"], font_size=16)
    assert small.shape[1] == 128 + 15 + 4 and large.shape[1] == 128 + 19 + 4
    ink = (large[:, 128:] < 128).any(0)  # dark text pixels on the white strip: the label fits, wider than at 12 px
    cols = ink.any(0).nonzero()
    assert 60 < int(cols.max()) < 126
