"""The demo as a new user runs it: what the terminal prints and what the store holds afterwards."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv.demo import main


@pytest.mark.slow
def test_demo_terminal_and_store(tracking_uri, capsys):
    assert main(["--max-epochs", "2", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    # progress, then the headline, the promotion outcome, the run page and the command that serves it
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val/acc" in out
    assert "test/acc" in out and "latency/torch/p95_ms" in out
    assert "model:     promoted to @champion (models:/digits-cnn/1)" in out
    assert f"mlflow ui --backend-store-uri {tracking_uri} --port 5000" in out
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits-demo").experiment_id])
    assert f"run page:  http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out

    # @champion resolves, and the LoggedModel shows its version (the UI's "Registered")
    mv = client.get_model_version_by_alias("digits-cnn", "champion")
    assert str(mv.version) == "1"
    (model_id,) = [o.model_id for o in run.outputs.model_outputs]
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(e["name"], str(e["version"])) for e in linked] == [("digits-cnn", "1")]
    # the description names the headline metrics and the outcome
    note = run.data.tags["mlflow.note.content"]
    assert "| `test/acc` |" in note and "promoted to @champion" in note

    # params: one key per value, no CUDA figures on a CPU run (issue 16: 83 params, lr under 5 keys)
    p = run.data.params
    by_value: dict[tuple[str, str], list[str]] = {}
    for k, v in p.items():
        leaf = k.rsplit("/", 1)[-1]
        if leaf in {"lr", "initial_lr", "batch_size", "seed", "split_seed", "global_seed"}:
            by_value.setdefault(("seed" if "seed" in leaf else leaf.replace("initial_", ""), v), []).append(k)
    assert all(len(keys) == 1 for keys in by_value.values()), by_value
    assert p["lr"] == "0.003" and p["batch_size"] == "64" and p["global_seed"] == "42" and p["split_seed"] == "0"
    assert "cuda_version" not in p and len(p) <= 60, (len(p), sorted(p))  # was 83

    # metrics: the LearningRateMonitor's curve, summaries under their prefixes, system metrics for the tab
    m = run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 2
    assert {"best/val/acc", "best/epoch", "latency/torch/p95_ms", "latency/onnx/p95_ms", "onnx/max_abs_err"} <= set(m)
    assert "system/cpu_utilization_percentage" in m
    assert not [k for k in m if k.startswith(("best_", "p95_", "onnx_"))]

    # three dataset inputs a reader tells apart
    names = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
    assert names == ["digits-test", "digits-train", "digits-val"]
