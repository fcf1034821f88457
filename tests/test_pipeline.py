"""pipeline_run: a parent run with one child run per stage, found by parent run id."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from tiny import TinyModel, loaders, trainer

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv.pipeline import pipeline_run


def test_pipeline_tree_with_stage_runs_and_parent_summary(tracking_uri):
    train, val = loaders()
    model = TinyModel()
    with pipeline_run("full-pipeline", experiment="pipe", tracking_uri=tracking_uri, tags={"task": "classification"}) as p:
        with p.stage("data-augmentation"):
            logger = MLflowCVLogger()
            logger.log_hyperparams({"flip": True})
            logger.log_metrics({"aug/samples": 64.0}, step=0)
            logger.finalize("success")
        with p.stage("training"):
            logger = MLflowCVLogger()  # default settings: logs into the stage's run
            trainer(logger, max_epochs=1).fit(model, train, val)
            assert logger.run_id == p.stages[-1].run_id
        with p.stage("evaluation"):
            trainer(MLflowCVLogger(), max_epochs=1).validate(model, val)
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [p.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{p.run_id}'", order_by=["start_time ASC"]
    )
    assert [r.info.run_name for r in children] == ["data-augmentation", "training", "evaluation"]
    by_name = {r.info.run_name: r for r in children}
    assert by_name["data-augmentation"].data.params == {"flip": "True"}
    assert "train/m0" in by_name["training"].data.metrics and by_name["training"].data.params["lr"] == "0.05"
    assert "val/loss" in by_name["evaluation"].data.metrics
    assert all(r.info.status == "FINISHED" for r in children)
    parent = client.get_run(p.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["training/val/loss"] == by_name["training"].data.metrics["val/loss"]
    assert parent.data.metrics["data-augmentation/aug/samples"] == 64.0
    assert parent.data.tags["pipeline_stages"] == "data-augmentation,training,evaluation"


def test_failed_stage_marks_stage_and_parent_failed(tracking_uri):
    with pytest.raises(RuntimeError, match="boom"):
        with pipeline_run("p", tracking_uri=tracking_uri) as p:
            with p.stage("training"):
                raise RuntimeError("boom")
    client = MlflowClient(tracking_uri)
    assert client.get_run(p.stages[0].run_id).info.status == "FAILED"
    assert client.get_run(p.run_id).info.status == "FAILED"


def test_stage_name_is_checked(tracking_uri):
    with pipeline_run("p", tracking_uri=tracking_uri) as p:
        with pytest.raises(ValueError, match=r"`name` must be a non-empty string, got ''"):
            with p.stage(""):
                pass


def test_a_logger_naming_the_pipelines_store_joins_the_stage_run(tracking_uri, tmp_path):
    """`MLflowCVLogger(tracking_uri=...)` with the pipeline's store, spelled as given or relative to the cwd (the
    tests run in tmp_path), logs into the stage's run instead of starting an unrelated top-level run."""
    train, val = loaders()
    same_store_spellings = [tracking_uri, "sqlite:///store.db"]
    with pipeline_run("p", experiment="pipe", tracking_uri=tracking_uri) as p:
        for i, uri in enumerate(same_store_spellings):
            with p.stage(f"training-{i}"):
                logger = MLflowCVLogger(tracking_uri=uri, experiment_name="somewhere-else")
                trainer(logger, max_epochs=1).fit(TinyModel(), train, val)
                assert logger.run_id == p.stages[-1].run_id
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs) == ["p", "training-0", "training-1"]
    for stage in p.stages:
        run = client.get_run(stage.run_id)
        assert "train/m0" in run.data.metrics and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == p.run_id


def test_a_logger_naming_another_store_warns_with_both_stores_and_the_fix(tracking_uri, tmp_path):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pipeline_run("p", tracking_uri=tracking_uri) as p:
        with p.stage("training"):
            with pytest.warns(UserWarning, match=r"stage .*'training'.* lives in .*store\.db.* but `tracking_uri` "
                              r".*other\.db.* is another store.*Fix: drop `tracking_uri`"):
                logger = MLflowCVLogger(tracking_uri=other, experiment_name="elsewhere")
            logger.log_metrics({"m": 1.0}, step=0)
            logger.finalize("success")
            assert logger.run_id != p.stages[0].run_id
    run = MlflowClient(other).get_run(logger.run_id)
    assert run.data.metrics["m"] == 1.0 and "mlflow.parentRunId" not in run.data.tags
