"""Resume and the Trainer lookup: `resume_from=` (public), the frame-walk fallback and its warning."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._facts import trainer_frames as _trainer_frames
from lightning_mlflow_cv.logger import run_id_from_checkpoint


def test_outside_a_trainer_the_frame_walk_finds_nothing_and_reports_no_miss():
    ctx = _trainer_frames.trainer_context()
    assert ctx.trainer is None and ctx.ckpt_path is None and not ctx.missed


def test_the_frame_walk_finds_the_trainer_and_the_checkpoint_of_the_running_fit(tracking_uri, tmp_path):
    """On the Lightning installed here (2.6.6, or 2.2.0 at the floor), the named frames are found: no warning,
    checkpoint read."""
    seen = []

    class Probe(MLflowCVLogger):
        def _initialize(self) -> None:
            seen.append(_trainer_frames.trainer_context())
            super()._initialize()

    train, val = loaders()
    first = MLflowCVLogger(tracking_uri=tracking_uri)
    trainer(first, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
            enable_checkpointing=True).fit(TinyModel(), train, val)
    probe = Probe(tracking_uri=tracking_uri)
    tr = trainer(probe, max_epochs=2)
    tr.fit(TinyModel(), train, val, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert seen[0].trainer is tr and not seen[0].missed
    assert seen[0].ckpt_path == str(tmp_path / "ck" / "last.ckpt")
    assert probe.run_id == first.run_id


def test_renamed_lightning_frames_warn_and_the_public_paths_still_resume(tracking_uri, tmp_path, monkeypatch):
    """As if Lightning renamed `_call_setup_hook` and `Trainer._run`: one warning naming the versions checked and
    the fix; the run id still reaches every checkpoint (the Trainer is found among Lightning's frames), a restored
    checkpoint of another run is reported by the callback's public `load_state_dict`, and `resume_from=` continues
    the checkpoint's run."""
    monkeypatch.setattr(_trainer_frames, "SETUP_FRAME", "_renamed_setup_hook")
    monkeypatch.setattr(_trainer_frames, "RUN_FRAME", "_renamed_run")
    train, val = loaders()
    ckpt = tmp_path / "ck" / "last.ckpt"
    first = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    tr = trainer(first, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
                 enable_checkpointing=True)
    with pytest.warns(RuntimeWarning, match=r"checked on Lightning 2\.2\.0 and 2\.6\.6; this is Lightning .*Fix: "
                      r"`MLflowCVLogger\(resume_from=<the checkpoint>\)`"):
        tr.fit(TinyModel(), train, val)
    assert run_id_from_checkpoint(ckpt) == first.run_id

    plain = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    with pytest.warns(RuntimeWarning, match=rf"restored a checkpoint of MLflow run {first.run_id}, but logs into the new run"):
        trainer(plain, max_epochs=2).fit(TinyModel(), train, val, ckpt_path=str(ckpt))
    assert plain.run_id != first.run_id

    resumed = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume", resume_from=ckpt)
    trainer(resumed, max_epochs=2).fit(TinyModel(), train, val, ckpt_path=str(ckpt))
    assert resumed.run_id == first.run_id and resumed.resumed
    client = MlflowClient(tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/m0")) == list(range(32))


def test_resume_from_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"either `run_id=` or `resume_from=` \(got run_id='abc' and resume_from="):
        MLflowCVLogger(run_id="abc", resume_from=tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError, match=r"`resume_from` must be a Lightning checkpoint file, got .*nope\.ckpt"):
        MLflowCVLogger(resume_from=tmp_path / "nope.ckpt")


def test_known_run_id_reads_the_run_id_without_creating_the_run(tracking_uri):
    logger = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="quiet")
    assert logger.known_run_id is None
    assert MlflowClient(tracking_uri).get_experiment_by_name("quiet") is None
    assert logger.run_id == logger.known_run_id is not None
    logger.finalize("success")


def test_a_checkpoint_unreadable_before_the_run_starts_warns_once_naming_both_runs(tracking_uri, tmp_path, monkeypatch):
    """When the run id cannot be read from the checkpoint before the run is chosen (as with torch.load(mmap=) on
    torch 2.0, before the compat module), the fit starts a new run, and says so once: both run ids, why, the fix."""
    from lightning_mlflow_cv._compat import frameworks as _compat_frameworks

    train, val = loaders()
    first = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    trainer(first, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
            enable_checkpointing=True).fit(TinyModel(), train, val)
    ckpt = tmp_path / "ck" / "last.ckpt"

    def unreadable(path):
        raise TypeError("load() got an unexpected keyword argument 'mmap'")

    monkeypatch.setattr(_compat_frameworks, "load_checkpoint", unreadable)
    plain = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="resume")
    with pytest.warns(RuntimeWarning) as record:
        trainer(plain, max_epochs=2).fit(TinyModel(), train, val, ckpt_path=str(ckpt))
    ours = [str(w.message) for w in record if "MLflowCVLogger" in str(w.message)]
    assert len(ours) == 1, ours
    assert plain.run_id != first.run_id
    assert first.run_id in ours[0] and plain.run_id in ours[0], ours[0]
    assert "unexpected keyword argument 'mmap'" in ours[0] and "resume_from=" in ours[0], ours[0]


def test_an_unreadable_resume_from_warns_at_run_start_naming_the_new_run(tracking_uri, tmp_path, monkeypatch):
    from lightning_mlflow_cv._compat import frameworks as _compat_frameworks

    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(_compat_frameworks, "load_checkpoint", lambda path: 1 / 0)
    logger = MLflowCVLogger(tracking_uri=tracking_uri, resume_from=ckpt)
    with pytest.warns(RuntimeWarning, match=r"could not read the MLflow run id from resume_from=.*x\.ckpt.*"
                      r"ZeroDivisionError.*logs into the new run \w+\. Fix: pass the checkpoint's run as `run_id=`"):
        run_id = logger.run_id
    assert run_id and not logger.resumed
    logger.finalize("success")
