"""The prepared GPU check dry-runs on a CPU machine: it names every step it skips and why, and each step's
command starts (so the few minutes of a lent GPU are not lost to a broken command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is visible: `make gpu-check` runs for real there")
def test_gpu_check_dry_run_names_what_it_skips() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, env=env, timeout=280)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("skipped: ")]
    assert len(lines) >= 4 and all("no CUDA GPU is visible to torch" in ln for ln in lines), p.stdout
    assert "BROKEN" not in p.stdout
    assert not (REPO / "benchmarks" / "README_gpu.md").exists() or "GPU check results" in (REPO / "benchmarks" / "README_gpu.md").read_text()
