"""ReproducibilityCallback: arguments, seeding and state, then one real fit read back from a real SQLite store."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

import lightning
import lightning.pytorch as pl
import mlflow
import pytest
import torch
import torchvision
from conftest import make_git_repo
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_mlflow_cv._facts.redact import REDACTED
from lightning_mlflow_cv.callbacks.reproducibility import ReproducibilityCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_mlflow_cv.logger import MLflowCVLogger

PIP_SECRET = "pipS3cretXyz"
ENV_SECRET = "envS3cretQwe"
HPARAM_SECRET = "hpS3cretAbc"
DIFF_SECRET = "ghp_diffS3cretZz"
SECRETS = (PIP_SECRET, ENV_SECRET, HPARAM_SECRET, DIFF_SECRET)


# ------------------------------------------------------------------------------------------------
# arguments, seeds, state (the extractors are tested in tests/test_environment.py and tests/test_hyperparameters.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, r"`seed` must be an integer in \[0, 2\*\*32 - 1\] or None, got -1"),
        ({"seed": 1.5}, r"`seed` must be an integer.*got 1.5"),
        ({"seed": True}, r"`seed` must be an integer.*got True"),
        ({"transform_prefix": "/"}, r"`transform_prefix` must be a non-empty key prefix.*got '/'"),
        ({"transform": 3}, r"`transform` must be a callable transform.*got int"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ReproducibilityCallback(**kwargs)


def test_seed_seeds_every_rng() -> None:
    import random

    import numpy as np

    ReproducibilityCallback(seed=123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ReproducibilityCallback(seed=123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_global_seed_given_already_set_or_none(monkeypatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert ReproducibilityCallback().global_seed() == "none"
    pl.seed_everything(99)  # a seed set elsewhere (e.g. LightningCLI's seed_everything)
    assert ReproducibilityCallback().global_seed() == "99"
    assert ReproducibilityCallback(seed=5).global_seed() == "5"


def test_state_dict_round_trip_skips_a_resumed_run() -> None:
    cb = ReproducibilityCallback(seed=7)
    cb._logged = {("run-a", "fit_start"), ("run-a", "train_start")}
    other = ReproducibilityCallback()
    other.load_state_dict(cb.state_dict())
    assert other.seed == 7 and ("run-a", "train_start") in other._logged


def test_without_mlflow_logger_raises(tmp_path: Path) -> None:
    trainer = pl.Trainer(logger=False, callbacks=[ReproducibilityCallback()], max_epochs=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"ReproducibilityCallback needs an MLflowCVLogger.*found: none"):
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())


# ------------------------------------------------------------------------------------------------
# one real fit, read back from the store
# ------------------------------------------------------------------------------------------------
class SecretDigits(DigitsClassifier):
    """Digits CNN with a planted secret hyperparameter and SGD + per-step cosine schedule."""

    def __init__(self, api_key: str = "", lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()

    def configure_optimizers(self):
        head = list(self.head.parameters())
        head_ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if id(p) not in head_ids]
        opt = torch.optim.SGD(
            [{"params": rest}, {"params": head, "lr": self.hparams.lr / 10}],
            lr=self.hparams.lr,
            momentum=0.9,
            weight_decay=5e-4,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=11)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def all_run_text(tracking_uri: str, run_id: str, dst: Path) -> str:
    """Every param, tag and artifact (as text) of a run."""
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    local = Path(client.download_artifacts(run_id, "", str(dst)))
    for f in local.rglob("*"):
        if f.is_file():
            parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def test_fit_logs_params_tags_and_artifacts_matching_live_objects(tmp_path: Path, tracking_uri: str, monkeypatch) -> None:
    sha = make_git_repo(tmp_path)  # the cwd is a git work tree, made dirty with a secret in the diff
    (tmp_path / "train.py").write_text(f"SECRET_TOKEN = '{DIFF_SECRET}'\n")
    monkeypatch.setenv("PIP_INDEX_URL", f"https://bob:{PIP_SECRET}@pypi.internal.example.com/simple")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)

    logger = MLflowCVLogger(experiment_name="repro", tracking_uri=tracking_uri, flush_interval_s=0.5)
    dm = DigitsDataModule(batch_size=32, augment=True)
    model = SecretDigits(api_key=HPARAM_SECRET)
    es = EarlyStopping(monitor="val/loss", mode="min", patience=4)
    ckpt = ModelCheckpoint(monitor="val/acc", mode="max", save_top_k=1)
    cb = ReproducibilityCallback(seed=1234)
    trainer = pl.Trainer(
        logger=logger, callbacks=[cb, es, ckpt], max_epochs=1, limit_train_batches=3, limit_val_batches=1,
        accumulate_grad_batches=2, gradient_clip_val=0.5, gradient_clip_algorithm="value",
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path / "ck"),
    )
    trainer.fit(model, datamodule=dm)

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(logger.run_id)
    p, tags = run.data.params, run.data.tags
    # seed, framework and hardware
    assert p["global_seed"] == "1234"
    # versions are facts about where the run ran: tags under one prefix, not params (they crowd the UI's image cards)
    assert tags["environment.pytorch_version"] == torch.__version__
    assert tags["environment.mlflow_version"] == mlflow.__version__
    assert tags["environment.lightning_version"] == lightning.__version__
    assert tags["environment.python_version"] == platform.python_version()
    assert tags["environment.torchvision_version"] == torchvision.__version__
    assert not [k for k in p if k.endswith("_version")], sorted(p)
    # trainer settings shape the result: params
    assert p["world_size"] == "1" and p["num_nodes"] == "1" and p["accelerator"] == "cpu"
    assert p["strategy"] == "single_device" and p["precision"] == "32-true"
    cuda = {"cuda_version", "cudnn_version", "gpu_model", "num_gpus"}  # a CPU run: no CUDA params or tags
    assert not cuda & set(p) and not {f"environment.{k}" for k in cuda} & set(tags)
    # the optimizer, read from the live object (2 param groups)
    opt = trainer.optimizers[0]
    assert p["optimizer/name"] == "SGD"
    # one key per value: group 0's lr is the model's `lr` hparam (logged by Lightning), so only group 1's is added
    assert p["lr"] == "0.05" and "optimizer/group_0/lr" not in p and p["optimizer/group_1/lr"] == str(0.05 / 10)
    assert not [k for k in p if k.endswith("initial_lr")]
    for i, group in enumerate(opt.param_groups):
        for k in ("momentum", "weight_decay", "nesterov", "dampening"):
            assert p[f"optimizer/group_{i}/{k}"] == str(group[k])
    # the scheduler and its interval
    assert p["lr_scheduler/name"] == "CosineAnnealingLR" and p["lr_scheduler/T_max"] == "11"
    assert p["lr_scheduler/interval"] == "step"
    # trainer settings
    assert p["max_epochs"] == "1" and p["max_steps"] == "-1" and p["accumulate_grad_batches"] == "2"
    assert p["gradient_clip_val"] == "0.5" and p["gradient_clip_algorithm"] == "value" and p["amp"] == "False"
    # dataloaders
    assert p["batch_size"] == "32" and "train_dataloader/batch_size" not in p and p["train_dataloader/shuffle"] == "True"
    assert p["val_dataloader/shuffle"] == "False" and p["val_dataloader/num_workers"] == "0"
    assert p["train_dataloader/pin_memory"] == str(trainer.train_dataloader.pin_memory)
    # callbacks
    assert p["early_stopping/monitor"] == "val/loss" and p["early_stopping/patience"] == "4"
    assert p["model_checkpoint/monitor"] == "val/acc" and p["model_checkpoint/mode"] == "max"
    # hparams of model and datamodule
    assert p["lr"] == "0.05" and p["batch_size"] == "32" and p["api_key"] == REDACTED  # Lightning's, once
    assert not [k for k in p if k.startswith(("model/", "data/"))]  # nothing repeated under a prefix
    repeated = {}
    for k, v in p.items():
        if k.rsplit("/", 1)[-1] in {"lr", "initial_lr", "batch_size", "seed"}:
            repeated.setdefault((k.rsplit("/", 1)[-1].replace("initial_", ""), v), []).append(k)
    assert all(len(keys) == 1 for keys in repeated.values()), repeated
    # the training transform, flattened from the live v2 pipeline
    affine = dm.train_transform.transforms[0]
    assert p["augment/RandomAffine/degrees"] == str(list(affine.degrees))
    assert p["augment/RandomAffine/translate"] == str(affine.translate)
    # git tags and the diff artifact
    assert tags["git_commit"] == sha and tags["git_branch"] == "exp-branch" and tags["git_dirty"] == "true"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "environment")}
    assert {"environment/requirements.txt", "environment/system.json", "environment/git_diff.patch"} <= arts

    (tmp_path / "dl").mkdir()
    text = all_run_text(tracking_uri, run.info.run_id, tmp_path / "dl")
    assert "SECRET_TOKEN" in text and f"torch=={version('torch')}" in text and "pypi.internal.example.com" in text
    for secret in SECRETS:
        assert secret not in text, f"secret {secret} leaked into the run"


def test_resumed_fit_continues_the_run_without_relogging(tmp_path: Path, tracking_uri: str, recwarn) -> None:
    from lightning_mlflow_cv.callbacks.dataset_lineage import DatasetLineageCallback

    def fit(ckpt_path: str | None, max_epochs: int) -> tuple[MLflowCVLogger, ReproducibilityCallback, DatasetLineageCallback]:
        logger = MLflowCVLogger(experiment_name="resume", tracking_uri=tracking_uri, flush_interval_s=0.5)
        repro, lineage = ReproducibilityCallback(seed=3, log_environment=False), DatasetLineageCallback(cache_path=None)
        trainer = pl.Trainer(
            logger=logger, callbacks=[repro, lineage, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
            max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu",
        )
        trainer.fit(SecretDigits(), datamodule=DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        return logger, repro, lineage

    first, _, _ = fit(None, 1)
    # the per-step cosine schedule has moved the learning rate: logging the optimizer again would clash
    second, repro, lineage = fit(str(tmp_path / "ck" / "last.ckpt"), 2)
    assert second.run_id == first.run_id
    assert (first.run_id, "train_start") in repro._logged
    assert lineage.logged["training"]["run_id"] == first.run_id
    clashes = [w for w in recwarn if "already logged" in str(w.message)]
    assert not clashes, [str(w.message) for w in clashes]
    p = mlflow.MlflowClient(tracking_uri).get_run(first.run_id).data.params
    assert p["lr"] == "0.05" and p["optimizer/group_1/lr"] == str(0.05 / 10) and p["max_epochs"] == "1"
