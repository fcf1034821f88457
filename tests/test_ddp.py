"""MLflowCVLogger under real 2-process CPU DDP and ddp_spawn (gloo): one run, same run id on every rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv._facts import trainer_frames as _trainer_frames

pytestmark = [pytest.mark.ddp, pytest.mark.slow]
SCRIPT = Path(__file__).parent / "scripts" / "ddp_logger.py"


def test_ddp_creates_exactly_one_run_with_the_same_id_on_both_ranks(tracking_uri, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # bounded: a deadlock fails the test instead of hanging CI
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tracking_uri, str(out)], capture_output=True, text=True, timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["run_id"] == ranks[1]["run_id"] is not None
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # 64 samples, batch 4, split over 2 ranks -> 8 steps per epoch, 2 epochs; logged once, by rank 0
    assert len(client.get_metric_history(run.info.run_id, "train/m0")) == 16


def test_ddp_shares_the_run_id_through_the_callbacks_setup_hook_when_lightnings_frames_are_renamed(
    tracking_uri, tmp_path
):
    """The run id reaches rank 1 through the internal callback's public `setup` hook, not through Lightning's
    private frames: with the frames the fallback looks for renamed, each rank warns once and both still agree."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), tracking_uri, str(out), "renamed"], capture_output=True, text=True,
        timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"checked on Lightning {_trainer_frames.CHECKED_ON};" in proc.stderr
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["run_id"] == ranks[1]["run_id"] is not None
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]] and runs[0].info.status == "FINISHED"


SPAWN_SCRIPT = Path(__file__).parent / "scripts" / "ddp_spawn_logger.py"


@pytest.mark.parametrize("when", ["before"])  # "after" (run created before fit) also passes; ~90 s each here
def test_ddp_spawn_pickles_the_logger_and_gives_one_finished_run(tracking_uri, tmp_path, when):
    """`ddp_spawn` pickles the Trainer and its logger to each worker; with `after`, the logger already created its
    run (and runs its writer) in the main process before it is pickled."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SPAWN_SCRIPT), tracking_uri, str(out), when], capture_output=True, text=True,
        timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["run_id"] == ranks[1]["run_id"] is not None
    before = json.loads((out / "main.json").read_text())["run_id_before_fit"]
    if when == "after":
        assert before == ranks[0]["run_id"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp_spawn").experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]
    assert runs[0].info.status == "FINISHED"
    # every point rank 0 logged: 8 steps per epoch per rank, 2 epochs, 8 train metrics, 2 validation points
    for k in range(8):
        assert len(client.get_metric_history(ranks[0]["run_id"], f"train/m{k}")) == 16
    assert len(client.get_metric_history(ranks[0]["run_id"], "val/loss")) == 2
