"""InferenceLatencyCallback: the statistics (pure) and real digits fits on a real SQLite store."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv.callbacks.inference_latency import InferenceLatencyCallback, latency_stats, time_calls
from lightning_mlflow_cv.callbacks.onnx_export import ONNXExportCallback
from lightning_mlflow_cv.demo import DigitsClassifier, DigitsDataModule

KEYS = ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "throughput_imgs_per_sec")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('latency') / 'store.db'}"


def test_latency_stats_values():
    times = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = latency_stats(times, batch_size=4)
    assert s["p50_latency_ms"] == pytest.approx(50.5)
    assert s["p95_latency_ms"] == pytest.approx(95.05)
    assert s["p99_latency_ms"] == pytest.approx(99.01)
    assert s["throughput_imgs_per_sec"] == pytest.approx(4 * 100 / sum(times))
    assert set(latency_stats([0.002], 1, prefix="onnx_")) == {f"onnx_{k}" for k in KEYS}


def test_latency_stats_errors():
    with pytest.raises(ValueError, match="`times_s` is empty"):
        latency_stats([], 1)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        latency_stats([0.1], 0)


def test_time_calls_counts_and_syncs():
    calls, syncs = [], []
    times = time_calls(lambda: calls.append(1), warmup=3, iters=5, sync=lambda: syncs.append(1))
    assert len(times) == 5 and len(calls) == 8 and len(syncs) == 6 and all(t >= 0 for t in times)


def _fit(uri, callbacks, test=False):
    pl.seed_everything(0)
    logger = MLflowCVLogger(experiment_name="latency", tracking_uri=uri, flush_interval_s=0.5)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1, logger=logger,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        enable_checkpointing=False, default_root_dir=".", log_every_n_steps=1,
    )
    dm = DigitsDataModule(batch_size=32, augment=False)
    model = DigitsClassifier()
    trainer.fit(model, datamodule=dm)
    if test:
        trainer.test(model, datamodule=dm, verbose=False)
    assert logger.flush()
    return MlflowClient(uri).get_run(logger.run_id)


def test_fit_end_pytorch_and_onnx_whatever_the_order(store):
    # the latency callback comes first: it runs the ONNX export itself, once
    lat, onnx = InferenceLatencyCallback(batch_size=2, warmup=2, iters=20), ONNXExportCallback(dynamo=False)
    run = _fit(store, [lat, onnx])
    m = run.data.metrics
    for prefix in ("", "onnx_"):
        assert 0 < m[f"{prefix}p50_latency_ms"] <= m[f"{prefix}p95_latency_ms"] <= m[f"{prefix}p99_latency_ms"]
        assert m[f"{prefix}throughput_imgs_per_sec"] > 0
    assert run.data.tags["latency.device"] == "cpu" and run.data.tags["latency.batch_size"] == "2"
    assert onnx.status == "ok" and lat.results["p50_latency_ms"] == m["p50_latency_ms"]
    history = MlflowClient(store).get_metric_history(run.info.run_id, "p50_latency_ms")
    assert len(history) == 1  # measured once although two hooks asked for it


def test_without_onnx_and_at_test_end(store):
    run = _fit(store, [InferenceLatencyCallback(warmup=0, iters=5)])
    assert set(KEYS) <= set(run.data.metrics) and not any(k.startswith("onnx_") for k in run.data.metrics)
    lat = InferenceLatencyCallback(warmup=1, iters=5, when="test_end")
    run = _fit(store, [lat], test=True)
    assert set(KEYS) <= set(run.data.metrics) and lat.results


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be an int >= 1, got 0"),
        ({"warmup": -1}, r"`warmup` must be an int >= 0, got -1"),
        ({"iters": 1.5}, r"`iters` must be an int >= 1, got 1.5"),
        ({"when": "epoch_end"}, r"`when` must be one of \('fit_end', 'test_end'\), got 'epoch_end'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceLatencyCallback(**kwargs)
