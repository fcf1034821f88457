"""The demo as a new user runs it: what the terminal prints, what the store holds, what the MLflow UI shows."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import sys
from pathlib import Path

import pytest
from conftest import require_real
from mlflow import MlflowClient

from lightning_mlflow_cv.demos.digits import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the demo trains for 2 epochs: minutes on a busy machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str, str]:
    """One demo run (2 epochs) into ``<dir>/mlflow.db``: (dir, tracking URI, what it printed)."""
    workdir = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)  # where `make demo` runs: checkpoints and artifacts beside mlflow.db
    try:
        with contextlib.redirect_stdout(out):
            assert main(["--max-epochs", "2", "--tracking-uri", uri]) == 0
    finally:
        os.chdir(cwd)
    return workdir, uri, out.getvalue()


def test_demo_terminal_and_store(demo):
    _, tracking_uri, out = demo
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
    # the card (version description): the verdict first, one row per metric, the test metrics after trainer.test
    desc = mv.description
    assert desc.startswith("**PROMOTED** to `@champion`") and "<!--" not in desc.split("\n", 1)[0]
    assert desc.count("| `train/acc") == 1 and "## Test metrics" in desc and "| `test/acc` |" in desc
    assert "digits-train" in desc and "classes: `['0', '1'," in desc
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
    assert "cuda_version" not in p and len(p) <= 54, (len(p), sorted(p))  # was 83, then 59 with the versions
    # where the run ran is a set of tags under one prefix, not params (the UI lists every param on image cards)
    assert not [k for k in p if k.endswith("_version")], sorted(p)
    assert run.data.tags["environment.python_version"] == platform.python_version()

    # metrics: the LearningRateMonitor's curve, summaries under their prefixes, system metrics for the tab
    m = run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 2
    assert {"best/val/acc", "best/epoch", "latency/torch/p95_ms", "latency/onnx/p95_ms", "onnx/max_abs_err"} <= set(m)
    assert "system/cpu_utilization_percentage" in m
    assert not [k for k in m if k.startswith(("best_", "p95_", "onnx_"))]

    # three dataset inputs a reader tells apart
    names = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
    assert names == ["digits-test", "digits-train", "digits-val"]


@pytest.fixture
def chromium() -> None:
    """Debian's Chromium and Playwright, checked before the demo runs: missing, the test skips (fails under CI)."""
    exe = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    if not exe.exists():
        require_real("Chromium", f"no {exe} (Debian: apt-get install chromium, or make browser-deps)")
    if importlib.util.find_spec("playwright") is None:
        require_real("playwright", 'not installed. Fix: pip install "lightning-mlflow-cv[test]"')


@pytest.mark.server
def test_mlflow_ui_in_a_browser_shows_what_the_demo_promises(chromium, demo, tmp_path):
    """`mlflow ui` on the demo's store, in headless Chromium: the pages a user opens first."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import browser_check
    finally:
        sys.path.pop(0)
    workdir, _, _ = demo
    failures = browser_check.check(workdir, tmp_path / "shots")
    assert not failures, failures
    assert (tmp_path / "shots" / "run_page.png").stat().st_size > 10_000
