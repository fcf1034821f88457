"""The environment extractors: framework versions, hardware, pip freeze, system information and git state."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import lightning
import mlflow
import pytest
import torch
from conftest import make_git_repo

from lightning_mlflow_cv._facts.redact import REDACTED
from lightning_mlflow_cv.environment import (
    framework_versions,
    git_commit,
    git_state,
    hardware_summary,
    requirements_txt,
    system_info,
)

PIP_SECRET = "pipS3cretXyz"
ENV_SECRET = "envS3cretQwe"
DIFF_SECRET = "ghp_diffS3cretZz"


def test_framework_versions_are_what_the_imported_modules_report() -> None:
    v = framework_versions()
    assert list(v)[:5] == ["python", "torch", "torchvision", "lightning", "mlflow"]
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert v["lightning"] == lightning.__version__ and v["mlflow"] == mlflow.__version__
    # pins drop the local build label (torch 2.14.1+cu130 installs as torch==2.14.1); other distributions are
    # read from their metadata, and one that is not installed is left out
    pins = framework_versions(["torch", "pytest", "no-such-distribution-xyz"], local=False)
    assert pins == {"torch": torch.__version__.split("+")[0], "pytest": version("pytest")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA form is checked in tests/gpu")
def test_hardware_summary_on_cpu() -> None:
    assert hardware_summary() == "cpu"


def test_git_commit_prefers_the_ci_variable_then_head(tmp_path: Path, monkeypatch) -> None:
    sha = make_git_repo(tmp_path / "repo")
    monkeypatch.setenv("GIT_COMMIT_SHA", "c1sha")
    assert git_commit(tmp_path / "repo") == "c1sha"  # CI checkouts name their commit
    monkeypatch.delenv("GIT_COMMIT_SHA")
    assert git_commit(tmp_path / "repo") == sha
    (tmp_path / "plain").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(tmp_path / "plain") is None


def test_requirements_txt_lists_packages_and_redacts_index_credentials(monkeypatch, tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = https://ci:{PIP_SECRET}x@mirror.example.com/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_INDEX_URL", f"https://bob:{PIP_SECRET}@pypi.internal.example.com/simple")
    text = requirements_txt()
    assert f"\ntorch=={version('torch')}\n" in text  # what `pip freeze` prints (distribution metadata)
    assert f"\nmlflow=={version('mlflow')}\n" in text
    assert f"--index-url https://{REDACTED}@pypi.internal.example.com/simple" in text
    assert f"--extra-index-url https://{REDACTED}@mirror.example.com/simple" in text
    assert PIP_SECRET not in text


def test_system_info_redacts_environment(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
    monkeypatch.setenv("PL_DB_URL", f"postgresql://u:{ENV_SECRET}@db/x")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    info = system_info()
    text = json.dumps(info)
    assert ENV_SECRET not in text
    assert info["environment"]["MLFLOW_TRACKING_PASSWORD"] == REDACTED
    assert info["environment"]["OMP_NUM_THREADS"] == "3"
    assert info["cpu"]["logical_cores"] >= 1 and info["ram"]["total_bytes"] > 0
    assert info["gpus"] == [] or "memory_total_mb" in info["gpus"][0]


def test_git_state_clean_dirty_and_outside(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    sha = make_git_repo(repo)
    assert git_state(repo) == {"git_commit": sha, "git_branch": "exp-branch", "git_dirty": "false"}
    (repo / "train.py").write_text(f"API_TOKEN = '{DIFF_SECRET}'\nprint('hi')\n")
    dirty = git_state(repo)
    assert dirty["git_dirty"] == "true"
    assert "API_TOKEN" in dirty["diff"] and DIFF_SECRET not in dirty["diff"]
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_COMMIT_SHA", "abc123")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_state(outside) == {"git_commit": "abc123"}
