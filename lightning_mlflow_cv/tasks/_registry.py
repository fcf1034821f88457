"""The registry of CV tasks, name resolution and the two ways callbacks read outputs through a task.

- :func:`adapt_outputs` / :func:`check_outputs`: step outputs (``validation_step``/``test_step``, or
  ``output_fn(outputs, batch)``) in the task's dict format (``CVMetricsCallback``).
- :func:`check_model_outputs`: a model's ``forward`` output plus the batch's targets (the image callbacks),
  composed into the same typed output through the same checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_mlflow_cv.tasks._base import (
    CVTask,
    FormatProblem,
    OutputFn,
    describe,
    describe_short,
)

_TASKS: dict[str, CVTask] = {}
_ALIASES: dict[str, str] = {}


def register(task: CVTask | type[CVTask]) -> CVTask:
    """Make a task known to every callback (its module calls this at import).

    Raises:
        ValueError: when its name or an alias is taken.
    """
    inst = task() if isinstance(task, type) else task
    names = (inst.name, *inst.aliases)
    taken = [n for n in names if (n in _TASKS and _TASKS[n] is not inst) or n in _ALIASES]
    if not inst.name or taken:
        raise ValueError(f"register: task names {taken or [inst.name]} are empty or already registered.")
    _TASKS[inst.name] = inst
    for a in inst.aliases:
        _ALIASES[a] = inst.name
    return inst


def task_names() -> tuple[str, ...]:
    """The canonical names of the registered tasks, in registration order."""
    return tuple(_TASKS)


def task_aliases() -> dict[str, str]:
    """Short name -> canonical name."""
    return dict(_ALIASES)


def normalize_task(task: Any, who: str = "callback") -> str:
    """The canonical task name for ``task`` (short names allowed).

    Raises:
        ValueError: for an unknown task, naming the allowed values.

    Example::

        >>> normalize_task("detection")
        'object-detection'
    """
    if isinstance(task, str):
        if task in _TASKS:
            return task
        if task in _ALIASES:
            return _ALIASES[task]
    raise ValueError(
        f"{who}: `task` must be one of {list(_TASKS)} (or the short names {list(_ALIASES)}), got {task!r}. "
        f"Fix: pass e.g. task='classification'."
    )


def get_task(task: Any, who: str = "callback") -> CVTask:
    """The :class:`CVTask` for a name or short name (see :func:`normalize_task`)."""
    return _TASKS[normalize_task(task, who)]


# ----------------------------------------------------------------------------------------------
# step outputs
# ----------------------------------------------------------------------------------------------
def _step_error(who: str, t: CVTask, outputs: Any, problem: str) -> ValueError:
    return ValueError(
        f"{who}: the step outputs are not in the {t.name!r} format: {problem}. "
        f"Expected: {t.expected_format}. Got: {describe(outputs)}. "
        "Fix: return that dict from validation_step/test_step, or pass output_fn='pkg.module:fn' mapping "
        "(outputs, batch) to it."
    )


def check_outputs(task: str, outputs: Any, num_classes: int | None = None, who: str = "callback") -> Any:
    """Check step ``outputs`` (already in the convention) against ``task``'s format and return them typed.

    Args:
        task: A registered task name (or a short name).
        outputs: What ``validation_step``/``test_step`` (or ``output_fn``) returned.
        num_classes: When given (tasks with classes), the class dimension / label values must fit it.
        who: The callback's name, for messages.

    Raises:
        ValueError: naming ``who``, the expected format and what arrived.

    Example::

        >>> import torch
        >>> out = check_outputs("classification", {"logits": torch.zeros(4, 3), "targets": torch.zeros(4, dtype=torch.long)})
        >>> out.logits.shape
        torch.Size([4, 3])
    """
    t = get_task(task, who)
    if not isinstance(outputs, Mapping) or t.pred_key not in outputs or "targets" not in outputs:
        raise _step_error(who, t, outputs, f"expected a dict with keys {t.pred_key!r} and 'targets'")
    preds, targets = t.split_step_outputs(outputs)
    try:
        p = t.check_preds(preds, None, num_classes)
        y = t.check_targets(targets, t.batch_size(p), p, num_classes)
        return t.make_output(p, y, outputs)
    except FormatProblem as err:
        raise _step_error(who, t, outputs, err.text) from None


def adapt_outputs(
    task: str,
    outputs: Any,
    batch: Any = None,
    output_fn: OutputFn | None = None,
    num_classes: int | None = None,
    who: str = "callback",
) -> Any:
    """Map step ``outputs`` (through ``output_fn`` when given) to the checked format of ``task``.

    Raises:
        ValueError: when the result is not in the task's format (names ``who``, the format and what arrived).

    Example::

        out = adapt_outputs("classification", step_outputs, batch, output_fn=lambda o, b: {"logits": o, "targets": b[1]})
    """
    if output_fn is not None:
        name = getattr(output_fn, "__qualname__", repr(output_fn))
        mapped = output_fn(outputs, batch)
        try:
            return check_outputs(task, mapped, num_classes, who)
        except ValueError as err:
            raise ValueError(f"{err} (these came from output_fn {name})") from None
    if outputs is None:
        raise _step_error(
            who,
            get_task(task, who),
            outputs,
            "validation_step/test_step returned None (the callback reads predictions from the step's return value)",
        )
    return check_outputs(task, outputs, num_classes, who)


# ----------------------------------------------------------------------------------------------
# forward outputs + batch targets (image callbacks)
# ----------------------------------------------------------------------------------------------
_OUT_HINT = (
    "return that format from forward() in eval mode, or pass `output_transform='pkg.mod:fn'` that maps it "
    "(or `output_fn='pkg.mod:fn'` mapping (outputs, batch) to the task's dict)."
)
_TGT_HINT = "return that format as the batch's second element, or pass `batch_transform='pkg.mod:fn'`."


def _model_error(who: str, t: CVTask, part: str, got: Any, n: int, problem: str) -> ValueError:
    what, expected, hint = (
        ("model outputs", t.expected_output, _OUT_HINT)
        if part == "preds"
        else ("targets", t.expected_target, _TGT_HINT)
    )
    return ValueError(
        f"{who}: task={t.name!r} expects {what} as {expected} (N={n}), got {describe_short(got)}: {problem}. "
        f"Fix: {hint}"
    )


def check_model_preds(task: str, preds: Any, n: int, who: str = "callback") -> Any:
    """Check a model's ``forward`` output (the prediction part) for a batch of ``n`` images.

    Raises:
        ValueError: ``"<who>: task='...' expects model outputs as <format> (N=n), got <what>: <problem>. Fix: ..."``.
    """
    t = get_task(task, who)
    try:
        p = t.check_preds(preds, n, None)
    except FormatProblem as err:
        raise _model_error(who, t, "preds", preds, n, err.text) from None
    return p


def check_model_outputs(task: str, preds: Any, targets: Any, n: int, who: str = "callback") -> Any:
    """Check a model's ``forward`` output and the batch's targets for a batch of ``n``; return the typed output.

    Raises:
        ValueError: naming ``who``, which part is wrong (model outputs or targets), the expected format and
            what arrived.
    """
    t = get_task(task, who)
    p = t.align_for_display(check_model_preds(task, preds, n, who), targets)
    try:
        y = t.check_targets(targets, n, p, None)
    except FormatProblem as err:
        raise _model_error(who, t, "targets", targets, n, err.text) from None
    return t.make_output(p, y, {})
