"""Synthetic shapes: squares, circles and triangles on a noisy background, with boxes, labels and masks.

Everything is generated in code from a seed (no download), so the detection and segmentation examples and the
tests run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Class names; index 0 is the background (torchvision detectors and the segmentation masks use it).
SHAPE_CLASSES: list[str] = ["background", "square", "circle", "triangle"]


@dataclass
class Shapes:
    """A generated set: ``images`` ``(N, 3, S, S)`` float in [0, 1], ``masks`` ``(N, S, S)`` long (0 background),
    and per image ``boxes`` ``(K, 4)`` xyxy float and ``labels`` ``(K,)`` long (1..3)."""

    images: Tensor
    masks: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]


def _shape_mask(kind: int, cx: float, cy: float, r: float, yy: Tensor, xx: Tensor) -> Tensor:
    if kind == 1:  # square
        return ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)
    if kind == 2:  # circle
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    # triangle, apex up: inside when below the apex and within the widening sides
    top = cy - r
    return (yy >= top) & (yy <= cy + r) & ((xx - cx).abs() <= (yy - top) / 2)


def make_shapes(n: int, size: int = 64, max_shapes: int = 3, seed: int = 0, noise: float = 0.08) -> Shapes:
    """Generate ``n`` images with 1..``max_shapes`` non-overlapping shapes of random class, size and colour.

    Example::

        >>> s = make_shapes(4, size=32, seed=1)
        >>> s.images.shape, s.masks.shape, s.boxes[0].shape[1]
        (torch.Size([4, 3, 32, 32]), torch.Size([4, 32, 32]), 4)
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    images = torch.empty(n, 3, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    all_boxes: list[Tensor] = []
    all_labels: list[Tensor] = []
    r_min, r_max = size * 0.09, size * 0.2
    for i in range(n):
        bg = torch.rand(3, 1, 1, generator=g) * 0.4
        img = bg + noise * torch.randn(3, size, size, generator=g)
        occupied = torch.zeros(size, size, dtype=torch.bool)
        boxes, labels = [], []
        k = int(torch.randint(1, max_shapes + 1, (1,), generator=g))
        for _ in range(k):
            for _attempt in range(20):
                kind = int(torch.randint(1, 4, (1,), generator=g))
                r = float(r_min + (r_max - r_min) * torch.rand(1, generator=g))
                cx = float(r + (size - 2 * r - 1) * torch.rand(1, generator=g))
                cy = float(r + (size - 2 * r - 1) * torch.rand(1, generator=g))
                m = _shape_mask(kind, cx, cy, r, yy, xx)
                if m.sum() < 9 or (m & occupied).any():
                    continue
                dilated = torch.nn.functional.max_pool2d(m[None, None].float(), 5, 1, 2)[0, 0].bool()
                occupied |= dilated
                colour = 0.55 + 0.45 * torch.rand(3, 1, 1, generator=g)
                img = torch.where(m, colour + noise * torch.randn(3, size, size, generator=g), img)
                masks[i][m] = kind
                ys, xs = torch.nonzero(m, as_tuple=True)
                boxes.append(torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32))
                labels.append(kind)
                break
        images[i] = img.clamp(0, 1)
        all_boxes.append(torch.stack(boxes) if boxes else torch.zeros(0, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    return Shapes(images, masks, all_boxes, all_labels)
