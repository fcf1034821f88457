"""Which torch, torchvision, Lightning and torchmetrics this process runs: one place for their feature detection.

:mod:`lightning_mlflow_cv._compat.mlflow_api` does the same for MLflow. The package runs from the floors in ``pyproject.toml``
(torch 2.0, torchvision 0.15, Lightning 2.2, torchmetrics 1.3) to the newest releases; every difference is
detected here by looking for the feature (a parameter, a module, a function), never by comparing version numbers
elsewhere, and each gap either has an equivalent here or degrades with one warning:

=====================================  ==============  ==========================================================
feature                                since           without it
=====================================  ==============  ==========================================================
``seed_everything(verbose=)``          Lightning 2.3   the "Seed set to N" line is silenced through its logger
``torch.load(mmap=)``                  torch 2.1       the checkpoint is read whole (no memory map)
``plot_curve(labels=)``                torchmetrics    the curves are drawn, then named after the classes here
                                       1.4
``torch.export`` with dynamic shapes   torch 2.2       ``ModelRegistryCallback(network_format="pt2")`` bundles
                                                       ONNX instead, with one warning
``torch.onnx.export(dynamo=)``         torch 2.5       the TorchScript-based exporter (``dynamo=False``), with
                                                       one warning when ``dynamo=True`` was asked for
=====================================  ==============  ==========================================================
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _takes(fn: Any, name: str) -> bool:
    """Whether the callable ``fn`` accepts the keyword argument ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def version(dist: str) -> str:
    """The installed version of a framework module (``torch``, ``lightning``, ...), for messages."""
    import importlib

    try:
        return str(importlib.import_module(dist).__version__)
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


# -- Lightning ---------------------------------------------------------------------------------------------------
@functools.cache
def seed_everything_takes_verbose() -> bool:
    """Lightning's ``seed_everything`` has ``verbose=`` (Lightning 2.3)."""
    from lightning.fabric.utilities.seed import seed_everything

    return _takes(seed_everything, "verbose")


def seed_everything(seed: int | None, workers: bool = True) -> int:
    """``lightning.seed_everything(seed, workers=workers)`` without its "Seed set to N" log line, on every release."""
    import lightning.pytorch as pl

    if seed_everything_takes_verbose():
        return pl.seed_everything(seed, workers=workers, verbose=False)
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return pl.seed_everything(seed, workers=workers)
    finally:
        seed_log.setLevel(level)


# -- torch -------------------------------------------------------------------------------------------------------
@functools.cache
def torch_load_takes_mmap() -> bool:
    """``torch.load(..., mmap=True)`` (torch 2.1)."""
    import torch

    return _takes(torch.load, "mmap")


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` of a checkpoint on the CPU with ``weights_only=True`` (no arbitrary unpickling), memory-mapped
    where torch can (a large checkpoint is then not read whole). Raises what ``torch.load`` raises."""
    import torch

    extra: dict[str, Any] = {"mmap": True} if torch_load_takes_mmap() else {}
    return torch.load(path, map_location="cpu", weights_only=True, **extra)


@functools.cache
def has_torch_export() -> bool:
    """``torch.export.export`` with ``dynamic_shapes`` and ``torch.export.Dim``/``save``/``load`` (torch 2.2)."""
    try:
        import torch.export as te
    except ImportError:
        return False
    needed = ("export", "Dim", "save", "load")
    return all(hasattr(te, n) for n in needed) and _takes(te.export, "dynamic_shapes")


@functools.cache
def onnx_export_takes_dynamo() -> bool:
    """``torch.onnx.export(..., dynamo=...)``: the ``torch.export``-based ONNX exporter (torch 2.5)."""
    import torch.onnx

    return _takes(torch.onnx.export, "dynamo")


# -- torchmetrics ------------------------------------------------------------------------------------------------
@functools.cache
def plot_curve_takes_labels() -> bool:
    """torchmetrics' ``plot_curve(..., labels=...)`` (torchmetrics 1.4)."""
    from torchmetrics.utilities.plot import plot_curve

    return _takes(plot_curve, "labels")


def plot_curve(
    curve: Any, score: Any, ax: Axes, label_names: tuple[str, str], name: str, labels: Sequence[str] | None
) -> None:
    """torchmetrics' ``plot_curve`` with one line per class named ``labels[i]`` (with its score), on every release.

    Older torchmetrics names the lines ``"0"``, ``"1"``, ... (``"<i> AUC=<score>"``); the index is then replaced
    by the class name, which is what ``labels=`` does on newer releases.
    """
    from torchmetrics.utilities.plot import plot_curve as tm_plot_curve

    names: list[int | str] | None = None if labels is None else list(labels)
    if names is None or plot_curve_takes_labels():
        more: dict[str, Any] = {} if names is None else {"labels": names}
        tm_plot_curve(curve, score=score, ax=ax, label_names=label_names, name=name, **more)
        return
    before = len(ax.get_lines())
    tm_plot_curve(curve, score=score, ax=ax, label_names=label_names, name=name)
    for i, line in enumerate(ax.get_lines()[before:]):
        label = str(line.get_label())
        if i < len(names) and label.startswith(str(i)):
            line.set_label(f"{names[i]}{label[len(str(i)) :]}")
