"""MLflowSaveConfigCallback and MLflowCVCLI: the config as a redacted artifact and params of the run itself,
in-process against SQLite and end to end (console script) against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

from lightning_mlflow_cv.callbacks.save_config import MLflowSaveConfigCallback, flatten_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits" / "config.yaml"
CONFIG_SECRET = "cfgS3cretKey"
URL_SECRET = "urlS3cretPw"
ENV_SECRET = "envS3cretTok"
PIP_SECRET = "pipS3cretIdx"
SECRETS = (CONFIG_SECRET, URL_SECRET, ENV_SECRET, PIP_SECRET)
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]


def run_text(tracking_uri: str, run_id: str, dst: Path) -> str:
    """Every param, tag and artifact (as text) of a run."""
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(client.download_artifacts(run_id, "", str(dst))).rglob("*"):
        if f.is_file():
            parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


def test_flatten_config() -> None:
    cfg = {"model": {"class_path": "M", "init_args": {"lr": 0.1, "sizes": [1, 2]}}, "trainer": {"callbacks": [
        {"class_path": "A"}, {"class_path": "B", "init_args": {"p": 1}}], "plugins": [], "logger": {}}}
    assert flatten_config(cfg, "config") == {
        "config/model/class_path": "M",
        "config/model/init_args/lr": 0.1,
        "config/model/init_args/sizes": [1, 2],
        "config/trainer/callbacks/0/class_path": "A",
        "config/trainer/callbacks/1/class_path": "B",
        "config/trainer/callbacks/1/init_args/p": 1,
        "config/trainer/plugins": [],
        "config/trainer/logger": {},
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config_filename": "config.json"}, r"`config_filename` must be a file name ending in .yaml or .yml.*'config.json'"),
        ({"config_filename": "a/b.yaml"}, r"`config_filename` must be a file name .*no directories.*'a/b.yaml'"),
        ({"artifact_dir": "/"}, r"`artifact_dir` must be a non-empty string, got '/'"),
        ({"params_prefix": ""}, r"`params_prefix` must be a non-empty string, got ''"),
        ({"log_params": "all"}, r"`log_params` must be 'summary', True or False, got 'all'"),
    ],
)
def test_save_config_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MLflowSaveConfigCallback(None, None, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def secret_model_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module with the digits model plus a secret-named init arg (so YAML can carry a secret)."""
    pkg = tmp_path / "usercode"
    pkg.mkdir()
    (pkg / "secret_models.py").write_text(textwrap.dedent("""
        from lightning_mlflow_cv.demos.digits import DigitsClassifier

        class SecretDigits(DigitsClassifier):
            def __init__(self, api_key: str = "", db_url: str = "", lr: float = 0.003) -> None:
                super().__init__(lr=lr)
                self.save_hyperparameters()
    """))
    monkeypatch.syspath_prepend(str(pkg))
    return "secret_models.SecretDigits"


@pytest.mark.slow
def test_cli_logs_redacted_config_per_run_without_clash(
    tmp_path: Path, tracking_uri: str, secret_model_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

    monkeypatch.setenv("LIGHTNING_MLFLOW_CV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", ENV_SECRET)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"https://ci:{PIP_SECRET}@pypi.example.com/simple")
    args = [
        "fit", "--config", str(EXAMPLE), *FAST,
        f"--trainer.logger.init_args.tracking_uri={tracking_uri}",
        f"--trainer.logger.init_args.artifact_location={tmp_path / 'artifacts'}",
        f"--model={secret_model_module}",
        f"--model.api_key={CONFIG_SECRET}",
        f"--model.db_url=postgresql://bob:{URL_SECRET}@db.example.com/prod",
    ]
    runs = []
    for lr in (0.003, 0.01):  # two runs in the same working directory
        cli = MLflowCVCLI(args=[*args, f"--model.lr={lr}"])
        runs.append(cli.trainer.logger.run_id)
    assert runs[0] != runs[1]
    # Lightning's SaveConfigCallback writes <log_dir>/config.yaml and refuses the second run; nothing of that here
    assert not (tmp_path / "mlruns").exists()
    assert not [p for p in tmp_path.rglob("config.yaml") if "artifacts" not in p.parts and "spool" not in p.parts]

    client = mlflow.MlflowClient(tracking_uri)
    for run_id, lr in zip(runs, (0.003, 0.01)):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        p = run.data.params
        # params: the class paths from the config, the model's hparams once (through Lightning), no internals
        assert p["config/model/class_path"] == secret_model_module
        assert p["config/data/class_path"] == "lightning_mlflow_cv.demos.digits.DigitsDataModule"
        assert p["lr"] == str(lr) and p["max_epochs"] == "1" and p["batch_size"] == "64"
        assert p["api_key"] == "***REDACTED***"
        assert p["db_url"] == "postgresql://***REDACTED***@db.example.com/prod"
        assert not [k for k in p if k.startswith("config/") and not k.endswith("/class_path")], sorted(p)
        named = {}
        for k, v in p.items():
            name = k.rsplit("/", 1)[-1].replace("initial_lr", "lr")
            if name in {"lr", "batch_size", "seed", "split_seed", "global_seed"}:
                named.setdefault(v if name != "lr" else ("lr", v), []).append(k)
        assert all(len(keys) == 1 for keys in named.values()), named  # one key per value
        assert len(p) <= 72, sorted(p)  # was 286 when the CLI flattened the whole config into params
        local = client.download_artifacts(run_id, "configs/config.yaml", str(tmp_path / "dl" / run_id))
        cfg = yaml.safe_load(Path(local).read_text())
        assert cfg["model"]["init_args"]["lr"] == lr  # each run has its own file
        assert cfg["model"]["init_args"]["api_key"] == "***REDACTED***"  # the full config, redacted
        assert cfg["trainer"]["logger"]["class_path"] == "lightning_mlflow_cv.MLflowCVLogger"
        text = run_text(tracking_uri, run_id, tmp_path / "all" / run_id)
        for secret in SECRETS:
            assert secret not in text, f"secret {secret} leaked into run {run_id}"


@pytest.mark.slow
def test_cli_without_mlflow_logger_warns_and_still_trains(tmp_path: Path) -> None:
    from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

    minimal = ["fit", *FAST, "--model=lightning_mlflow_cv.demos.digits.DigitsClassifier",
               "--data=lightning_mlflow_cv.demos.digits.DigitsDataModule", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"]
    with pytest.warns(UserWarning, match=r"MLflowSaveConfigCallback needs an MLflowCVLogger.*The config is not logged"):
        cli = MLflowCVCLI(args=minimal)
    assert cli.trainer.state.finished


@pytest.mark.server
@pytest.mark.slow
def test_console_script_fit_against_mlflow_server(tmp_path: Path, mlflow_server) -> None:
    host = mlflow_server.uri.removeprefix("http://")
    uri_with_credentials = f"http://alice:{URL_SECRET}@{host}"
    env = {
        **os.environ,
        "LIGHTNING_MLFLOW_CV_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_TOKEN": ENV_SECRET,
        "PIP_INDEX_URL": f"https://bob:{PIP_SECRET}@pypi.internal.example.com/simple",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = Path(sys.executable).with_name("lightning-mlflow-cv")
    work = tmp_path / "job"
    work.mkdir()
    proc = subprocess.run(
        [str(exe), "fit", "--config", str(EXAMPLE), *FAST,
         f"--trainer.logger.init_args.tracking_uri={uri_with_credentials}",
         "--trainer.logger.init_args.experiment_name=cli-e2e"],
        cwd=work, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("cli-e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["config/model/class_path"] == "lightning_mlflow_cv.demos.digits.DigitsClassifier"
    assert not [k for k in p if k.startswith("config/trainer/")]  # logger internals stay in the config artifact
    assert p["global_seed"] == "42" and p["augment/RandomAffine/degrees"] == "[-10.0, 10.0]"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "configs")}
    assert arts == {"configs/config.yaml"}
    inputs = {t.value for di in client.get_run(run.info.run_id).inputs.dataset_inputs for t in di.tags}
    assert {"training", "validation"} <= inputs
    text = run_text(mlflow_server.uri, run.info.run_id, tmp_path / "dl")
    for secret in SECRETS[1:]:
        assert secret not in text, f"secret {secret} leaked into the run"
    # nothing written locally but checkpoints and the (drained) spool: no mlruns, no mlflow.db, no config.yaml
    assert not (work / "mlruns").exists() and not (work / "mlflow.db").exists()
    assert not list(work.rglob("config.yaml"))


def test_plain_lightning_cli_with_mlflowcvlogger_in_yaml(tmp_path: Path, tracking_uri: str) -> None:
    """Lightning's own LightningCLI (its SaveConfigCallback asserts `trainer.log_dir is not None`) with MLflowCVLogger
    named in YAML: it trains, saves the config into save_dir, and the checkpoints land under save_dir."""
    from lightning.pytorch.cli import LightningCLI

    local = tmp_path / "local"
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {
            "logger": {
                "class_path": "lightning_mlflow_cv.MLflowCVLogger",
                "init_args": {"tracking_uri": tracking_uri, "experiment_name": "plain-cli", "save_dir": str(local)},
            },
            "enable_progress_bar": False,
        },
        "model": "lightning_mlflow_cv.demos.digits.DigitsClassifier",
        "data": "lightning_mlflow_cv.demos.digits.DigitsDataModule",
    }))
    cli = LightningCLI(args=["fit", "--config", str(config), *FAST])
    logger = cli.trainer.logger
    assert cli.trainer.log_dir == str(local)
    saved = yaml.safe_load((local / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["class_path"] == "lightning_mlflow_cv.MLflowCVLogger"
    assert list((local / logger.experiment_id / logger.run_id / "checkpoints").glob("*.ckpt"))
    run = mlflow.MlflowClient(tracking_uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics


def test_help_lists_every_subcommand(capsys) -> None:
    from lightning_mlflow_cv.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "demo", "sync", "promote"):
        assert f" {cmd}" in out or f"{cmd}," in out, cmd


def test_missing_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A YAML that names GradCAM on an install without captum: one line with the extra, at config parse."""
    from lightning_mlflow_cv.cli import main

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    rc = main([
        "fit", "--config", str(EXAMPLE), *FAST, f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "--trainer.callbacks+=lightning_mlflow_cv.callbacks.gradcam.GradCAMCallback",
        "--trainer.callbacks.target_layer=features.3",
    ])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.startswith("lightning-mlflow-cv:")]
    assert 'GradCAMCallback needs the optional dependency captum' in line
    assert 'pip install "lightning-mlflow-cv[captum]"' in line and "Traceback" not in err
