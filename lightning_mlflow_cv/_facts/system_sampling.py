"""System figures under MLflow's own system-metric names (pure sampling functions, no Trainer, no MLflow).

The names are those of ``mlflow.system_metrics.metrics`` (CPUMonitor, DiskMonitor, NetworkMonitor,
GPUMonitor), so MLflow's System metrics tab shows them: ``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``, ... With several nodes,
MLflow's node convention applies: ``system/<node_id>/<name>`` (here ``node_id`` is ``node_<node_rank>``).
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: MLflow's prefix for system metrics.
PREFIX = "system/"
#: The CPU/RAM/disk/network names MLflow uses (cpu_monitor, disk_monitor, network_monitor).
HOST_NAMES = (
    "cpu_utilization_percentage",
    "system_memory_usage_megabytes",
    "system_memory_usage_percentage",
    "disk_usage_percentage",
    "disk_usage_megabytes",
    "disk_available_megabytes",
    "network_receive_megabytes",
    "network_transmit_megabytes",
)
#: The per-GPU names MLflow uses (gpu_monitor), ``{i}`` the device index.
GPU_NAMES = (
    "gpu_{i}_memory_usage_percentage",
    "gpu_{i}_memory_usage_megabytes",
    "gpu_{i}_utilization_percentage",
    "gpu_{i}_power_usage_watts",
    "gpu_{i}_power_usage_percentage",
)


def require_psutil(who: str) -> types.ModuleType:
    """``psutil``, or an ImportError in one line naming the extra to install."""
    try:
        import psutil
    except ImportError:
        raise ImportError(
            f"{who} needs psutil, which is not installed. Fix: pip install 'lightning-mlflow-cv[system]'"
        ) from None
    return psutil


@dataclass
class HostSampler:
    """CPU, RAM, disk (of ``disk_path``) and network figures of this machine, as MLflow's monitors compute them.

    Network figures count megabytes since the sampler was made (MLflow's NetworkMonitor does the same).
    """

    disk_path: str = os.sep
    _net0: tuple[float, float] = field(default=(0.0, 0.0), init=False)

    def __post_init__(self) -> None:
        require_psutil("SystemMetricsCallback")
        import psutil

        psutil.cpu_percent()  # the first call only starts psutil's measuring interval
        net = psutil.net_io_counters()
        self._net0 = (net.bytes_recv / 1e6, net.bytes_sent / 1e6) if net is not None else (0.0, 0.0)

    def sample(self) -> dict[str, float]:
        """One sample: ``{name: value}`` with the names of :data:`HOST_NAMES`."""
        import psutil as ps

        mem = ps.virtual_memory()
        disk = ps.disk_usage(self.disk_path)
        out = {
            "cpu_utilization_percentage": float(ps.cpu_percent()),
            "system_memory_usage_megabytes": mem.used / 1e6,
            "system_memory_usage_percentage": mem.used / mem.total * 100,
            "disk_usage_percentage": float(disk.percent),
            "disk_usage_megabytes": disk.used / 1e6,
            "disk_available_megabytes": disk.free / 1e6,
        }
        net = ps.net_io_counters()
        if net is not None:
            out["network_receive_megabytes"] = net.bytes_recv / 1e6 - self._net0[0]
            out["network_transmit_megabytes"] = net.bytes_sent / 1e6 - self._net0[1]
        return out


class GPUSampler:
    """Per-device figures through NVML (``nvidia-ml-py``); :meth:`open` says why not when it cannot run."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def open(cls) -> tuple[GPUSampler | None, str]:
        """``(sampler, "")`` or ``(None, reason)``: no ``nvidia-ml-py``, no NVML library, no device."""
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'lightning-mlflow-cv[system]')"
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound etc.: no GPU figures, say why
            return None, f"NVML is not available ({type(err).__name__}: {err})"
        if count == 0:
            return None, "NVML sees no GPU"
        return cls(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]), ""

    def sample(self) -> dict[str, float]:
        """One sample: ``gpu_<i>_...`` figures of every device (a figure a device cannot give is left out)."""
        nv = self.nvml
        out: dict[str, float] = {}
        for i, h in enumerate(self.handles):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                out[f"gpu_{i}_memory_usage_percentage"] = mem.used / mem.total * 100
                out[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 1e6
            except Exception:  # noqa: BLE001,S110 - some devices (MIG, vGPU) do not report it
                pass
            try:
                out[f"gpu_{i}_utilization_percentage"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # noqa: BLE001,S110
                pass
            try:
                mw, limit = nv.nvmlDeviceGetPowerUsage(h), nv.nvmlDeviceGetEnforcedPowerLimit(h)
                out[f"gpu_{i}_power_usage_watts"] = mw / 1000
                out[f"gpu_{i}_power_usage_percentage"] = mw / limit * 100
            except Exception:  # noqa: BLE001,S110
                pass
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001,S110 - shutting down a monitor never fails the fit
            pass


def metric_keys(sample: Mapping[str, float], node_rank: int | None) -> dict[str, float]:
    """MLflow's keys for a sample: ``system/<name>``, or ``system/node_<r>/<name>`` when ``node_rank`` is given.

    Example::

        >>> metric_keys({"cpu_utilization_percentage": 12.5}, None)
        {'system/cpu_utilization_percentage': 12.5}
        >>> metric_keys({"gpu_0_utilization_percentage": 90.0}, 1)
        {'system/node_1/gpu_0_utilization_percentage': 90.0}
    """
    node = f"node_{node_rank}/" if node_rank is not None else ""
    return {f"{PREFIX}{node}{k}": float(v) for k, v in sample.items()}
