"""Run creation and the offline start: the run a fit logs into (resumed, created, or a placeholder while the
store is unreachable), its spool opened and its writer started (a mixin of
:class:`~lightning_mlflow_cv.logger.MLflowCVLogger`)."""

from __future__ import annotations

import logging
import uuid
import warnings
from typing import TYPE_CHECKING, Any

from lightning_mlflow_cv._delivery import http as _http
from lightning_mlflow_cv._delivery.deliverer import describe_failure, is_retryable
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._facts.redact import safe_uri
from lightning_mlflow_cv._facts.runs import create_run, get_or_create_experiment
from lightning_mlflow_cv._logger.state import LoggerState
from lightning_mlflow_cv.environment import hardware_summary

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from mlflow import MlflowClient

log = logging.getLogger("lightning_mlflow_cv.logger")


class RunStartMixin(LoggerState):
    """Start (or resume) the run, or start offline; open the run's spool."""

    def _start_run(self, trainer: pl.Trainer | None) -> None:
        self._warn_if_autolog()
        tags = {**self._context_tags, **dict(self.tags or {})}
        tags.setdefault("hardware", hardware_summary(trainer))
        header: dict[str, Any] = {
            "t": "run",
            "tracking_uri": safe_uri(self._tracking_uri),
            "experiment_name": self._experiment_name,
            "experiment_id": self._parent_experiment_id,
            "run_name": self._run_name,
            "tags": tags,
            "parent_run_id": self._parent_run_id,
            "artifact_location": self._artifact_location,
        }
        client = self._mlflow_client
        if self._run_id is not None and self._run_id.startswith("offline-"):
            # resuming a fit that started offline: its spool knows whether the run was created since
            from lightning_mlflow_cv._delivery.journal import default_spool_dir

            bound = Spool(self._spool_dir or default_spool_dir(), self._run_id).header().get("run_id")
            if not bound:
                self.offline = True
                self._open_spool(self._run_id, header)
                return
            self._run_id = bound
        if self._run_id is not None:
            self.resumed = True
            try:
                with _http.fail_fast(self._request_timeout_s):
                    run = client.get_run(self._run_id)
                self._experiment_id = run.info.experiment_id
                self._params = dict(run.data.params)
            except Exception as err:  # noqa: BLE001
                if not is_retryable(err):
                    raise ValueError(
                        f"MLflowCVLogger: run_id={self._run_id!r} does not exist in {safe_uri(self._tracking_uri)} "
                        f"({err}). Pass an existing run id, or none to start a new run."
                    ) from err
                self.offline = True
            header["run_id"] = self._run_id
            self._open_spool(self._run_id, header)
            self._spool.append({"t": "status", "status": "RUNNING"})  # type: ignore[union-attr]
            return
        try:
            with _http.fail_fast(self._request_timeout_s):
                if header["experiment_id"] is None:
                    header["experiment_id"] = self._resolve_experiment_id(client)
                self._run_id = create_run(client, header)
                self._experiment_id = header["experiment_id"]
        except Exception as err:  # noqa: BLE001
            if not is_retryable(err):
                raise
            self.offline = True
            placeholder = f"offline-{uuid.uuid4().hex}"
            self._run_id = placeholder
            self._open_spool(placeholder, header)
            warnings.warn(
                f"MLflowCVLogger: cannot create the MLflow run at {safe_uri(self._tracking_uri)} "
                f"({describe_failure(err)}). Training continues offline; everything is kept in "
                f"{self._spool.path} and the run is created when the store comes back. If it does not before the "  # type: ignore[union-attr]
                f"fit ends: lightning-mlflow-cv sync {self._spool.path}",  # type: ignore[union-attr]
                RuntimeWarning,
                stacklevel=2,
            )
            return
        header["run_id"] = self._run_id
        self._open_spool(self._run_id, header)

    def _resolve_experiment_id(self, client: MlflowClient) -> str:
        return get_or_create_experiment(client, self._experiment_name, self._artifact_location)

    def _open_spool(self, key: str, header: dict[str, Any]) -> None:
        from lightning_mlflow_cv._delivery.journal import default_spool_dir

        spool = Spool(self._spool_dir or default_spool_dir(), key)
        self._spool_key = key
        if spool.end == 0 or not spool.header():
            spool.append(header)
        elif spool.pending > 0:
            log.warning("MLflowCVLogger: replaying %d undelivered bytes from %s", spool.pending, spool.path)
        self._spool = spool
        self._ensure_writer()
        if not self.offline:  # deliver spools older fits left behind for this store, in the background
            from lightning_mlflow_cv._delivery import autosync as _autosync

            _autosync.start(spool.directory, self._tracking_uri, skip=(key,), request_timeout_s=self._request_timeout_s)
