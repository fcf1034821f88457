"""Pixels: images as the user sees them, captions and colours (pure drawing: no Trainer, no MLflow, no task).

- :func:`denormalize`, :func:`to_display`, :func:`display_size`: tensors as the user sees them.
- :func:`caption`, :func:`font_size_for`, :func:`border`, :func:`hstack`: text under an image that grows with
  the tiles, a coloured frame, images side by side; :func:`heatmap_overlay`: a class activation map over an image.

Everything returns ``uint8`` ``(3, H, W)`` CPU tensors, ready for ``MLflowCVLogger.log_image``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

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
