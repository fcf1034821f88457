"""Depth estimation: dense depth ``(N, 1, H, W)`` against targets where 0/NaN mark invalid pixels; AbsRel, SqRel,
RMSE, RMSE_log and delta_1/2/3 over valid pixels; the served model returns the depth map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mlflow_cv._draw import pixels as _pixels
from lightning_mlflow_cv.tasks._base import (
    CVTask,
    FormatProblem,
    PanelOptions,
    is_float,
)
from lightning_mlflow_cv.tasks._registry import register

#: Keys of the depth metrics, in logging order.
DEPTH_KEYS = ("AbsRel", "SqRel", "RMSE", "RMSE_log", "delta_1", "delta_2", "delta_3")
#: Predictions are clamped to at least this value for the log and ratio metrics (RMSE_log, delta_k).
MIN_DEPTH = 1e-6


@dataclass(frozen=True)
class DepthOutput:
    """Checked depth outputs: ``preds`` and ``targets`` ``(N, H, W)`` float (target 0 or NaN: invalid)."""

    preds: Tensor
    targets: Tensor


def valid_mask(targets: Tensor) -> Tensor:
    """Pixels with a usable ground truth: finite and > 0."""
    return torch.isfinite(targets) & (targets > 0)


class DepthMetrics(Metric):
    """The standard monocular-depth errors over all valid pixels of all images (sum states: exact under DDP).

    With ``p`` the prediction and ``t`` the target over pixels where ``t`` is finite and > 0 (pooled over the
    dataset): ``AbsRel = mean(|p - t| / t)``, ``SqRel = mean((p - t)^2 / t)``, ``RMSE = sqrt(mean((p - t)^2))``,
    ``RMSE_log = sqrt(mean((log p - log t)^2))`` and ``delta_k = mean(max(p / t, t / p) < 1.25^k)``; ``p`` is
    clamped to at least :data:`MIN_DEPTH` in the log and ratio terms.

    Example::

        m = DepthMetrics()
        m.update(pred, target)      # (N, H, W) or (N, 1, H, W)
        m.compute()["AbsRel"]
    """

    full_state_update = False
    _SUMS = ("abs_rel", "sq_rel", "sq_err", "sq_log_err", "d1", "d2", "d3")
    count: Tensor
    abs_rel: Tensor
    sq_rel: Tensor
    sq_err: Tensor
    sq_log_err: Tensor
    d1: Tensor
    d2: Tensor
    d3: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in self._SUMS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, targets: Tensor) -> None:
        p, t = preds.detach().double().reshape(-1), targets.detach().double().reshape(-1)
        valid = valid_mask(t)
        p, t = p[valid], t[valid]
        diff = p - t
        pc = p.clamp_min(MIN_DEPTH)
        ratio = torch.maximum(pc / t, t / pc)
        self.count += valid.sum()
        self.abs_rel += (diff.abs() / t).sum()
        self.sq_rel += (diff**2 / t).sum()
        self.sq_err += (diff**2).sum()
        self.sq_log_err += ((pc.log() - t.log()) ** 2).sum()
        self.d1 += (ratio < 1.25).sum()
        self.d2 += (ratio < 1.25**2).sum()
        self.d3 += (ratio < 1.25**3).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)

        def mean(s: Tensor) -> Tensor:
            return s / n if n > 0 else nan

        return {
            "AbsRel": mean(self.abs_rel), "SqRel": mean(self.sq_rel), "RMSE": mean(self.sq_err).sqrt(),
            "RMSE_log": mean(self.sq_log_err).sqrt(), "delta_1": mean(self.d1), "delta_2": mean(self.d2),
            "delta_3": mean(self.d3),
        }  # fmt: skip


def depth_errors(preds: Tensor, targets: Tensor) -> Tensor:
    """Per image: AbsRel ``mean(|p - t| / t)`` over its valid pixels (target finite and > 0); NaN without any.

    Example::

        >>> t = torch.tensor([[[1.0, 2.0]], [[1.0, 0.0]], [[0.0, float("nan")]]])
        >>> depth_errors(torch.ones(3, 1, 2), t).tolist()
        [0.25, 0.0, nan]
    """
    p, t = preds.detach().double().reshape(len(preds), -1), targets.detach().double().reshape(len(targets), -1)
    valid = valid_mask(t)
    rel = torch.where(valid, (p - t).abs() / torch.where(valid, t, torch.ones_like(t)), torch.zeros_like(t))
    count = valid.sum(1)
    return torch.where(count > 0, rel.sum(1) / count.clamp_min(1), torch.full_like(rel[:, 0], float("nan")))


def _squeeze_channel(x: Tensor) -> Tensor:
    return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x


def colorize(values: Tensor, valid: Tensor, lo: float, hi: float, cmap: str) -> Tensor:
    """``(H, W)`` values as a ``uint8`` RGB image with a matplotlib colormap on ``[lo, hi]``; invalid pixels black."""
    import matplotlib

    v = ((values.double() - lo) / max(hi - lo, 1e-12)).clamp(0, 1).nan_to_num(0.0)
    rgb = torch.from_numpy(matplotlib.colormaps[cmap](v.numpy())[..., :3]).permute(2, 0, 1) * 255
    rgb = rgb.round().to(torch.uint8)
    return rgb * valid.to(torch.uint8)


def _value_range(values: Tensor) -> tuple[float, float]:
    """``(min, max)`` of the finite ``values``; ``(0, 1)`` when there are none."""
    values = values[torch.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.numel() else (0.0, 1.0)


def _target_view(t: Tensor, valid: Tensor, lo: float, hi: float, size: tuple[int, int], lines: list[str],
                 font_size: int = 12) -> Tensor:  # fmt: skip
    """The depth target ``(H, W)`` colour-mapped on ``[lo, hi]`` (invalid pixels black) at the display ``size``."""
    return _pixels.caption(
        _pixels.resize_image(colorize(t, valid, lo, hi, "viridis"), size), lines, font_size=font_size
    )


class DepthEstimation(CVTask):
    """``"depth-estimation"`` (``"depth"``): ``{"preds": (N, 1, H, W) or (N, H, W) float, "targets": same}``;
    target pixels that are 0 or NaN are invalid and excluded from every metric."""

    name = "depth-estimation"
    aliases = ("depth",)
    has_classes = False
    expected_format = (
        '{"preds": (N, 1, H, W) or (N, H, W) float tensor, "targets": the same shape, float (0 or NaN = invalid pixel)}'
    )
    expected_output = "depth Tensor (N, 1, H, W) or (N, H, W)"
    expected_target = "depth Tensor (N, 1, H, W) or (N, H, W), 0 or NaN where invalid"
    postprocess = "depth"
    main_metric = "delta_1"
    badness_name = "AbsRel"

    def check_preds(self, preds: Any, n: int | None, num_classes: int | None) -> Tensor:
        if isinstance(preds, Tensor):
            preds = _squeeze_channel(preds)
        if not is_float(preds) or preds.ndim != 3:
            raise FormatProblem("preds", "'preds' must be a float tensor of shape (N, 1, H, W) or (N, H, W)")
        if n is not None and preds.shape[0] != n:
            raise FormatProblem("preds", f"'preds' has {preds.shape[0]} maps but the batch has {n} images")
        return preds

    def check_targets(self, targets: Any, n: int, preds: Any, num_classes: int | None) -> Tensor:
        if isinstance(targets, Tensor):
            targets = _squeeze_channel(targets)
        if not is_float(targets) or targets.ndim != 3:
            raise FormatProblem("targets", "'targets' must be a float tensor of shape (N, 1, H, W) or (N, H, W)")
        if preds is not None and tuple(targets.shape) != tuple(preds.shape):
            raise FormatProblem(
                "targets",
                f"'targets' shape {tuple(targets.shape)} does not match the predictions' {tuple(preds.shape)}",
            )
        if targets.shape[0] != n:
            raise FormatProblem("targets", f"'targets' has {targets.shape[0]} maps but the batch has {n} images")
        return targets

    def make_output(self, preds: Any, targets: Any, extra: Mapping[str, Any]) -> DepthOutput:
        return DepthOutput(preds, targets)

    def build_metrics(self, cfg: Any) -> dict[str, Any]:
        return {"depth": DepthMetrics()}

    def update_metrics(self, metrics: dict[str, Any], out: DepthOutput) -> None:
        metrics["depth"].update(out.preds, out.targets)

    def compute(self, metrics: dict[str, Any], cfg: Any) -> tuple[dict[str, float], dict[str, Any]]:
        res = metrics["depth"].compute()
        scalars = {k: float(res[k]) for k in DEPTH_KEYS}
        return scalars, {"summary": scalars}

    def panel(self, img: Tensor, src_size: tuple[int, int], out: DepthOutput, i: int,
              opts: PanelOptions) -> Tensor:  # fmt: skip
        p, t = out.preds[i].float(), out.targets[i].float()
        valid = valid_mask(t)
        lo, hi = _value_range(torch.cat([t[valid], p[valid]]) if bool(valid.any()) else p.reshape(-1))
        err = (p - t).abs()
        emax = float(err[valid].max()) if bool(valid.any()) else 1.0
        size = (img.shape[-2], img.shape[-1])
        ones = torch.ones_like(valid)

        def show(rgb: Tensor) -> Tensor:
            return _pixels.resize_image(rgb, size)

        fs = opts.font_size
        parts = [
            _pixels.caption(img, ["image"], font_size=fs),
            _pixels.caption(
                show(colorize(p, ones, lo, hi, "viridis")), ["pred", f"[{lo:.3g}, {hi:.3g}]"], font_size=fs
            ),
            _target_view(t, valid, lo, hi, size, ["target", "black: invalid"], fs),
            _pixels.caption(
                show(colorize(err, valid, 0.0, emax, "magma")), ["|error|", f"max {emax:.3g}"], font_size=fs
            ),
        ]
        return _pixels.hstack(parts)

    def badness(self, out: DepthOutput, opts: PanelOptions) -> Tensor:
        return depth_errors(out.preds, out.targets)

    def target_panel(self, img: Tensor, src_size: tuple[int, int], target: Any, opts: PanelOptions) -> Tensor:
        t = _squeeze_channel(target.float()[None])[0]
        valid = valid_mask(t)
        lo, hi = _value_range(t[valid])
        lines = [f"target [{lo:.3g}, {hi:.3g}]", "black: invalid"]
        view = _target_view(t, valid, lo, hi, (img.shape[-2], img.shape[-1]), lines, opts.font_size)
        return _pixels.hstack([_pixels.caption(img, ["image"], font_size=opts.font_size), view])

    def served_metrics(
        self, preds: list[Any], targets: list[Any], class_names: Sequence[str] | None
    ) -> dict[str, float]:
        import numpy as np

        m = DepthMetrics()
        for p, t in zip(preds, targets, strict=False):
            t = _squeeze_channel(torch.as_tensor(t).float())
            p = torch.from_numpy(np.asarray(p)).float()
            if tuple(p.shape[-2:]) != tuple(t.shape[-2:]):
                p = torch.nn.functional.interpolate(p[:, None], size=tuple(t.shape[-2:]), mode="bilinear")[:, 0]
            m.update(p, t)
        return {k: float(v) for k, v in m.compute().items()}


TASK = register(DepthEstimation)
