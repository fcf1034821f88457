"""Image conversion for :meth:`~lightning_mlflow_cv.logger.MLflowCVLogger.log_image`: what arrives (tensor, array,
PIL image) as a PIL image, with one error naming the fix, and the characters an image key may hold."""

from __future__ import annotations

import re
from typing import Any

IMAGE_KEY_ILLEGAL = re.compile(r"[^a-zA-Z0-9_\-./ ]")


def to_pil_image(image: Any) -> Any:
    """Convert a tensor ``(C,H,W)``/``(H,W)``, an ndarray ``(H,W[,C])`` or a PIL image to a PIL image.

    Raises:
        ValueError: unsupported dtype, shape or value range, with what arrived and the fix.

    Example::

        >>> import numpy as np
        >>> to_pil_image(np.zeros((4, 5, 3), dtype=np.uint8)).size
        (5, 4)
    """
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):
        t = image.detach().cpu()
        if t.ndim == 3:
            if t.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"log_image: a tensor image must be (C, H, W) with C in (1, 3, 4), got shape {tuple(t.shape)}. "
                    "Permute channels-last tensors with `img.permute(2, 0, 1)`."
                )
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ValueError(
            f"log_image: unsupported image type {type(image).__name__}. Pass a torch.Tensor (C, H, W), "
            "a numpy array (H, W[, C]) or a PIL.Image."
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"log_image: expected an image of shape (H, W), (H, W, 3|4) or a tensor (C, H, W), got shape "
            f"{tuple(arr.shape)}. Log one image per call (use torchvision.utils.make_grid for batches)."
        )
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if arr.dtype == bool:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        finite = arr[np.isfinite(arr)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"log_image: float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]. Undo the "
                "normalisation (x * std + mean) or scale uint8 data by 1/255 before logging."
            )
        return Image.fromarray((np.nan_to_num(arr).clip(0, 1) * 255).round().astype(np.uint8))
    raise ValueError(f"log_image: unsupported dtype {arr.dtype}; use uint8 in [0, 255] or float in [0, 1].")
