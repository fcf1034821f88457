"""SystemMetricsCallback: GPU/CPU/RAM/disk/network over time, under MLflow's ``system/...`` names, per node."""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._facts.system_sampling import (
    GPUSampler,
    HostSampler,
    metric_keys,
    require_psutil,
)
from lightning_mlflow_cv.callbacks import _checks
from lightning_mlflow_cv.callbacks._context import find_mlflow_logger

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_mlflow_cv.logger import MLflowCVLogger

_NAME = "SystemMetricsCallback"


class SystemMetricsCallback(Callback):
    """Log system figures every ``interval_s`` seconds while the Trainer runs, so MLflow's System metrics tab
    shows them: the same names MLflow's own monitor uses, through the logger's writer (non-blocking, with the
    logger's retry/spool failure policy).

    - **CPU, RAM, disk, network** (psutil) of every node: ``system/cpu_utilization_percentage``,
      ``system/system_memory_usage_megabytes``, ``system/system_memory_usage_percentage``,
      ``system/disk_usage_percentage``, ``system/disk_usage_megabytes``, ``system/disk_available_megabytes``,
      ``system/network_receive_megabytes``, ``system/network_transmit_megabytes`` (megabytes since the fit
      started).
    - **GPU per device** (NVML, ``nvidia-ml-py``), from every node's local rank 0 (which sees all the node's
      devices): ``system/gpu_<i>_utilization_percentage``, ``system/gpu_<i>_memory_usage_megabytes``,
      ``system/gpu_<i>_memory_usage_percentage``, ``system/gpu_<i>_power_usage_watts``,
      ``system/gpu_<i>_power_usage_percentage``. Without NVML (no ``nvidia-ml-py``, no driver, no device) the
      GPU figures are skipped; a GPU run says so in one warning.
    - **Several nodes** (``num_nodes > 1``): every key gets MLflow's node part, ``system/node_<node_rank>/...``
      (node 0 included, so the nodes chart alike). Only global rank 0 talks to MLflow: the other nodes' local
      rank 0 samples into a buffer that is gathered at every training epoch end and at the end of training
      (their points then carry the delivery time; their steps are the sample numbers).

    The step of a point is the sample number (0, 1, 2, ... as MLflow's own monitor counts). One sample is
    taken when training starts and one when it ends, so a short fit has points too.

    Args:
        interval_s: Seconds between samples (MLflow's monitor default is 10).
        gpu: Sample GPUs through NVML when it is available.
        disk_path: The file system whose usage is reported.

    Raises:
        ValueError: an ``interval_s`` that is not a positive number.
        ImportError: when psutil is not installed (one line naming the extra to install).
        RuntimeError: at setup, when the Trainer has no ``MLflowCVLogger``.

    Example::

        from lightning_mlflow_cv.callbacks.system_metrics import SystemMetricsCallback

        trainer = Trainer(logger=MLflowCVLogger(), callbacks=[SystemMetricsCallback(interval_s=5)])
    """

    def __init__(self, interval_s: float = 10.0, gpu: bool = True, disk_path: str = "/") -> None:
        _checks.check_number(
            _NAME, "interval_s", interval_s, 0, above=True, must="a number of seconds > 0", fix="e.g. 10"
        )
        require_psutil(_NAME)
        self.interval_s = float(interval_s)
        self.gpu = bool(gpu)
        self.disk_path = disk_path
        #: Samples taken so far (the step of the next point).
        self.step = 0
        #: Why there are no GPU figures ("" when there are, or when not asked for).
        self.gpu_skipped = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._buffer: list[tuple[int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._host: HostSampler | None = None
        self._gpus: GPUSampler | None = None
        self._logger: MLflowCVLogger | None = None
        self._node: int | None = None
        self._direct = False
        self._said_no_tab = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            find_mlflow_logger(trainer, _NAME)
            if trainer.is_global_zero and not _compat.has_system_metrics() and not self._said_no_tab:
                self._said_no_tab = True
                warnings.warn(
                    f"{_NAME}: this MLflow {_compat.version_string()} has no System metrics tab (MLflow >= 2.8): the "
                    "figures are logged as the same system/... metrics and show among the run's charts. Fix: "
                    "upgrade MLflow (client and server) for the tab.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._node = trainer.node_rank if trainer.num_nodes > 1 else None
        if trainer.local_rank != 0 or self._thread is not None:
            return
        self._logger = find_mlflow_logger(trainer, _NAME)
        self._direct = trainer.is_global_zero  # other nodes buffer until the next gather
        self._host = HostSampler(self.disk_path)
        if self.gpu:
            self._gpus, self.gpu_skipped = GPUSampler.open()
            if self._gpus is None and type(trainer.accelerator).__name__ == "CUDAAccelerator":
                warnings.warn(f"{_NAME}: no GPU figures: {self.gpu_skipped}.", RuntimeWarning, stacklevel=2)
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="lmc-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        """Take one sample; log it (global rank 0) or keep it for the next gather (other nodes)."""
        try:
            figures = self._host.sample() if self._host is not None else {}
            if self._gpus is not None:
                figures.update(self._gpus.sample())
        except Exception as err:
            warnings.warn(f"{_NAME}: sampling failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
            return
        with self._lock:
            step, self.step = self.step, self.step + 1
            if self._direct and self._logger is not None:
                self._logger.log_metrics(metric_keys(figures, self._node), step=step)
            else:
                self._buffer.append((step, figures))

    def _gather(self, trainer: pl.Trainer) -> None:
        """Bring the other nodes' samples to global rank 0 (every rank takes part; only with several nodes)."""
        if trainer.num_nodes <= 1:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        with self._lock:
            mine = (trainer.node_rank, self._buffer) if trainer.local_rank == 0 else (trainer.node_rank, [])
            self._buffer = []
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if trainer.is_global_zero:
            logger = find_mlflow_logger(trainer, _NAME)
            for node, samples in gathered:
                for step, figures in samples:
                    logger.log_metrics(metric_keys(figures, node), step=step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._gather(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()
        self._gather(trainer)

    def stop(self) -> None:
        """Stop sampling (after one last sample); safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=max(5.0, self.interval_s))
        self._sample()
        if self._gpus is not None:
            self._gpus.close()
            self._gpus = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop()

    @property
    @override
    def state_key(self) -> str:
        # one per (disk, gpu) setting: each sampler keeps its own step
        return self._generate_state_key(disk_path=self.disk_path, gpu=self.gpu)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict.get("step", 0))
