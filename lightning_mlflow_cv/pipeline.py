"""``pipeline_run``: one parent MLflow run per pipeline, one child run per stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lightning_mlflow_cv._facts.keys import validate_tags
from lightning_mlflow_cv._facts.runs import (
    ACTIVE_STAGE,  # noqa: F401 - kept importable from here
    Stage,
    active_stage,
    default_tracking_uri,
    get_or_create_experiment,
    set_run_status,
    status_on_exit,
)


@dataclass
class Pipeline:
    """The parent run of :func:`pipeline_run`; open stages with :meth:`stage`."""

    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    stages: list[Stage] = field(default_factory=list)

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    @contextlib.contextmanager
    def stage(self, name: str, tags: dict[str, Any] | None = None) -> Iterator[Stage]:
        """Open a child run. A Trainer inside, with a default ``MLflowCVLogger()``, logs into it.

        On exit the stage's final metrics are copied to the parent as ``<stage>/<metric>`` (the summary), and
        the child is marked FINISHED (FAILED if the block raised, KILLED on Ctrl+C).
        """
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if not name or not isinstance(name, str):
            raise ValueError(f"pipeline_run.stage: `name` must be a non-empty string, got {name!r}.")
        client = self.client
        run = client.create_run(
            self.experiment_id,
            run_name=name,
            tags={**validate_tags(tags), MLFLOW_PARENT_RUN_ID: self.run_id, "pipeline_stage": name},
        )
        stage = Stage(name, run.info.run_id, self.experiment_id, self.tracking_uri)
        self.stages.append(stage)
        outcome = {"status": "FINISHED"}
        try:
            with active_stage(stage), status_on_exit(outcome):
                yield stage
        finally:
            self._summarise(client, stage)
            set_run_status(client, stage.run_id, outcome["status"])

    def _summarise(self, client: Any, stage: Stage) -> None:
        from mlflow.entities import Metric

        metrics = client.get_run(stage.run_id).data.metrics
        now = int(time.time() * 1000)
        points = [Metric(f"{stage.name}/{k}", v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(points), 1000):
            client.log_batch(self.run_id, metrics=points[i : i + 1000])


@contextlib.contextmanager
def pipeline_run(
    name: str,
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[Pipeline]:
    """A parent run with one child run per stage.

    Args:
        name: Run name of the parent.
        experiment: Experiment name (default: ``name``).
        tags: Tags of the parent (CV tag schema, see :class:`~lightning_mlflow_cv.MLflowCVLogger`).
        tracking_uri: Store; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the cwd.

    Example::

        from lightning_mlflow_cv import MLflowCVLogger, pipeline_run

        with pipeline_run("full-pipeline", experiment="digits") as p:
            with p.stage("training"):
                Trainer(logger=MLflowCVLogger(), max_epochs=3).fit(model, datamodule=dm)
            with p.stage("evaluation"):
                Trainer(logger=MLflowCVLogger()).test(model, datamodule=dm)
        # runs: full-pipeline -> training, evaluation; the parent holds training/val/acc etc.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment or name)
    run = client.create_run(exp_id, run_name=name, tags={**validate_tags(tags), "pipeline": name})
    pipe = Pipeline(name, run.info.run_id, exp_id, uri)
    outcome = {"status": "FINISHED"}
    try:
        with status_on_exit(outcome):
            yield pipe
    finally:
        client.set_tag(pipe.run_id, "pipeline_stages", ",".join(s.name for s in pipe.stages))
        set_run_status(client, pipe.run_id, outcome["status"])
