"""Output adapters: the per-task output conventions, output_fn import paths and their error messages."""

from __future__ import annotations

import pytest
import torch

from lightning_mlflow_cv.tasks import (
    adapt_outputs,
    check_outputs,
    describe,
    get_task,
    load_output_fn,
    normalize_task,
)
from lightning_mlflow_cv.tasks.classification import ClassificationOutput
from lightning_mlflow_cv.tasks.object_detection import DetectionOutput
from lightning_mlflow_cv.tasks.semantic_segmentation import SegmentationOutput

WHO = "CVMetricsCallback"


def cls_out(n=4, c=3):
    return {"logits": torch.randn(n, c), "targets": torch.randint(0, c, (n,))}


def seg_out(n=2, c=3, h=5, w=6):
    return {"logits": torch.randn(n, c, h, w), "targets": torch.randint(0, c, (n, h, w))}


def det_out(n=2):
    pred = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    tgt = {"boxes": torch.tensor([[0.0, 0, 5, 5], [1.0, 1, 3, 3]]), "labels": torch.tensor([1, 2])}
    return {"preds": [dict(pred) for _ in range(n)], "targets": [dict(tgt) for _ in range(n)]}


TASKS = ("classification", "object-detection", "semantic-segmentation")
EXPECTED_FORMAT = {t: get_task(t).expected_format for t in TASKS}
VALID = {"classification": cls_out, "object-detection": det_out, "semantic-segmentation": seg_out}
TYPES = {
    "classification": ClassificationOutput,
    "object-detection": DetectionOutput,
    "semantic-segmentation": SegmentationOutput,
}


def to_cv_format(outputs, batch):
    """An output_fn for the import-path tests: (logits tensor, (x, y) batch) -> classification dict."""
    return {"logits": outputs, "targets": batch[1]}


NOT_CALLABLE = 42


@pytest.mark.parametrize("task", TASKS)
def test_valid_outputs_pass_and_are_typed(task):
    out = check_outputs(task, VALID[task](), num_classes=3, who=WHO)
    assert isinstance(out, TYPES[task])


def test_classification_targets_become_long_and_values_are_kept():
    raw = {"logits": torch.randn(3, 2), "targets": torch.tensor([0, 1, 1], dtype=torch.int32)}
    out = check_outputs("classification", raw)
    assert out.targets.dtype == torch.long
    assert torch.equal(out.logits, raw["logits"])


@pytest.mark.parametrize(("alias", "task"), [("detection", "object-detection"), ("segmentation", "semantic-segmentation")])
def test_short_task_names(alias, task):
    assert normalize_task(alias) == task
    assert isinstance(check_outputs(alias, VALID[task]()), TYPES[task])


@pytest.mark.parametrize("bad", ["detect", "Classification", None, 3])
def test_unknown_task_names_allowed_values(bad):
    with pytest.raises(ValueError, match=r"CVMetricsCallback: `task` must be one of \['classification'"):
        normalize_task(bad, WHO)


def _bad_cases():
    c = cls_out()
    s = seg_out()
    d = det_out()
    yield "classification", torch.randn(4, 3), "expected a dict with keys 'logits' and 'targets'"
    yield "classification", {"logits": torch.randn(4, 3)}, "expected a dict with keys 'logits' and 'targets'"
    yield "classification", {**c, "logits": torch.randn(4)}, r"'logits' must be a float tensor of shape \(N, C\)"
    yield "classification", {**c, "logits": torch.ones(4, 3, dtype=torch.long)}, "'logits' must be a float tensor"
    yield "classification", {**c, "targets": torch.zeros(4, 3)}, "'targets' must be an integer tensor"
    yield "classification", {**c, "targets": torch.zeros(5, dtype=torch.long)}, r"does not match the logits' \(4,\)"
    yield "classification", {**c, "logits": torch.randn(4, 7)}, "'logits' has 7 classes in dim 1, num_classes=3"
    yield "semantic-segmentation", {**s, "logits": torch.randn(2, 3, 5)}, r"shape \(N, C, H, W\)"
    yield "semantic-segmentation", {**s, "targets": torch.zeros(2, 4, 6, dtype=torch.long)}, "does not match"
    yield "semantic-segmentation", {**s, "targets": torch.zeros(2, 3, 5, 6, dtype=torch.long)}, r"\(N, H, W\)"
    yield "object-detection", {"boxes": 1}, "expected a dict with keys 'preds' and 'targets'"
    yield "object-detection", {**d, "preds": torch.zeros(2, 4)}, "'preds' must be a list with one dict per image"
    yield "object-detection", {**d, "preds": [{"boxes": torch.zeros(1, 4)}] * 2}, r"'preds'\[0\] must be a dict"
    bad_boxes = [{"boxes": torch.zeros(1, 5), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)}] * 2
    yield "object-detection", {**d, "preds": bad_boxes}, r"'boxes'\] must be a float tensor of shape \(K, 4\)"
    bad_scores = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(2), "labels": torch.ones(1, dtype=torch.long)}] * 2
    yield "object-detection", {**d, "preds": bad_scores}, r"'scores'\] must be a float tensor of shape \(1,\)"
    bad_labels = [{"boxes": torch.zeros(2, 4), "labels": torch.ones(2)}] * 2
    yield "object-detection", {**d, "targets": bad_labels}, r"'labels'\] must be an integer tensor of shape \(2,\)"
    yield "object-detection", {**d, "targets": d["targets"][:1]}, "2 'preds' dicts but 1 'targets' dicts"
    out_of_range = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([5])}] * 2
    yield "object-detection", {**d, "targets": out_of_range}, r"values outside \[0, 2\] \(num_classes=3\)"


@pytest.mark.parametrize(("task", "outputs", "problem"), list(_bad_cases()))
def test_wrong_formats_name_callback_expected_format_and_what_arrived(task, outputs, problem):
    with pytest.raises(ValueError, match=problem) as err:
        check_outputs(task, outputs, num_classes=3, who=WHO)
    msg = str(err.value)
    assert msg.startswith(f"{WHO}: the step outputs are not in the {task!r} format")
    assert f"Expected: {EXPECTED_FORMAT[task]}" in msg
    assert f"Got: {describe(outputs)}" in msg
    assert "output_fn" in msg  # names the fix


def test_none_outputs_say_the_step_returned_nothing():
    with pytest.raises(ValueError, match="validation_step/test_step returned None"):
        adapt_outputs("classification", None, who=WHO)


def test_describe_shows_types_and_shapes():
    text = describe({"logits": torch.zeros(2, 3), "targets": [torch.zeros(2, dtype=torch.long)], "x": None})
    assert "Tensor(shape=(2, 3), dtype=float32)" in text
    assert "list[len=1: Tensor(shape=(2,), dtype=int64)]" in text
    assert "'x': None" in text


@pytest.mark.parametrize("spec", [f"{__name__}:to_cv_format", f"{__name__}.to_cv_format", to_cv_format])
def test_output_fn_by_import_path_or_callable(spec):
    fn = load_output_fn(spec, WHO)
    assert fn is to_cv_format
    logits = torch.randn(3, 4)
    out = adapt_outputs("classification", logits, (None, torch.tensor([0, 1, 3])), fn, num_classes=4, who=WHO)
    assert torch.equal(out.logits, logits)
    assert out.targets.tolist() == [0, 1, 3]


def test_logits_and_batch_targets_ready_made_output_fn():
    from lightning_mlflow_cv.tasks import logits_and_batch_targets

    fn = load_output_fn("lightning_mlflow_cv.tasks:logits_and_batch_targets", WHO)
    assert fn is logits_and_batch_targets
    logits, y = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    for outputs, batch in [(logits, (None, y)), ({"logits": logits}, {"image": None, "mask": y})]:
        out = adapt_outputs("semantic-segmentation", outputs, batch, fn, who=WHO)
        assert out.logits is logits and torch.equal(out.targets, y)
    with pytest.raises(ValueError, match=r"'targets' must be an integer tensor.*came from output_fn logits_and_batch_targets"):
        adapt_outputs("classification", torch.randn(2, 3), {"x": 1}, fn, who=WHO)


def test_output_fn_none_is_none():
    assert load_output_fn(None) is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' cannot be imported"),
        (f"{__name__}:nope", "has no attribute 'nope'"),
        (f"{__name__}:NOT_CALLABLE", "names a int, not a function"),
        ("justaname", "is not of the form 'pkg.module:fn'"),
        ("", "must be a callable or an import path"),
        (3, "must be a callable or an import path"),
    ],
)
def test_output_fn_errors(spec, match):
    with pytest.raises(ValueError, match=f"CVMetricsCallback: `output_fn`.*{match}"):
        load_output_fn(spec, WHO)


def test_output_fn_result_in_the_wrong_format_names_the_function():
    with pytest.raises(ValueError, match=r"'targets' must be an integer tensor.*came from output_fn to_cv_format"):
        adapt_outputs("classification", torch.randn(2, 3), (None, torch.zeros(2)), to_cv_format, who=WHO)
