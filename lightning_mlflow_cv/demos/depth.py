"""Depth estimation example: a small encoder-decoder on synthetic scenes rendered with known depth.

Run it with the console script (``examples/depth/config.yaml``)::

    lightning-mlflow-cv fit --config examples/depth/config.yaml

Each scene is a ground plane receding to a horizon, a sky above it (no depth: 0, invalid) and one to three
spheres, shaded by depth (nearer is brighter, as with fog) and by surface orientation. ``validation_step``/
``test_step`` return the depth output convention (``{"preds": (N, 1, H, W), "targets": (N, 1, H, W)}``), which
``CVMetricsCallback(task="depth")`` turns into ``val/AbsRel``, ``val/SqRel``, ``val/RMSE``, ``val/RMSE_log`` and
``val/delta_1..3`` over the valid pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from lightning_mlflow_cv.demos._base import ExampleDataModule, ExampleModule, Split


def make_depth_scenes(n: int, size: int = 32, seed: int = 0, noise: float = 0.03) -> tuple[Tensor, Tensor]:
    """``(images (N, 3, S, S) in [0, 1], depth (N, 1, S, S))``: depth in metres, 0 where invalid (sky).

    Example::

        >>> x, d = make_depth_scenes(2, size=16)
        >>> x.shape, d.shape, bool((d == 0).any()), bool((d > 0).any())
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 1, 16, 16]), True, True)
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    images = torch.empty(n, 3, size, size)
    depths = torch.zeros(n, 1, size, size)
    for i in range(n):
        horizon = float(size * (0.25 + 0.15 * torch.rand(1, generator=g)))
        below = yy > horizon
        # ground plane: depth ~ camera height / angle below the horizon, capped at 20 m
        depth = torch.where(below, (1.5 * size / (yy - horizon).clamp_min(0.5)).clamp(max=20.0), torch.zeros(()))
        normal_shade = torch.full((size, size), 0.8)
        albedo = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)
        colour = albedo.expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = float(size * (0.08 + 0.12 * torch.rand(1, generator=g)))
            cx = float(r + (size - 2 * r) * torch.rand(1, generator=g))
            cy = float(horizon + (size - horizon - r) * torch.rand(1, generator=g))
            d0 = float(2.0 + 8.0 * torch.rand(1, generator=g))
            dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
            inside = dist2 < r**2
            z = torch.sqrt((r**2 - dist2).clamp_min(0)) / r  # 1 at the centre, 0 at the rim
            sphere_depth = d0 - 0.5 * d0 * r / size * z
            closer = inside & ((depth == 0) | (sphere_depth < depth))
            depth = torch.where(closer, sphere_depth, depth)
            normal_shade = torch.where(closer, 0.4 + 0.6 * z, normal_shade)
            c = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=g)
            colour = torch.where(closer, c.expand(3, size, size), colour)
        fog = torch.exp(-depth / 8.0)
        sky = torch.tensor([0.55, 0.7, 0.95]).view(3, 1, 1)
        img = torch.where(depth > 0, colour * normal_shade * (0.25 + 0.75 * fog), sky.expand(3, size, size))
        img = img + noise * torch.randn(3, size, size, generator=g)
        images[i] = img.clamp(0, 1)
        depths[i, 0] = depth
    return images, depths


class DepthScenesDataModule(ExampleDataModule):
    """Train/val/test sets of :func:`make_depth_scenes`.

    Args:
        num_train: Training scenes.
        num_val: Validation scenes (also the test size).
        image_size: Side of the square images.
        batch_size: Batch size of every loader.
        seed: Base seed (train ``seed``, val ``seed + 1``, test ``seed + 2``).

    Example::

        trainer.fit(DepthEncoderDecoder(), datamodule=DepthScenesDataModule())
    """

    def __init__(self, num_train: int = 512, num_val: int = 128, image_size: int = 32, batch_size: int = 32,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def make_split(self, n: int, seed: int, split: Split) -> Dataset:
        return TensorDataset(*make_depth_scenes(n, self.hparams.image_size, seed))


class DepthEncoderDecoder(ExampleModule):
    """A small U-Net-style encoder-decoder predicting depth ``(N, 1, H, W)`` (positive: softplus).

    Trained with an L1 loss on log depth over valid pixels (target > 0).

    Args:
        width: Channels of the first stage.
        lr: Adam learning rate.

    Example::

        depth = DepthEncoderDecoder()(images)   # (N, 1, H, W)
    """

    def __init__(self, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )  # fmt: skip

        w = width
        self.enc1, self.enc2, self.enc3 = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, 2), block(2 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    @override
    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        e3 = self.enc3(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return nn.functional.softplus(self.head(d1)) + 1e-3

    @staticmethod
    def loss(pred: Tensor, target: Tensor) -> Tensor:
        valid = target > 0
        return (pred[valid].log() - target[valid].log()).abs().mean()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def _step(self, batch: Any, stage: Split) -> dict[str, Tensor]:
        x, y = batch
        pred = self(x)
        self.log(f"{stage}/loss", self.loss(pred, y), sync_dist=True)
        return {"preds": pred, "targets": y}


__all__ = ["DepthEncoderDecoder", "DepthScenesDataModule", "make_depth_scenes"]
