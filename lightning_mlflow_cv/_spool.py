"""Run helpers the journal's delivery needs: create the run a spool header describes, set a run's status.

The journal, its delivery, the writer and ``sync`` live in :mod:`lightning_mlflow_cv._journal`,
:mod:`lightning_mlflow_cv._delivery`, :mod:`lightning_mlflow_cv._writer` and :mod:`lightning_mlflow_cv.spool_sync`.
"""

from __future__ import annotations

import time
from typing import Any


def set_run_status(client: Any, run_id: str, status: str, end_time: int | None = None) -> None:
    """Set the run status through the store, not ``MlflowClient.set_terminated``: the latter prints the run
    URL to stdout, credentials included when the tracking URI carries ``user:pass@``."""
    from mlflow.entities import RunStatus

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is None:  # pragma: no cover - other MLflow versions
        client.set_terminated(run_id, status, end_time=end_time)
        return
    if status == "RUNNING":
        end_time = None
    else:
        end_time = end_time or int(time.time() * 1000)
    store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)



def create_run(client: Any, header: dict[str, Any]) -> str:
    """Create the run a spool header describes (experiment created when missing)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    exp_id = header.get("experiment_id")
    if exp_id is None:
        name = header.get("experiment_name") or "Default"
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            try:
                exp_id = client.create_experiment(name, artifact_location=header.get("artifact_location"))
            except Exception as err:  # another process created it between the lookup and here
                exp = client.get_experiment_by_name(name) if getattr(err, "error_code", None) == "RESOURCE_ALREADY_EXISTS" else None
                if exp is None or exp.lifecycle_stage == "deleted":
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
    tags = dict(header.get("tags") or {})
    if header.get("run_name"):
        tags[MLFLOW_RUN_NAME] = header["run_name"]
    if header.get("parent_run_id"):
        tags[MLFLOW_PARENT_RUN_ID] = header["parent_run_id"]
    run = client.create_run(experiment_id=exp_id, tags=tags, run_name=header.get("run_name"))
    return run.info.run_id

