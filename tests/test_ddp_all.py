"""The whole callback set under real 2-process CPU DDP: one run, one copy of every artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.ddp, pytest.mark.slow]
SCRIPT = Path(__file__).parent / "scripts" / "ddp_all.py"


def _files(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_files(client, run_id, a.path) if a.is_dir else [a.path])
    return out


def test_full_callback_set_under_ddp_gives_one_run_and_one_copy_of_each_artifact(tracking_uri, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tracking_uri, str(out)], capture_output=True, text=True, timeout=420, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["run_id"] == ranks[1]["run_id"] and ranks[0]["world"] == 2
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("ddp-all")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    files = _files(client, run.info.run_id)
    # each artifact exactly once: no rank-1 duplicates (image files carry step+timestamp+uuid)
    images = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    per_step = Counter(f.split("+timestamp+")[0] for f in images)
    assert per_step and all(n == 1 for n in per_step.values()), per_step
    assert sum(f.startswith("images/val~predictions+step+") for f in images) == 2  # one grid per epoch
    for single in ("onnx/model.onnx", "environment/requirements.txt", "augmentations/train_samples.png"):
        assert files.count(single) == 1, (single, files)
    # one dataset input per context, one registered version
    contexts = Counter(t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context")
    assert contexts == {"training": 1, "validation": 1}
    assert len(client.search_model_versions("name = 'ddp-digits'")) == 1
    assert run.data.params["world_size"] == "2"
