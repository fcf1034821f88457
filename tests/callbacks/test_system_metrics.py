"""SystemMetricsCallback: CPU/RAM/disk/network figures reach the store under MLflow's own system-metric names."""

from __future__ import annotations

import importlib.util
import re

import lightning.pytorch as pl
import pytest
import torch
from conftest import needs_newer
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._facts.system_sampling import (
    GPU_NAMES,
    HOST_NAMES,
    GPUSampler,
    HostSampler,
    metric_keys,
)
from lightning_mlflow_cv.callbacks.system_metrics import SystemMetricsCallback
from tests.tiny import TinyModel, loaders


def _mlflow_names() -> set[str]:
    """The names MLflow's own monitors produce on this machine (the peer doing the same job)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    names: set[str] = set()
    for monitor in (CPUMonitor(), DiskMonitor(), NetworkMonitor()):
        monitor.collect_metrics()
        names |= set(monitor.metrics)
    return names


@needs_newer("mlflow", "2.8", _compat.has_system_metrics(), "compares with MLflow's own system metric monitors")
def test_host_sample_uses_mlflows_names():
    assert set(HostSampler().sample()) == set(HOST_NAMES) == _mlflow_names()


def test_host_sample_has_sane_values():
    sample = HostSampler().sample()
    assert set(sample) == set(HOST_NAMES)
    assert 0 <= sample["cpu_utilization_percentage"] <= 100 and 0 < sample["system_memory_usage_percentage"] < 100
    assert sample["system_memory_usage_megabytes"] > 0 and sample["disk_available_megabytes"] > 0
    assert metric_keys({"cpu_utilization_percentage": 1.0}, None) == {"system/cpu_utilization_percentage": 1.0}
    assert list(metric_keys({"gpu_0_utilization_percentage": 1.0}, 2)) == ["system/node_2/gpu_0_utilization_percentage"]


def test_fit_logs_cpu_figures_into_the_store_over_time(tracking_uri):
    logger = MLflowCVLogger(experiment_name="sys", tracking_uri=tracking_uri, flush_interval_s=0.5)
    cb = SystemMetricsCallback(interval_s=0.2)

    class Slow(TinyModel):
        def training_step(self, batch, batch_idx):
            import time

            time.sleep(0.05)
            return super().training_step(batch, batch_idx)

    train, val = loaders(n=64, batch_size=4)  # 16 steps x 2 epochs x >= 50 ms: several samples
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(Slow(), train, val)
    assert logger.flush()
    client = MlflowClient(tracking_uri)
    metrics = client.get_run(logger.run_id).data.metrics
    assert {f"system/{n}" for n in HOST_NAMES} <= set(metrics)
    history = client.get_metric_history(logger.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert cb._thread is None  # stopped with the fit
    if GPUSampler.open()[0] is None:  # no NVML here: the GPU branch is skipped cleanly
        assert cb.gpu_skipped and not [k for k in metrics if k.startswith("system/gpu_")]


def test_invalid_interval():
    with pytest.raises(ValueError, match=r"`interval_s` must be a number of seconds > 0, got 0"):
        SystemMetricsCallback(interval_s=0)


def test_gpu_skipped_cleanly_without_nvml():
    sampler, reason = GPUSampler.open()
    if sampler is not None:
        pytest.skip("NVML works here; the gpu-marked test covers this machine")
    assert reason and ("nvidia-ml-py" in reason or "NVML" in reason)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_figures_per_device_under_mlflows_names():
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("nvidia-ml-py is not installed")
    sampler, reason = GPUSampler.open()
    assert sampler is not None, reason
    sample = sampler.sample()
    sampler.close()
    for i in range(torch.cuda.device_count()):
        for name in GPU_NAMES[:3]:  # memory and utilisation: every NVIDIA device reports them
            assert name.format(i=i) in sample
        assert 0 <= sample[f"gpu_{i}_utilization_percentage"] <= 100


def test_without_mlflows_system_metrics_one_warning_and_the_figures_still_logged(tracking_uri, monkeypatch):
    """MLflow < 2.8 (no mlflow.system_metrics, no System metrics tab): one line naming the version, and the fit
    logs the same system/... metrics."""
    monkeypatch.setattr(_compat, "has_system_metrics", lambda: False)
    logger = MLflowCVLogger(experiment_name="sys-old", tracking_uri=tracking_uri)
    cb = SystemMetricsCallback(interval_s=10)
    train, val = loaders(n=16, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    with pytest.warns(RuntimeWarning) as record:
        trainer.fit(TinyModel(), train, val)
        trainer.fit(TinyModel(), train, val)  # the same callback again: said once
    said = [str(w.message) for w in record if "System metrics tab" in str(w.message)]
    assert len(said) == 1 and re.match(
        r"SystemMetricsCallback: this MLflow \S+ has no System metrics tab \(MLflow >= 2\.8\): .* Fix: upgrade MLflow",
        said[0],
    ), said
    assert logger.flush()
    assert {f"system/{n}" for n in HOST_NAMES} <= set(MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics)
