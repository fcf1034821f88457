"""Figures of metric results, drawn with torchmetrics' plot helpers on matplotlib's object API.

No pyplot: a :class:`~matplotlib.figure.Figure` made directly needs no GUI backend and holds no global state, so
rendering is safe on a training node and in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["confusion_matrix_figure", "curve_figure", "figure_to_array"]


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
    curve: Any, score: Any, axis_names: tuple[str, str], title: str, labels: Sequence[str] | None, legend_loc: str
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
    from torchmetrics.utilities.plot import plot_curve

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    plot_curve(curve, score=score, ax=ax, label_names=axis_names, name=title, labels=labels)
    if labels is not None:
        ax.legend(fontsize=7, loc=legend_loc)
    return fig


def figure_to_array(fig: Figure, dpi: float = 100.0) -> np.ndarray:
    """Render ``fig`` to an RGB ``uint8`` array ``(H, W, 3)`` in memory (Agg), without a PNG round trip.

    Example::

        >>> from matplotlib.figure import Figure
        >>> figure_to_array(Figure(figsize=(2, 1)), dpi=50).shape
        (50, 100, 3)
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
