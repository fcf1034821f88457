"""What the image callbacks share, besides drawing (which is :mod:`lightning_mlflow_cv._draw`).

The callbacks :class:`~lightning_mlflow_cv.callbacks.prediction_grid.PredictionGridCallback`,
:class:`~lightning_mlflow_cv.callbacks.augmentation_samples.AugmentationSamplesCallback` and
:class:`~lightning_mlflow_cv.callbacks.gradcam.GradCAMCallback` are a guard plus calls into this module and into
the drawing modules (their arguments are checked in :mod:`lightning_mlflow_cv.callbacks._checks`):

- :func:`pick_indices`, :func:`fixed_samples`: a fixed, seeded sample set;
- :func:`split_batch`, :func:`check_outputs`, :func:`check_targets`: the output conventions of
  :mod:`lightning_mlflow_cv.tasks`, with one error message format (callback, expected format, what arrived);
- :class:`WorstK`: a running top-k of the worst predictions of an epoch (the prediction grid's worst-mistakes grid).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mlflow_cv import tasks as _tasks

#: Canonical task names (from :mod:`lightning_mlflow_cv.tasks`).
TASKS: tuple[str, ...] = _tasks.TASKS


Task = str


#: What each task's model output must look like (used in error messages).
EXPECTED_OUTPUT = {t: _tasks.get_task(t).expected_output for t in TASKS}


#: What each task's targets must look like.
EXPECTED_TARGET = {t: _tasks.get_task(t).expected_target for t in TASKS}


def pick_indices(n_total: int, k: int, seed: int = 0) -> list[int]:
    """``min(k, n_total)`` distinct indices in ``[0, n_total)``, the same for the same seed, sorted.

    Example::

        >>> pick_indices(10, 3, seed=0) == pick_indices(10, 3, seed=0)
        True
    """
    if n_total <= 0:
        return []
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_total, generator=g)[: min(k, n_total)].tolist())


describe = _tasks.describe_short


_IMAGE_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")


_TARGET_KEYS = ("target", "targets", "label", "labels", "mask", "masks", "y")


def split_batch(who: str, batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch ``(x, y, ...)`` or a dict with image and target keys.

    Raises:
        ValueError: when neither form matches, naming what arrived.
    """
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y
    raise ValueError(
        f"{who}: expected a batch `(images, targets, ...)` or a dict with one of {_IMAGE_KEYS} and one of "
        f"{_TARGET_KEYS}, got {describe(batch)}. Fix: return such batches from the dataloader, or pass "
        "`batch_transform='pkg.mod:fn'` mapping your batch to (images, targets)."
    )


def images_of(x: Any) -> list[Tensor]:
    """The images of a batch as a list of ``(C, H, W)`` tensors (a stacked tensor or a list of tensors)."""
    if isinstance(x, Tensor) and x.ndim == 4:
        return list(x)
    if isinstance(x, Tensor) and x.ndim == 3:
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, Tensor) and t.ndim == 3 for t in x):
        return list(x)
    raise ValueError(f"expected images as a Tensor (N, C, H, W) or a list of (C, H, W) tensors, got {describe(x)}")


def _cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def check_outputs(who: str, task: str, out: Any, n: int) -> Any:
    """Check a model output against the task convention for a batch of ``n``; return it (detached, CPU).

    Raises:
        ValueError: naming ``who``, the expected format and what arrived.
    """
    return _cpu(_tasks.check_model_preds(task, out, n, who))


def check_targets(who: str, task: str, y: Any, n: int) -> Any:
    """Check targets against the task convention for a batch of ``n``; return them on the CPU.

    Raises:
        ValueError: naming ``who``, the expected format and what arrived.
    """
    from lightning_mlflow_cv.tasks._base import FormatProblem
    from lightning_mlflow_cv.tasks._registry import _model_error

    t = _tasks.get_task(task, who)
    try:
        return _cpu(t.check_targets(y, n, None, None))
    except FormatProblem as err:
        raise _model_error(who, t, "targets", y, n, err.text) from None


class WorstK:
    """The ``k`` worst predictions seen so far, kept as batches arrive (a running top-k), best first by badness.

    :meth:`push` takes a batch's per-image badness (higher = worse; NaN, inf and values <= 0 are not mistakes
    and never kept) and asks ``make(indices)`` for the items of only those images that enter the top ``k``,
    so at most ``k`` items (e.g. CPU copies of images and their outputs) are held whatever the number of
    batches. Ties keep the earlier image.

    Example::

        >>> top = WorstK(2)
        >>> top.push(torch.tensor([0.2, float("nan"), 0.9]), lambda idx: [f"a{i}" for i in idx])
        >>> top.push(torch.tensor([0.5, -1.0]), lambda idx: [f"b{i}" for i in idx])
        >>> [(round(b, 2), item) for b, item in top.items()]
        [(0.9, 'a2'), (0.5, 'b0')]
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self._kept: list[tuple[float, int, Any]] = []
        self._seen = 0

    def __len__(self) -> int:
        return len(self._kept)

    def push(self, badness: Tensor, make: Callable[[list[int]], Sequence[Any]]) -> None:
        """Offer one batch: ``badness`` ``(N,)``; ``make(indices)`` returns one item per index, in order."""
        b = badness.detach().double().cpu().reshape(-1)
        order = self._seen
        self._seen += b.numel()
        ok = torch.isfinite(b) & (b > 0)
        if self._kept and len(self._kept) >= self.k:
            ok &= b > self._kept[-1][0]  # must beat the current k-th (ties: the earlier image stays)
        idx = torch.nonzero(ok).flatten()
        if not idx.numel():
            return
        picked: list[int] = idx[b[idx].argsort(descending=True, stable=True)][: self.k].sort().values.tolist()
        new = [(float(b[i]), order + i, item) for i, item in zip(picked, make(picked), strict=True)]
        self._kept = sorted(self._kept + new, key=lambda t: (-t[0], t[1]))[: self.k]

    def items(self) -> list[tuple[float, Any]]:
        """``(badness, item)`` of the kept predictions, worst first."""
        return [(b, item) for b, _, item in self._kept]


def is_map_style(dataset: Any) -> bool:
    """True when ``dataset`` supports ``len()`` and indexing (not an ``IterableDataset``)."""
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        return False
    try:
        len(dataset)
    except TypeError:
        return False
    return hasattr(dataset, "__getitem__")


def fixed_batch(loader: Any, k: int, seed: int, indices: Sequence[int] | None = None) -> tuple[Any, list[int] | None]:
    """``(batch, indices)``: a fixed sample set from ``loader``, collated as in ``validation_step``, at a cost
    bounded by ``k``.

    Map-style datasets: ``k`` seeded indices (or the given ``indices``, e.g. restored from a checkpoint, when
    still valid) fetched with ``dataset[i]`` and collated with the loader's ``collate_fn``. Iterable datasets: the
    first batch (``indices`` is then None; the caller keeps its first ``k`` samples).
    """
    from torch.utils.data import default_collate

    dataset = getattr(loader, "dataset", None)
    if dataset is not None and is_map_style(dataset) and len(dataset) > 0:
        n = len(dataset)
        idx = list(indices) if indices and all(0 <= i < n for i in indices) else pick_indices(n, k, seed)
        collate = getattr(loader, "collate_fn", None) or default_collate
        return collate([dataset[i] for i in idx]), idx
    return next(iter(loader)), None


def fixed_samples(who: str, loader: Any, k: int, seed: int, indices: Sequence[int] | None = None,
                  batch_transform: Callable[[Any], Any] | None = None) -> tuple[Any, Any, list[int] | None]:  # fmt: skip
    """``(images, targets, indices)`` of a fixed sample set from ``loader`` (see :func:`fixed_batch`)."""
    batch, idx = fixed_batch(loader, k, seed, indices)
    x, y = split_batch(who, batch_transform(batch) if batch_transform else batch)
    if idx is None:
        x, y = x[:k], y[:k]
    return x, y, idx
