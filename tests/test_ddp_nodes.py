"""Two "nodes" on one machine: two torchrun launches (c10d rendezvous) or two SLURM tasks, one process each.

The README's multi-node commands, run for real against a real `mlflow server`: one run, the same run id on
every rank, one copy of each artifact, validation metrics over both nodes' shards, world size and node count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(600)]
SCRIPT = Path(__file__).parent / "scripts" / "ddp_nodes.py"
REPO = Path(__file__).resolve().parents[1]


def _files(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_files(client, run_id, a.path) if a.is_dir else [a.path])
    return out


def torchrun_commands(uri: str, out: Path, port: int) -> list[list[str]]:
    """What the README shows, with both 'nodes' on 127.0.0.1."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # = the `torchrun` console script
    return [
        [
            *torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lmc-nodes",
            str(SCRIPT), uri, str(out),
        ]
        for rank in (0, 1)
    ]


def slurm_env(rank: int, port: int) -> dict[str, str]:
    """What `srun` sets for task `rank` of `#SBATCH --nodes=2 --ntasks-per-node=1` (Lightning's SLURMEnvironment)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


def _launch(kind: str, uri: str, out: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if kind == "torchrun":
        launches = [(cmd, env) for cmd in torchrun_commands(uri, out, port)]
    else:
        launches = [([sys.executable, str(SCRIPT), uri, str(out)], {**env, **slurm_env(r, port)}) for r in (0, 1)]
    procs = []
    for i, (cmd, e) in enumerate(launches):
        log = open(tmp_path / f"node{i}.log", "wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=tmp_path))
    try:
        for p in procs:
            p.wait(timeout=480)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-4000:] for i in range(2))
    assert [p.returncode for p in procs] == [0, 0], logs


@pytest.mark.parametrize("kind", ["torchrun", "slurm"])
def test_two_nodes_give_one_run_one_copy_of_each_artifact_and_metrics_over_both(kind, mlflow_server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _launch(kind, mlflow_server.uri, out, tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    env = {"torchrun": "TorchElasticEnvironment", "slurm": "SLURMEnvironment"}[kind]
    assert [r["environment"] for r in ranks] == [env, env]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1] and all(r["num_nodes"] == 2 for r in ranks)
    assert ranks[0]["run_id"] == ranks[1]["run_id"] and ranks[0]["world"] == 2
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("ddp-nodes")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["num_nodes"] == "2"
    files = _files(client, run.info.run_id)
    images = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    per_step = Counter(f.split("+timestamp+")[0] for f in images)
    assert per_step and all(n == 1 for n in per_step.values()), per_step
    assert sum(f.startswith("images/val~predictions+step+") for f in images) == 2  # one grid per epoch
    for single in ("onnx/model.onnx", "environment/requirements.txt", "augmentations/train_samples.png"):
        assert files.count(single) == 1, (single, files)
    assert len(client.search_model_versions("name = 'ddp-digits'")) == 1
    # val/acc covers both nodes' shards: it matches the final weights on the whole validation split
    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    dm = DigitsDataModule(batch_size=512)
    dm.setup("fit")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    # Lightning's DistributedSampler (no shuffle) pads the odd split by repeating its first samples, then deals
    # them out: rank r gets padded[r::2]. val/acc = mean over ranks of each rank's sample mean.
    padded = torch.cat([correct, correct[: (-len(correct)) % 2]]).float()
    both = padded.mean().item()
    rank0_only = padded[0::2].mean().item()  # what rank 0 alone saw
    logged = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(logged) == 2  # once per epoch, by rank 0 only
    assert logged[-1].value == pytest.approx(both, abs=1e-4), (logged[-1].value, both, rank0_only)
