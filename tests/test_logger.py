"""MLflowCVLogger against a real SQLite store."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from tiny import N_METRICS, TinyModel, ctrl_c, history_counts, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._delivery import journal as _journal
from lightning_mlflow_cv._delivery.deliverer import Deliverer
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._facts.keys import MAX_PARAM_VAL_LENGTH


def _fit(logger, max_epochs=2, model=None, **kw):
    train, val = loaders()
    tr = trainer(logger, max_epochs=max_epochs, **kw)
    tr.fit(model or TinyModel(), train, val)
    return tr


def test_default_store_is_sqlite_in_cwd_and_env_read_at_construction(tmp_path, monkeypatch):
    logger = MLflowCVLogger()
    assert logger._tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert MLflowCVLogger()._tracking_uri.endswith("other.db")
    # the run really lands in ./mlflow.db and `mlflow ui`'s default store shows it
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    logger = MLflowCVLogger(experiment_name="default-store")
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert (tmp_path / "mlflow.db").exists()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(logger.run_id)
    assert run.data.metrics == {"x": 1.0}
    assert not list(tmp_path.glob("mlruns/*/meta.yaml"))  # no file store
    if mlflow.__version__ >= "3":  # MLflow 2.x's SQL store makes ./mlruns as its default artifact root
        assert not (tmp_path / "mlruns").exists()


def test_fit_delivers_every_point_params_tags_and_status(tracking_uri, spool_dir):
    logger = MLflowCVLogger(
        experiment_name="fit", tracking_uri=tracking_uri, tags={"task": "classification", "backbone": "linear"}
    )
    tr = trainer(logger, max_epochs=2)
    train, val = loaders()
    tr.fit(TinyModel(lr=0.05), train, val)
    client = MlflowClient(tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    counts = history_counts(client, logger.run_id)
    steps = tr.global_step
    assert steps == 32
    for k in range(N_METRICS):
        assert counts[f"train/m{k}"] == steps
    assert counts["val/loss"] == 2
    assert run.data.params["lr"] == "0.05"
    tags = run.data.tags
    assert tags["task"] == "classification" and tags["backbone"] == "linear"
    assert tags["hardware"] == "cpu"
    assert tags["git_commit"] == os.environ["GIT_COMMIT_SHA"]
    # delivered spools are cleaned up
    assert not list(spool_dir.glob("*.jsonl"))


def test_log_metrics_only_enqueues_until_flush(tracking_uri):
    logger = MLflowCVLogger(tracking_uri=tracking_uri, flush_interval_s=3600)
    run_id = logger.run_id
    for step in range(240):  # 960 points: under the 1,000 that wake the writer early
        logger.log_metrics({f"m{k}": float(step * k) for k in range(4)}, step=step)
    client = MlflowClient(tracking_uri)
    time.sleep(0.5)  # give a wrongly woken writer time to deliver (it has nothing to do otherwise)
    assert client.get_run(run_id).data.metrics == {}  # nothing delivered: log_metrics only appended
    assert logger.spool_path.stat().st_size > 0
    assert logger.flush() is True
    assert all(len(client.get_metric_history(run_id, f"m{k}")) == 240 for k in range(4))
    # a batch worth of points wakes the writer, but the caller is never held
    for step in range(240, 2500):
        logger.log_metrics({f"m{k}": float(step * k) for k in range(4)}, step=step)
    assert logger.flush() is True
    assert all(len(client.get_metric_history(run_id, f"m{k}")) == 2500 for k in range(4))
    logger.finalize("success")
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("process_nice", [None, 12])
def test_writer_thread_runs_at_a_lower_cpu_priority(tracking_uri, process_nice):
    """10 below the training thread's priority, also when the whole job already runs under `nice` (an absolute
    nice value of 10 would be no lower, or even higher, than a `nice -n 12` job's)."""
    if process_nice is not None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        if before > process_nice:
            pytest.skip(f"the test process already runs at nice {before}")
        os.setpriority(os.PRIO_PROCESS, tid, process_nice)  # threads created from here on inherit it
        try:
            _check_writer_priority(tracking_uri)
        finally:
            with contextlib.suppress(OSError):  # lowering it back needs privileges; pytest runs on in this thread
                os.setpriority(os.PRIO_PROCESS, tid, before)
        return
    _check_writer_priority(tracking_uri)


def _check_writer_priority(tracking_uri):
    logger = MLflowCVLogger(tracking_uri=tracking_uri, flush_interval_s=3600)
    logger.log_metrics({"x": 1.0}, step=0)
    writer = logger._writer
    assert writer is not None and writer.is_alive()
    deadline = time.monotonic() + 10
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    while os.getpriority(os.PRIO_PROCESS, writer.native_id) == main_nice and time.monotonic() < deadline:
        time.sleep(0.05)  # the thread lowers its own priority as it starts
    writer_nice = os.getpriority(os.PRIO_PROCESS, writer.native_id)  # a Linux thread's own nice value
    assert writer_nice == min(main_nice + 10, 19) and (writer_nice > main_nice or main_nice == 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice  # training thread untouched
    logger.finalize("success")


def test_git_commit_falls_back_to_git_rev_parse(tracking_uri, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    sha = subprocess.run([*git[:3], "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("GIT_COMMIT_SHA")
    monkeypatch.chdir(repo)
    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert MlflowClient(tracking_uri).get_run(logger.run_id).data.tags["git_commit"] == sha
    # outside a repository (and no GIT_COMMIT_SHA) no git_commit tag is invented
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert "git_commit" not in MlflowClient(tracking_uri).get_run(logger.run_id).data.tags


def test_spool_compacts_so_disk_and_memory_stay_bounded(tracking_uri, monkeypatch):
    monkeypatch.setattr(_journal, "COMPACT_BYTES", 10_000)
    logger = MLflowCVLogger(tracking_uri=tracking_uri, flush_interval_s=3600)
    _ = logger.run_id
    for step in range(3000):
        logger.log_metrics({"a": float(step), "b": 1.0}, step=step)
    assert logger.flush()
    assert logger.spool_path.stat().st_size < 10_000
    for step in range(3000, 3100):
        logger.log_metrics({"a": float(step)}, step=step)
    logger.finalize("success")
    assert len(MlflowClient(tracking_uri).get_metric_history(logger.run_id, "a")) == 3100


def test_images_figures_artifacts_and_dicts(tracking_uri, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    for step in (1, 2):
        logger.log_image("val/grid", torch.rand(3, 20, 30), step=step)
    logger.log_image("single", np.zeros((10, 12), dtype=np.uint8))
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    logger.log_figure("curve", fig)
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    logger.log_artifact(src, "extra")
    src.unlink()  # the spool kept a copy: deleting the original loses nothing
    logger.log_dict({"token": "abc", "a": 1}, "cfg/c.json")
    logger.log_text("text", "txt/t.txt")
    logger.finalize("success")
    client = MlflowClient(tracking_uri)
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    pngs = sorted(p for p in images if p.endswith(".png"))
    assert [p.split("+step+")[1].split("+")[0] for p in pngs if "val~grid" in p] == ["1", "2"]
    assert len([p for p in images if p.endswith(".webp")]) == 3
    (tmp_path / "dl").mkdir()  # MLflow 2.x needs the destination to exist
    local = client.download_artifacts(logger.run_id, pngs[-1], str(tmp_path / "dl"))
    from PIL import Image

    assert Image.open(local).size == (30, 20)
    assert client.get_run(logger.run_id).data.tags["mlflow.loggedImages"] == "True"
    paths = {a.path for d in ("figures", "extra", "cfg", "txt") for a in client.list_artifacts(logger.run_id, d)}
    assert paths == {"figures/curve.png", "extra/notes.txt", "cfg/c.json", "txt/t.txt"}
    cfg = json.loads(Path(client.download_artifacts(logger.run_id, "cfg/c.json", str(tmp_path / "dl"))).read_text())
    assert cfg == {"token": "***REDACTED***", "a": 1}


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.rand(2, 5, 5), r"\(C, H, W\) with C in \(1, 3, 4\)"),
        (torch.rand(5, 5) * 10, r"float images must be in \[0, 1\]"),
        (torch.zeros(2, 3, 8, 8), r"Log one image per call"),
        ("not-an-image", r"unsupported image type str"),
        (torch.zeros(4, 4, dtype=torch.int32), r"unsupported dtype int32"),
    ],
)
def test_bad_images_raise_with_the_fix(tracking_uri, image, match):
    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    logger.log_metrics({"kept": 1.0}, step=0)
    with pytest.raises(ValueError, match=match):
        logger.log_image("bad", image, step=0)
    logger.finalize("success")
    # what was logged before the mistake is not lost
    assert MlflowClient(tracking_uri).get_run(logger.run_id).data.metrics == {"kept": 1.0}


def test_bad_keys_values_and_params(tracking_uri, tmp_path):
    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    # Lightning's MLFlowLogger rule: the characters it rejects are deleted
    with pytest.warns(UserWarning, match=r"metric key 'acc@top1\(val\)' is logged as 'acctop1val'"):
        logger.log_metrics({"acc@top1(val)": 0.5}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same key warns only once
        logger.log_metrics({"acc@top1(val)": 0.6}, step=1)
    with pytest.warns(UserWarning, match=r"metric 'label' has a non-numeric value 'cat'.*not logged"):
        logger.log_metrics({"label": "cat", "ok": 1.0}, step=0)
    logger.log_metrics(
        {"nan": float("nan"), "inf": float("inf"), "grad": torch.tensor(2.0, requires_grad=True) * 1}, step=0
    )
    long_value = "x" * 10_000
    logger.log_hyperparams({"long": long_value, "model": {"depth": 3}, "db_password": "hunter2"})
    logger.finalize("success")
    client = MlflowClient(tracking_uri)
    run = client.get_run(logger.run_id)
    m = run.data.metrics
    assert m["acctop1val"] == 0.6 and m["ok"] == 1.0 and "label" not in m
    assert math.isnan(m["nan"]) and m["inf"] > 1e300 and m["grad"] == 2.0
    p = run.data.params
    assert len(p["long"]) == MAX_PARAM_VAL_LENGTH and p["long"].endswith("...")
    assert p["model/depth"] == "3" and p["db_password"] == "***REDACTED***"
    whole = json.loads(Path(client.download_artifacts(logger.run_id, "params/full_values.json", str(tmp_path))).read_text())
    assert whole["long"] == long_value


def test_unknown_task_tag_warns():
    with pytest.warns(UserWarning, match=r"task='segmentation' is not a known CV task.*semantic-segmentation"):
        MLflowCVLogger(tags={"task": "segmentation"})


def test_process_writer_delivers_and_compacts(tracking_uri, monkeypatch):
    monkeypatch.setattr(_journal, "COMPACT_BYTES", 10_000)
    logger = MLflowCVLogger(tracking_uri=tracking_uri, writer="process", flush_interval_s=0.2)
    for step in range(3000):
        logger.log_metrics({"a": float(step), "b": 1.0}, step=step)
    assert logger.flush()
    assert logger.spool_path.stat().st_size < 10_000  # the child compacted while the parent appended
    logger.finalize("success")
    client = MlflowClient(tracking_uri)
    assert len(client.get_metric_history(logger.run_id, "a")) == 3000
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match=r"`writer` must be one of \('auto', 'process', 'thread'\) or None, got 'fork'"):
        MLflowCVLogger(writer="fork")
    with pytest.raises(ValueError, match=r"`flush_interval_s` must be > 0 seconds, got 0"):
        MLflowCVLogger(flush_interval_s=0)
    with pytest.raises(ValueError, match=r"`nested=True` needs an active MLflow run"):
        MLflowCVLogger(nested=True)
    with pytest.raises(ValueError, match=r"either `nested=True` or `parent_run_id=`"):
        MLflowCVLogger(nested=True, parent_run_id="abc")


def test_nested_and_parent_runs_form_a_tree(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment("pipeline")
        with mlflow.start_run(run_name="full-pipeline") as parent:
            ids = []
            for stage in ("augment", "train"):
                logger = MLflowCVLogger(run_name=stage, nested=True)
                _fit(logger, max_epochs=1)
                ids.append(logger.run_id)
        explicit = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="pipeline", parent_run_id=parent.info.run_id, run_name="eval")
        explicit.log_metrics({"x": 1.0}, step=0)
        explicit.finalize("success")
        ids.append(explicit.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    assert sorted(r.info.run_name for r in children) == ["augment", "eval", "train"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_resume_from_checkpoint_continues_the_same_run(tracking_uri, tmp_path):
    train, val = loaders()
    first = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(first, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    tr.fit(TinyModel(lr=0.05), train, val)
    run_id = first.run_id

    second = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    tr2 = trainer(second, max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"param 'lr' was already logged for run .* as '0.05'; the new value '0.1' is not logged"):
        tr2.fit(TinyModel(lr=0.1), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.run_id == run_id and second.resumed
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.05"
    steps = [m.step for m in client.get_metric_history(run_id, "train/m0")]
    # epoch 0 from the first fit, epoch 1 from the resumed one: one continuous, duplicate-free history
    assert sorted(steps) == list(range(32))
    assert len(client.search_runs([run.info.experiment_id])) == 1



def test_explicit_run_id_wins_over_the_checkpoint_run(tracking_uri, tmp_path):
    """A checkpoint of run A, `MLflowCVLogger(run_id=B)`, `fit(ckpt_path=...)`: the resumed fit logs into B."""
    train, val = loaders()
    first = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(first, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(TinyModel(), train, val)
    run_a = first.run_id
    client = MlflowClient(tracking_uri)
    run_b = client.create_run(client.get_run(run_a).info.experiment_id, run_name="B").info.run_id

    explicit = MLflowCVLogger(tracking_uri=tracking_uri, run_id=run_b)
    tr = trainer(explicit, max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")], enable_checkpointing=True)
    tr.fit(TinyModel(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert explicit.run_id == run_b
    steps_b = sorted(m.step for m in client.get_metric_history(run_b, "train/m0"))
    assert steps_b == list(range(16, 32))  # the resumed epoch, in B
    assert sorted(m.step for m in client.get_metric_history(run_a, "train/m0")) == list(range(16))  # A untouched
    assert client.get_run(run_b).info.status == "FINISHED"


def test_status_failed_and_killed(tracking_uri):
    client = MlflowClient(tracking_uri)
    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(logger, model=TinyModel(fail_at_step=3))
    run = client.get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(logger.run_id, "train/m0")) == 3

    logger = MLflowCVLogger(tracking_uri=tracking_uri)
    with ctrl_c():  # Lightning turns Ctrl+C into a graceful shutdown (and, on newer releases, exit(1))
        _fit(logger, model=TinyModel(interrupt_at_step=2))
    assert client.get_run(logger.run_id).info.status == "KILLED"


def test_autolog_is_detected_with_the_fix():
    import inspect

    older = "checkpoint" not in inspect.signature(mlflow.pytorch.autolog).parameters  # MLflow < 2.19
    mlflow.pytorch.autolog(log_models=False, **({} if older else {"checkpoint": False}))
    try:
        with pytest.warns(UserWarning, match=r"mlflow.pytorch.autolog\(\)` is active.*autolog\(disable=True\)"):
            MLflowCVLogger()
    finally:
        mlflow.pytorch.autolog(disable=True)


def test_unwritable_spool_dir_warns_and_still_delivers(tracking_uri, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match=r"cannot write the spool file .*Training continues.*set `spool_dir=`"):
        logger = MLflowCVLogger(tracking_uri=tracking_uri, spool_dir=str(blocker / "spool"))
        _ = logger.run_id
    train, val = loaders()
    tr = trainer(logger, max_epochs=1)
    tr.fit(TinyModel(), train, val)
    client = MlflowClient(tracking_uri)
    assert len(client.get_metric_history(logger.run_id, "train/m3")) == 16
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_find_logger_error_names_the_fix():
    from lightning_mlflow_cv.callbacks._context import find_mlflow_logger

    tr = trainer(False, max_epochs=1)
    with pytest.raises(RuntimeError, match=r"MyCallback needs an MLflowCVLogger.*found: none.*Trainer\(logger=MLflowCVLogger"):
        find_mlflow_logger(tr, "MyCallback")


def test_a_rejected_item_is_found_by_bisection_and_the_rest_is_stored(tracking_uri, tmp_path):
    """Points MLflow refuses (here the 8 of one step carry text values, which the logger itself would have
    dropped) among 400: the other 392 are stored, the bad ones are reported and kept, and finding them costs a
    few dozen requests, not 400."""
    spool = Spool(tmp_path / "sp", "bisect")
    spool.append({"t": "run", "tracking_uri": tracking_uri, "experiment_name": "bisect", "tags": {}})
    for step in range(50):
        record = {"t": "m", "s": step, "ts": 1_700_000_000_000 + step, "d": {f"k{i}": float(step) for i in range(8)}}
        if step == 37:
            record["d"] = {f"k{i}": "n/a" for i in range(8)}  # MLflow rejects these (INVALID_PARAMETER_VALUE)
        spool.append(record)
    client = MlflowClient(tracking_uri)
    calls = []
    real_log_batch = client.log_batch

    def counting_log_batch(*args, **kwargs):
        calls.append(len(kwargs.get("metrics") or []))
        return real_log_batch(*args, **kwargs)

    client.log_batch = counting_log_batch  # counts requests; the real store does the work
    deliverer = Deliverer(client, spool, None)
    with pytest.warns(RuntimeWarning, match=r"MLflow rejected metric k\d=n/a .* kept in .*bisect\.rejected\.jsonl"):
        deliverer.deliver(0)
    assert deliverer.rejected == 8
    counts = {k: len(client.get_metric_history(deliverer.run_id, f"k{k}")) for k in range(8)}
    assert counts == {k: 49 for k in range(8)}
    assert len(calls) <= 40, f"{len(calls)} requests to isolate 8 bad points"
    assert len((tmp_path / "sp" / "bisect.rejected.jsonl").read_text().splitlines()) == 8
