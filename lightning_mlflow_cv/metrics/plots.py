"""Figures of metric results, drawn with torchmetrics' plot helpers on matplotlib's object API.

No pyplot: a :class:`~matplotlib.figure.Figure` made directly needs no GUI backend and holds no global state, so
rendering is safe on a training node and in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import LegendLocType
    from PIL import Image

__all__ = ["confusion_matrix_figure", "confusion_matrix_image", "curve_figure"]


def confusion_matrix_figure(
    matrix: Tensor, labels: Sequence[str], title: str, add_text: bool = True, max_size: float | None = None
) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class), one cell text per value when ``add_text``.

    The side is ``max(6, 0.45 * classes)`` inches (at most ``max_size``), so labels and cell text stay readable.

    Example::

        >>> import torch
        >>> fig = confusion_matrix_figure(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], "val confusion matrix")
        >>> fig.axes[0].get_title(), [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ('val confusion matrix', ['cat', 'dog'])
    """
    from matplotlib.figure import Figure
    from torchmetrics.utilities.plot import plot_confusion_matrix

    size = max(6.0, 0.45 * matrix.shape[0])
    if max_size is not None:
        size = min(size, max_size)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    plot_confusion_matrix(matrix, ax=ax, add_text=add_text, labels=list(labels))
    ax.set_title(title)
    return fig


def curve_figure(
    curve: Any,
    score: Any,
    axis_names: tuple[str, str],
    title: str,
    labels: Sequence[str] | None,
    legend_loc: LegendLocType,
) -> Figure:
    """A PR or ROC curve (one line per class when ``labels`` is given, with its AP/AUC in the legend).

    Args:
        curve: ``(x, y, thresholds)``, per class lists or tensors, as torchmetrics' curve metrics return them.
        score: The area under each curve (a tensor), shown beside its label.
        axis_names: The x and y axis titles.
        title: The plot title.
        labels: One name per class, or None for a single curve.
        legend_loc: Where the per-class legend goes (matplotlib's ``loc``).
    """
    from matplotlib.figure import Figure

    from lightning_mlflow_cv._compat.frameworks import plot_curve

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    plot_curve(curve, score, ax, axis_names, title, labels)
    if labels is not None:
        ax.legend(fontsize=7, loc=legend_loc)
    return fig


def confusion_matrix_image(
    matrix: Tensor, labels: Sequence[str], title: str, add_text: bool = True, max_side: int = 1200
) -> Image.Image:
    """A confusion matrix drawn directly with PIL (viridis cells, values as text, class labels): the cheap
    rendering for an image per epoch (a few ms where a matplotlib figure with cell text takes ~0.3-1 s).

    Rows are the true class, columns the predicted class (column labels written upwards above the grid).
    Cells are at most 64 px and the grid at most ``max_side`` px, so the cost is bounded for many classes.

    Example::

        >>> import torch
        >>> img = confusion_matrix_image(torch.tensor([[0.75, 0.25], [0.0, 1.0]]), ["cat", "dog"], "val")
        >>> img.mode, img.size[0] > 128 and img.size[1] > 128
        ('RGB', True)
    """
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    m = matrix.double().cpu().numpy()
    n = m.shape[0]
    lo, hi = float(m.min()), float(m.max())
    unit = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    cells = (colormaps["viridis"](unit)[..., :3] * 255).astype(np.uint8)
    cell = max(1, min(64, max_side // max(n, 1)))
    font = ImageFont.load_default(size=max(10, min(18, cell // 3)))
    label_w = int(max(font.getlength(str(lab)) for lab in labels)) + 12
    # load_default(size=) gives a FreeType font, or a fixed bitmap font (no .size) where Pillow lacks FreeType
    font_px = int(font.size) if isinstance(font, ImageFont.FreeTypeFont) else font.getbbox("Ag")[3]
    line = font_px + 6
    left, top = label_w + 4, 2 * line + label_w + 4
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 10), "white")
    img.paste(Image.fromarray(cells).resize((n * cell, n * cell), Image.Resampling.NEAREST), (left, top))
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title, fill="black", font=font)
    draw.text((4, 2 + line), "rows: true class, columns: predicted class", fill="dimgray", font=font)
    show_labels = cell >= font_px
    for i, lab in enumerate(labels if show_labels else []):
        y = top + i * cell + cell // 2
        draw.text((left - 6, y), str(lab), fill="black", font=font, anchor="rm")
        col = Image.new("L", (label_w, line), 0)
        ImageDraw.Draw(col).text((2, line // 2), str(lab), fill=255, font=font, anchor="lm")
        col = col.rotate(90, expand=True)
        img.paste(Image.new("RGB", col.size, "black"), (left + i * cell + (cell - line) // 2, top - label_w - 2), col)
    if add_text and cell >= 2 * font_px:
        for (i, j), v in np.ndenumerate(m):
            text = f"{v:.2f}" if matrix.is_floating_point() else str(int(v))
            fill = "white" if unit[i, j] < 0.5 else "black"
            draw.text(
                (left + j * cell + cell // 2, top + i * cell + cell // 2), text, fill=fill, font=font, anchor="mm"
            )
    return img
