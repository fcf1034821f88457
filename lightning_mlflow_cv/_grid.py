"""Pure drawing and layout helpers for the image callbacks (no Trainer, no MLflow).

The callbacks :class:`~lightning_mlflow_cv.callbacks.prediction_grid.PredictionGridCallback`,
:class:`~lightning_mlflow_cv.callbacks.augmentation_samples.AugmentationSamplesCallback` and
:class:`~lightning_mlflow_cv.callbacks.gradcam.GradCAMCallback` are a guard plus calls into this module:

- :func:`pick_indices`: a fixed, seeded sample set.
- :func:`split_batch`, :func:`check_outputs`, :func:`check_targets`: the output conventions of
  :mod:`lightning_mlflow_cv.tasks`, with one error message format (callback, expected format, what arrived).
- :func:`denormalize`, :func:`to_display`, :func:`display_size`: tensors as the user sees them.
- :func:`classification_panel`, :func:`detection_panel`, :func:`segmentation_panel`, :func:`make_image_grid`.
- :func:`font_size_for`: caption text that grows with the tiles; :class:`WorstK`: a running top-k of the worst
  predictions of an epoch (the prediction grid's worst-mistakes grid).

Everything returns ``uint8`` ``(3, H, W)`` CPU tensors, ready for ``MLflowCVLogger.log_image``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

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

GREEN = (40, 180, 60)
RED = (230, 30, 30)
WHITE = (255, 255, 255)
#: Distinct colours for classes (tab10 + tab10 darker), cycled for more classes.
PALETTE: list[tuple[int, int, int]] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (16, 60, 90), (128, 64, 7), (22, 80, 22), (107, 20, 20), (74, 52, 95),
    (70, 43, 38), (114, 60, 97), (64, 64, 64), (94, 95, 17), (12, 95, 104),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# argument checks shared by the callbacks
# ---------------------------------------------------------------------------------------------
def check_task(who: str, task: Any) -> str:
    """The canonical name of ``task`` (short names allowed) or a ValueError naming the allowed values."""
    return _tasks.normalize_task(task, who)


@overload
def check_positive_int(who: str, name: str, value: Any, allow_none: Literal[False] = False) -> int: ...
@overload
def check_positive_int(who: str, name: str, value: Any, allow_none: bool) -> int | None: ...
def check_positive_int(who: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    """Return ``value`` when it is an int >= 1 (or None when allowed), else raise ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{who}: `{name}` must be an int >= 1{extra}, got {value!r}. Fix: e.g. {name}=4.")
    return value


def check_mean_std(who: str, mean: Any, std: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Validate the normalisation statistics: both or neither, equal length, std > 0."""

    def as_tuple(name: str, v: Any) -> tuple[float, ...] | None:
        if v is None:
            return None
        if isinstance(v, (int, float)):
            return (float(v),)
        try:
            out = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise ValueError(
                f"{who}: `{name}` must be a number or a sequence of numbers (one per channel), got {v!r}. "
                f"Fix: e.g. {name}=(0.485, 0.456, 0.406)."
            ) from None
        if not out:
            raise ValueError(f"{who}: `{name}` must not be empty. Fix: one value per channel, or None.")
        return out

    m, s = as_tuple("mean", mean), as_tuple("std", std)
    if (m is None) != (s is None):
        raise ValueError(
            f"{who}: pass both `mean` and `std` or neither, got mean={mean!r}, std={std!r}. "
            "Fix: the values your Normalize transform uses."
        )
    if m is not None and s is not None:
        if len(m) != len(s):
            raise ValueError(f"{who}: `mean` and `std` need the same length, got {len(m)} and {len(s)}: {m}, {s}.")
        if any(v <= 0 for v in s):
            raise ValueError(f"{who}: every `std` value must be > 0, got {s}.")
    return m, s


def resolve_callable(who: str, name: str, fn: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """A callable given directly or by import path ``"package.module:function"`` (so YAML can name it).

    Raises:
        ValueError: malformed path, module or attribute not found, or not callable.

    Example::

        >>> resolve_callable("X", "output_transform", "math:sqrt")(4.0)
        2.0
    """
    if fn is None or callable(fn):
        return fn
    if not isinstance(fn, str) or fn.count(":") != 1 or not all(fn.split(":")):
        raise ValueError(
            f"{who}: `{name}` must be a callable or an import path 'package.module:function', got {fn!r}. "
            f"Fix: e.g. {name}='my_project.adapters:to_logits'."
        )
    mod_name, attr = fn.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"{who}: `{name}`={fn!r}: cannot import module {mod_name!r} ({e}). Fix the import path."
        ) from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{who}: `{name}`={fn!r}: module {mod_name!r} has no attribute {attr!r}. Fix the name.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{who}: `{name}`={fn!r} is a {type(obj).__name__}, not a callable.")
    return obj


# ---------------------------------------------------------------------------------------------
# samples and output conventions
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------
def denormalize(x: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
    """Undo ``Normalize(mean, std)`` on ``(C, H, W)`` or ``(N, C, H, W)`` and clamp to [0, 1].

    Without ``mean``/``std``: ``uint8`` is scaled by 1/255, floats already in [0, 1] are kept, and anything
    else is min-max scaled per image so it can still be shown.

    Example::

        >>> denormalize(torch.zeros(1, 2, 2), mean=(0.5,), std=(0.25,)).unique().item()
        0.5
    """
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        c = x.shape[-3]
        m = torch.tensor(mean, dtype=x.dtype)
        s = torch.tensor(std, dtype=x.dtype)
        if len(m) == 1 and c > 1:
            m, s = m.expand(c), s.expand(c)
        if len(m) != c:
            raise ValueError(
                f"denormalize: mean/std have {len(m)} values but the images have {c} channels. "
                "Fix: pass one mean/std value per channel."
            )
        return (x * s.view(-1, 1, 1) + m.view(-1, 1, 1)).clamp(0, 1)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        flat = x.reshape(-1, *x.shape[-3:]) if x.ndim == 4 else x.unsqueeze(0)
        lo = flat.amin(dim=(1, 2, 3), keepdim=True)
        hi = flat.amax(dim=(1, 2, 3), keepdim=True)
        out = (flat - lo) / (hi - lo).clamp_min(1e-12)
        return out.reshape(x.shape)
    return x.clamp(0, 1)


def to_rgb_uint8(img: Tensor) -> Tensor:
    """``(C, H, W)`` float in [0, 1] (C = 1, 3 or 4) as ``uint8`` RGB ``(3, H, W)``."""
    if img.dtype != torch.uint8:
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] == 4:
        img = img[:3]
    elif img.shape[0] != 3:
        raise ValueError(f"expected an image with 1, 3 or 4 channels, got shape {tuple(img.shape)}")
    return img.contiguous()


def display_size(h: int, w: int, min_size: int = 96, max_size: int = 256) -> tuple[int, int]:
    """The size an ``h x w`` image is shown at: tiny images upscaled by a whole factor until the longer side is at
    least ``min_size``; large ones downscaled so it is at most ``max_size``.

    Example::

        >>> display_size(8, 8)
        (96, 96)
        >>> display_size(1000, 500)
        (256, 128)
    """
    long = max(h, w)
    if long < min_size:
        f = math.ceil(min_size / long)
        return h * f, w * f
    if long > max_size:
        s = max_size / long
        return max(1, round(h * s)), max(1, round(w * s))
    return h, w


def resize_image(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a ``uint8`` ``(3, H, W)`` image: nearest when enlarging (crisp pixels), antialiased when shrinking."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    up = size[0] >= img.shape[-2]
    x = img.unsqueeze(0).float()
    if up:
        out = torch.nn.functional.interpolate(x, size=size, mode="nearest")
    else:
        out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)[0]


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an integer mask ``(H, W)``."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()


def to_display(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, min_size: int = 96,
               max_size: int = 256) -> Tensor:  # fmt: skip
    """A model input ``(C, H, W)`` as a displayable ``uint8`` RGB image at :func:`display_size`."""
    img = to_rgb_uint8(denormalize(x, mean, std))
    return resize_image(img, display_size(img.shape[-2], img.shape[-1], min_size, max_size))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption(img: Tensor, lines: Sequence[str], color: tuple[int, int, int] = (0, 0, 0), font_size: int = 12) -> Tensor:
    """Append a white strip with text ``lines`` below a ``uint8`` ``(3, H, W)`` image (text cut to fit the width)."""
    import numpy as np
    from PIL import Image, ImageDraw

    w = img.shape[-1]
    line_h = font_size + 3
    strip = Image.new("RGB", (w, line_h * len(lines) + 4), WHITE)
    draw = ImageDraw.Draw(strip)
    font = _font(font_size)
    for i, text in enumerate(lines):
        t = text
        while t and draw.textlength(t, font=font) > w - 4:
            t = t[:-2] + "…" if len(t) > 2 else ""
        draw.text((2, 2 + i * line_h), t, fill=color, font=font)
    s = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)
    return torch.cat([img, s], dim=1)


def font_size_for(tile: int) -> int:
    """Caption text size for tiles whose longer side is ``tile`` pixels: an eighth of it, within [12, 24], so a
    label stays legible when the grid is shown scaled down.

    Example::

        >>> font_size_for(96), font_size_for(128), font_size_for(512)
        (12, 16, 24)
    """
    return max(12, min(24, round(tile / 8)))


def border(img: Tensor, color: tuple[int, int, int], width: int = 3) -> Tensor:
    """Draw a ``width``-pixel frame of ``color`` inside a ``uint8`` ``(3, H, W)`` image."""
    out = img.clone()
    c = torch.tensor(color, dtype=torch.uint8).view(3, 1, 1)
    out[:, :width, :] = c
    out[:, -width:, :] = c
    out[:, :, :width] = c
    out[:, :, -width:] = c
    return out


def class_name(i: int, class_names: Sequence[str] | None) -> str:
    """``class_names[i]`` when known, else the id as text."""
    if class_names is not None and 0 <= i < len(class_names):
        return str(class_names[i])
    return str(i)


def hstack(images: Sequence[Tensor], gap: int = 2) -> Tensor:
    """Place ``uint8`` ``(3, H, W)`` images side by side (white gap, heights padded)."""
    h = max(t.shape[1] for t in images)
    parts: list[Tensor] = []
    for i, t in enumerate(images):
        if t.shape[1] < h:
            t = torch.cat([t, torch.full((3, h - t.shape[1], t.shape[2]), 255, dtype=torch.uint8)], dim=1)
        if i:
            parts.append(torch.full((3, h, gap), 255, dtype=torch.uint8))
        parts.append(t)
    return torch.cat(parts, dim=2)


# ---------------------------------------------------------------------------------------------
# panels, one per sample
# ---------------------------------------------------------------------------------------------
def classification_panel(img: Tensor, target: int | None, pred: int | None = None, score: float | None = None,
                         class_names: Sequence[str] | None = None, font_size: int = 12) -> Tensor:  # fmt: skip
    """One sample: the image with ``pred`` (and its probability) and ``target`` below.

    A wrong prediction gets a red frame and red text; a right one green text. With ``pred=None`` only the
    label is shown (augmentation samples).
    """
    if pred is None:
        text = class_name(int(target), class_names) if target is not None else ""
        return caption(img, [text], font_size=font_size)
    wrong = target is not None and int(pred) != int(target)
    p = class_name(int(pred), class_names) + (f" ({score:.0%})" if score is not None else "")
    lines = [f"pred: {p}", f"true: {class_name(int(target), class_names)}" if target is not None else "true: ?"]
    if wrong:
        return caption(border(img, RED), ["x " + lines[0], lines[1]], color=RED, font_size=font_size)
    return caption(img, lines, color=GREEN, font_size=font_size)


def _scaled_boxes(boxes: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    return boxes.float() * torch.tensor([sx, sy, sx, sy])


def draw_boxes(img: Tensor, boxes: Tensor, labels: Tensor, src_size: tuple[int, int], scores: Tensor | None = None,
               class_names: Sequence[str] | None = None) -> Tensor:  # fmt: skip
    """``draw_bounding_boxes`` with boxes given in ``src_size`` pixel coordinates, coloured by class."""
    from torchvision.utils import draw_bounding_boxes

    if boxes.numel() == 0:
        return img
    b = _scaled_boxes(boxes, src_size, (img.shape[-2], img.shape[-1]))
    b[:, 0::2] = b[:, 0::2].clamp(0, img.shape[-1] - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, img.shape[-2] - 1)
    texts = [
        class_name(int(lbl), class_names) + (f" {float(s):.2f}" if scores is not None else "")
        for lbl, s in zip(labels.tolist(), scores.tolist() if scores is not None else [None] * len(labels), strict=True)
    ]
    colors = [PALETTE[int(lbl) % len(PALETTE)] for lbl in labels.tolist()]
    try:  # white text on a filled label background (torchvision >= 0.20), readable on any image
        return draw_bounding_boxes(img, b, labels=texts, colors=colors, width=2, label_colors="white", fill_labels=True)
    except TypeError:  # pragma: no cover - older torchvision
        return draw_bounding_boxes(img, b, labels=texts, colors=colors, width=2)


def detection_panel(img: Tensor, src_size: tuple[int, int], target: Mapping[str, Tensor] | None,
                    pred: Mapping[str, Tensor] | None = None, score_threshold: float = 0.5,
                    class_names: Sequence[str] | None = None, font_size: int = 12) -> Tensor:  # fmt: skip
    """Ground-truth boxes (left) beside predicted boxes with ``score >= score_threshold`` (right).

    ``img`` is the display image; boxes are in ``src_size`` (the model input's ``(H, W)``) coordinates.
    """
    left = img
    if target is not None:
        left = draw_boxes(img, target["boxes"], target["labels"], src_size, None, class_names)
        left = caption(left, [f"truth: {len(target['boxes'])}"], font_size=font_size)
    if pred is None:
        return left
    keep = pred["scores"] >= score_threshold
    right = draw_boxes(img, pred["boxes"][keep], pred["labels"][keep], src_size, pred["scores"][keep], class_names)
    right = caption(right, [f"pred>={score_threshold:g}: {int(keep.sum())}"], font_size=font_size)
    return hstack([left, right])


def overlay_mask(img: Tensor, mask: Tensor, num_classes: int, background_class: int | None = None,
                 alpha: float = 0.5) -> Tensor:  # fmt: skip
    """``draw_segmentation_masks`` of an integer mask (resized to the image); ids outside ``[0, num_classes)``
    (e.g. an ignore index of 255) and ``background_class`` stay uncoloured."""
    from torchvision.utils import draw_segmentation_masks

    m = resize_mask(mask, (img.shape[-2], img.shape[-1]))
    ids = [c for c in range(num_classes) if c != background_class]
    if not ids:
        return img
    masks = torch.stack([m == c for c in ids])
    colors = [PALETTE[c % len(PALETTE)] for c in ids]
    return draw_segmentation_masks(img, masks, alpha=alpha, colors=colors)


def segmentation_panel(img: Tensor, target: Tensor | None, pred: Tensor | None, num_classes: int,
                       background_class: int | None = None, alpha: float = 0.5,
                       font_size: int = 12) -> Tensor:  # fmt: skip
    """Image | ground-truth overlay | predicted overlay, with the predicted mask's pixel accuracy."""
    parts = [caption(img, ["image"], font_size=font_size)]
    if target is not None:
        truth = overlay_mask(img, target, num_classes, background_class, alpha)
        parts.append(caption(truth, ["truth"], font_size=font_size))
    if pred is not None:
        text = "pred"
        if target is not None and target.shape == pred.shape:
            valid = (target >= 0) & (target < num_classes)
            if valid.any():
                text += f" (acc {float((pred[valid] == target[valid]).float().mean()):.0%})"
        predicted = overlay_mask(img, pred, num_classes, background_class, alpha)
        parts.append(caption(predicted, [text], font_size=font_size))
    return hstack(parts)


#: The least width / height of the default grid layout: MLflow's image card shows an image centred in a square box
#: under the run's name, in a card body shorter than it is wide (about 250 px at the default card size), so only a
#: landscape grid shows whole there (a 4x4 grid of captioned tiles is taller than wide and overflowed it).
GRID_MIN_ASPECT = 1.4


def grid_columns(n: int, panel_h: int, panel_w: int, min_aspect: float = GRID_MIN_ASPECT, padding: int = 4) -> int:
    """The fewest panels per row that lay ``n`` panels of ``panel_h x panel_w`` out at least ``min_aspect`` times
    wider than tall (``n`` in one row when none does).

    Example::

        >>> grid_columns(16, 150, 128), grid_columns(8, 150, 128), grid_columns(4, 150, 128), grid_columns(1, 9, 9)
        (6, 4, 4, 1)
    """
    for cols in range(1, n + 1):
        rows = math.ceil(n / cols)
        if cols * (panel_w + padding) + padding >= min_aspect * (rows * (panel_h + padding) + padding):
            return cols
    return max(1, n)


def make_image_grid(panels: Sequence[Tensor], nrow: int | None = None, padding: int = 4) -> Tensor:
    """``torchvision.utils.make_grid`` of ``uint8`` panels of any sizes (padded to the largest, white background).

    ``nrow`` (panels per row) defaults to :func:`grid_columns`: at least :data:`GRID_MIN_ASPECT` times wider than
    tall, so MLflow's image card shows the whole grid. Returns ``uint8`` ``(3, H, W)``.
    """
    from torchvision.utils import make_grid

    if not panels:
        raise ValueError("make_image_grid: no panels to lay out.")
    h = max(p.shape[1] for p in panels)
    w = max(p.shape[2] for p in panels)
    padded = []
    for p in panels:
        canvas = torch.full((3, h, w), 255, dtype=torch.uint8)
        canvas[:, : p.shape[1], : p.shape[2]] = p
        padded.append(canvas)
    nrow = nrow or grid_columns(len(panels), h, w, padding=padding)
    return make_grid(torch.stack(padded), nrow=nrow, padding=padding, pad_value=255)


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


def heatmap_overlay(img: Tensor, cam: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Blend a class activation map ``(h, w)`` (any range; negatives clipped, scaled to [0, 1]) over a ``uint8``
    ``(3, H, W)`` image with a matplotlib colormap."""
    import matplotlib

    cam = cam.detach().float().cpu().clamp_min(0)
    cam = cam / cam.max().clamp_min(1e-12)
    cam = torch.nn.functional.interpolate(cam[None, None], size=tuple(img.shape[-2:]), mode="bilinear",
                                          align_corners=False)[0, 0].clamp(0, 1)  # fmt: skip
    rgb = torch.from_numpy(matplotlib.colormaps[cmap](cam.numpy())[..., :3]).permute(2, 0, 1).float() * 255
    out = (1 - alpha) * img.float() + alpha * rgb
    return out.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# fixed samples from a dataloader
# ---------------------------------------------------------------------------------------------
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


def resolve_module(who: str, model: torch.nn.Module, path: Any, arg: str = "target_layer") -> torch.nn.Module:
    """The submodule of ``model`` at dotted ``path`` (as in ``model.named_modules()``).

    Raises:
        ValueError: when there is none, listing close matches (difflib) and some valid names.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
        >>> type(resolve_module("X", m, "0")).__name__
        'Conv2d'
    """
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(path, str) and path in names:
        return model.get_submodule(path)
    close = difflib.get_close_matches(str(path), names, n=5, cutoff=0.5)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    hint = f" Close matches: {close}." if close else " No close matches."
    some = convs[-5:] or names[:10]
    raise ValueError(
        f"{who}: `{arg}`={path!r} is not a submodule of {type(model).__name__}.{hint} Fix: a dotted name from "
        f"`[n for n, _ in model.named_modules()]`, e.g. one of {some} (usually the last conv layer)."
    )
