"""Latency statistics and timing loops (pure; no Trainer, no MLflow).

Metric names follow the package's scheme ``latency/<backend>/<stat>``: ``p50_ms``, ``p95_ms``, ``p99_ms``
(each the median over ``repeats`` blocks of the block's percentile), ``p95_iqr_ms`` (the interquartile
range of the blocks' p95, i.e. how much the figure moved between blocks) and ``imgs_per_sec``.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

#: The statistics logged per backend, in order.
STATS = ("p50_ms", "p95_ms", "p99_ms", "p95_iqr_ms", "imgs_per_sec")


def metric_key(backend: str, stat: str) -> str:
    """``latency/<backend>/<stat>``, e.g. ``metric_key("torch", "p95_ms") == "latency/torch/p95_ms"``."""
    return f"latency/{backend}/{stat}"


def latency_stats(
    blocks_s: Sequence[Sequence[float]] | Sequence[float], batch_size: int, backend: str = "torch"
) -> dict[str, float]:
    """Latency percentiles (ms) and throughput from blocks of per-call wall times in seconds.

    Each block gives its own p50/p95/p99 (linear interpolation); the reported figure is the median over the
    blocks, so a block disturbed by something else running on the machine does not move it. The spread
    ``p95_iqr_ms`` is the interquartile range of the blocks' p95 (0 for one block). Throughput is images per
    second of the median block.

    Args:
        blocks_s: Per-call wall times, one list per block (a flat list is one block).
        batch_size: Images per call.
        backend: The ``<backend>`` part of the keys (``"torch"``, ``"onnx"``).

    Raises:
        ValueError: when there is no timed call or ``batch_size`` < 1.

    Example::

        >>> s = latency_stats([[0.001, 0.002, 0.003, 0.004]], batch_size=2)
        >>> s["latency/torch/p50_ms"], s["latency/torch/p95_iqr_ms"]
        (2.5, 0.0)
    """
    blocks: list[list[float]] = []
    flat: list[float] = []  # a flat list of floats is one block
    for b in blocks_s:
        if isinstance(b, Sequence):
            blocks.append(list(b))
        else:
            flat.append(b)
    blocks = [b for b in [*blocks, flat] if b]
    if not blocks:
        raise ValueError("latency_stats: `blocks_s` holds no timed call; time at least one call.")
    if batch_size < 1:
        raise ValueError(f"latency_stats: `batch_size` must be >= 1, got {batch_size!r}.")
    per_block = np.array([np.percentile(np.asarray(b, dtype=np.float64) * 1000.0, [50, 95, 99]) for b in blocks])
    p50, p95, p99 = np.median(per_block, axis=0)
    q1, q3 = np.percentile(per_block[:, 1], [25, 75])
    rates = [batch_size * len(b) / sum(b) if sum(b) > 0 else float("inf") for b in blocks]
    out = {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "p95_iqr_ms": q3 - q1, "imgs_per_sec": np.median(rates)}
    return {metric_key(backend, k): float(out[k]) for k in STATS}


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)`` (``None``: unchanged); restore afterwards."""
    import torch

    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_blocks(
    fn: Callable[[], Any], warmup: int, iters: int, repeats: int = 1, sync: Callable[[], None] | None = None
) -> list[list[float]]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` blocks of ``iters`` timed calls.

    ``sync`` runs before every clock read (``torch.cuda.synchronize`` on CUDA). Python's garbage collector is
    paused while timing (as ``timeit`` does), so a collection does not land inside a call.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    blocks: list[list[float]] = []
    try:
        for _ in range(repeats):
            times: list[float] = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                if sync is not None:
                    sync()
                times.append(time.perf_counter() - t0)
            blocks.append(times)
    finally:
        if was_enabled:
            gc.enable()
    return blocks


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed (one block of :func:`time_blocks`)."""
    return time_blocks(fn, warmup, iters, 1, sync)[0]
