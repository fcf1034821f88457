"""``ray_sweep``: one parent MLflow run per Ray Tune sweep, one child run per trial on whichever worker runs it.

Who does what:

- The driver creates the parent run, then hands Tune a :class:`_TrialTrainable` that carries the parent run
  id, experiment id and tracking URI *inside the pickled trainable* (no driver global reaches a worker).
- On the worker, the trainable gets or creates the trial's child run (tag ``ray.trial_id``), sets it as the
  active stage (so a plain ``MLflowCVLogger()`` logs into it) and ``MLFLOW_RUN_ID`` / ``MLFLOW_TRACKING_URI``
  (so fluent ``mlflow.log_*`` calls do too), runs the user's function and, when it returns, tags the run
  ``trial_state=COMPLETE`` and ends it FINISHED.
- A Tune callback on the driver (:class:`_RunStates`) ends the others: a trial that Tune completed without
  the worker's ``COMPLETE`` was stopped by the scheduler (KILLED, ``STOPPED``); an errored trial, even one
  whose worker process died, is FAILED. Then the parent gets the summary shared with ``optuna_sweep``.

Ray is an optional dependency (``pip install "lightning-mlflow-cv[ray]"``), imported lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning_mlflow_cv._facts.keys import MAX_TAG_VAL_LENGTH, metric_key, sanitize_key, validate_tags
from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv._facts.runs import (
    Stage,
    active_stage,
    default_tracking_uri,
    get_or_create_experiment,
    set_run_status,
    status_on_exit,
)
from lightning_mlflow_cv._sweeps.tracking import (
    TRIAL_STATE_TAG,
    Best,
    drain_loggers,
    log_batch,
    new_params,
    param,
    warn_tracking,
    write_summary,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from ray.tune import ResultGrid

#: Child-run tag holding Ray Tune's trial id.
TRIAL_ID_TAG = "ray.trial_id"
#: Child-run tag holding Ray Tune's trial name.
TRIAL_NAME_TAG = "ray.trial_name"
#: ``trial_state`` values written by ray_sweep, and the MLflow run status each ends with.
RAY_RUN_STATUS = {"COMPLETE": "FINISHED", "STOPPED": "KILLED", "FAIL": "FAILED"}
_INSTALL_HINT = 'pip install "lightning-mlflow-cv[ray]"'
_WHO = "ray_sweep"
_KEEPS = "Ray Tune's ResultGrid still holds every trial"


@dataclass
class RayTrialContext:
    """The running ray_sweep trial in this worker thread (``run_id`` None when it could not be created)."""

    trial_id: str
    run_id: str | None
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    #: Metrics a :class:`RayTuneReportCallback` held back at the last validation of the fit (reported to Tune
    #: after the run is FINISHED, so a scheduler stop at that point cannot cut the fit short).
    pending_report: dict[str, float] | None = None
    reports: int = 0
    #: Set when Tune stopped the trial (``tune.report`` raised ``SystemExit(0)``).
    stopped: bool = False
    loggers: list[Any] = field(default_factory=list)


ACTIVE_RAY_TRIAL: contextvars.ContextVar[RayTrialContext | None] = contextvars.ContextVar(
    "lmc_active_ray_trial", default=None
)


def _import_ray() -> Any:
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ray_sweep needs Ray Tune, which is not installed ({err}). Fix: {_INSTALL_HINT}") from err
    return ray


def trial_number(trial_id: str) -> int | None:
    """Tune's trial ids end in the trial's index (``"4f2ab_00003"`` -> 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _run_name(trial_id: str) -> str:
    n = trial_number(trial_id)
    return f"trial-{n}" if n is not None else f"trial-{trial_id}"


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{key}/"))
        else:
            out[key] = v
    return out


def _find_child(client: Any, exp_id: str, parent: str, trial_id: str) -> Run | None:
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent}'",
        max_results=1,
    )
    return runs[0] if runs else None


def _create_child(
    client: Any, exp_id: str, parent: str, trial_id: str, trial_name: str | None, tags: Mapping[str, str]
) -> Run:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return client.create_run(
        exp_id,
        run_name=_run_name(trial_id),
        tags={
            **tags,
            MLFLOW_PARENT_RUN_ID: parent,
            TRIAL_ID_TAG: trial_id,
            **({TRIAL_NAME_TAG: trial_name} if trial_name else {}),
            TRIAL_STATE_TAG: "RUNNING",
        },
    )


# ----------------------------------------------------------------------------------------------------------
# files/local-store check
# ----------------------------------------------------------------------------------------------------------
def is_local_file_store(uri: str) -> bool:
    """True for a tracking URI that is a file on this machine (``sqlite:///...``, ``file:...``, a bare path)."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""
    return scheme in ("", "file", "sqlite")


def check_store_reachable(uri: str, nodes: list[Mapping[str, Any]], driver_ip: str) -> None:
    """Fail fast when trials on other machines could not reach a file-based tracking store.

    Args:
        uri: The sweep's tracking URI.
        nodes: ``ray.nodes()`` of the cluster.
        driver_ip: This machine's Ray node IP (``ray.util.get_node_ip_address()``).

    Raises:
        ValueError: ``uri`` is a local SQLite/file store and an alive node has another IP.
    """
    if not is_local_file_store(uri):
        return
    remote = sorted(
        {str(n.get("NodeManagerAddress")) for n in nodes if n.get("Alive") and n.get("NodeManagerAddress") != driver_ip}
    )
    if remote:
        raise ValueError(
            f"ray_sweep: `tracking_uri` {redact_text(uri)!r} is a file on this machine ({driver_ip}), but the Ray "
            f"cluster has nodes on other machines ({', '.join(remote[:5])}); trials there could not write to it. "
            "Fix: run a tracking server every node can reach (`mlflow server --host 0.0.0.0 --port 5000 "
            "--backend-store-uri postgresql+psycopg2://... --artifacts-destination ...`) and pass "
            "`tracking_uri='http://<server>:5000'` (or set MLFLOW_TRACKING_URI)."
        )


# ----------------------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _TrialTrainable:
    """The user's function wrapped with the sweep's MLflow coordinates (pickled by Ray with the trial)."""

    def __init__(
        self,
        fn: Callable[[dict[str, Any]], Any],
        *,
        parent_run_id: str,
        experiment_id: str,
        tracking_uri: str,
        tags: Mapping[str, str],
    ) -> None:
        self.fn = fn
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.tags = dict(tags)
        self.__name__ = getattr(fn, "__name__", "trainable")  # Tune names trials after it
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, config: dict[str, Any]) -> Any:
        import ray.tune
        from mlflow import MlflowClient

        ctx = ray.tune.get_context()
        trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
        client = MlflowClient(self.tracking_uri)
        tr = RayTrialContext(trial_id, None, self.parent_run_id, self.experiment_id, self.tracking_uri)
        try:  # a retried trial (max_failures > 0) continues its run
            run = _find_child(client, self.experiment_id, self.parent_run_id, trial_id)
            if run is None:
                run = _create_child(client, self.experiment_id, self.parent_run_id, trial_id, trial_name, self.tags)
            else:
                set_run_status(client, run.info.run_id, "RUNNING")
            tr.run_id = run.info.run_id
        except Exception as err:  # noqa: BLE001 - tracking never stops the sweep
            warn_tracking(_WHO, f"create the MLflow run of trial {trial_id}", err, _KEEPS)
        token = ACTIVE_RAY_TRIAL.set(tr)
        stage = Stage(_run_name(trial_id), tr.run_id, self.experiment_id, self.tracking_uri) if tr.run_id else None
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri, **({"MLFLOW_RUN_ID": tr.run_id} if tr.run_id else {})}
        try:
            with _env(env), active_stage(stage):
                out = self.fn(config)
        except SystemExit as err:
            if err.code in (0, None):  # Tune stopped the trial: `tune.report` exits its thread with SystemExit(0)
                self._end(client, tr, "STOPPED")
            else:
                self._end(client, tr, "FAIL", f"SystemExit: {err.code}")
            raise
        except BaseException as err:
            self._end(client, tr, "FAIL", redact_text(f"{type(err).__name__}: {err}")[:MAX_TAG_VAL_LENGTH])
            raise
        finally:
            ACTIVE_RAY_TRIAL.reset(token)
        self._end(client, tr, "COMPLETE")
        if tr.pending_report is not None:  # the fit's last validation, held back until the run was FINISHED
            ray.tune.report(tr.pending_report)
            tr.reports += 1
        if tr.reports == 0:
            warnings.warn(
                f"ray_sweep: trial {trial_id} reported no metrics to Ray Tune, so its scheduler and the sweep "
                "summary have nothing to compare. Fix: add `RayTuneReportCallback()` (lightning_mlflow_cv.callbacks) "
                "to the Trainer in your trainable, or call `ray.tune.report({...})`.",
                RuntimeWarning,
                stacklevel=2,
            )
        return out

    @staticmethod
    def _end(client: Any, tr: RayTrialContext, state: str, error: str | None = None) -> None:
        drain_loggers(tr.run_id, tr.loggers)
        if tr.run_id is None:
            return
        from mlflow.entities import RunTag

        try:
            tags = [RunTag(TRIAL_STATE_TAG, state)]
            if error:
                tags.append(RunTag("ray.fail_reason", error))
            log_batch(client, tr.run_id, tags=tags)
            set_run_status(client, tr.run_id, RAY_RUN_STATUS[state])
        except Exception as err:  # noqa: BLE001
            warn_tracking(_WHO, f"end the MLflow run {tr.run_id} of trial {tr.trial_id}", err, _KEEPS)


# ----------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------
def _run_states_callback(
    client: Any, parent: str, exp_id: str, metric: str, metric_name: str, tags: Mapping[str, str]
) -> Any:
    import ray.tune

    class _RunStates(ray.tune.Callback):
        """Ends each trial's child run with the state Tune gave the trial (driver side)."""

        def __init__(self) -> None:
            self.states: dict[str, str] = {}
            self.run_ids: dict[str, str] = {}
            self.trials: list[Any] = []

        def _run(self, trial: Any) -> Run:
            run = _find_child(client, exp_id, parent, trial.trial_id)
            if run is None:  # the worker died (or could not reach the store) before creating it
                run = _create_child(client, exp_id, parent, trial.trial_id, str(trial), tags)
                run = client.get_run(run.info.run_id)
            self.run_ids[trial.trial_id] = run.info.run_id
            return run

        def _close(self, trial: Any, failed: bool) -> None:
            from mlflow.entities import Metric, RunTag

            try:
                run = self._run(trial)
                worker_state = run.data.tags.get(TRIAL_STATE_TAG)
                state = "FAIL" if failed else ("COMPLETE" if worker_state == "COMPLETE" else "STOPPED")
                self.states[trial.trial_id] = state
                result = trial.last_result or {}
                now = int(time.time() * 1000)
                metrics = []
                value = result.get(metric)
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    metrics.append(Metric(metric_name, float(value), now, int(result.get("training_iteration", 0))))
                if "training_iteration" in result:
                    metrics.append(Metric("ray/training_iteration", float(result["training_iteration"]), now, 0))
                run_tags = [RunTag(TRIAL_STATE_TAG, state)]
                if failed and "ray.fail_reason" not in run.data.tags:
                    run_tags.append(RunTag("ray.fail_reason", _error_text(trial)))
                params = new_params(run.data.params, _flat(trial.config or {}), "tune")
                log_batch(client, run.info.run_id, metrics, params, run_tags)
                if run.info.status != RAY_RUN_STATUS[state] or worker_state != state:
                    set_run_status(client, run.info.run_id, RAY_RUN_STATUS[state])
            except Exception as err:  # noqa: BLE001
                warn_tracking(_WHO, f"record trial {trial.trial_id} in MLflow", err, _KEEPS)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.trials = trials
            self._close(trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.trials = trials
            self._close(trial, failed=True)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.trials = trials

    return _RunStates()


def _error_text(trial: Any) -> str:
    """Tune's error text for a failed trial (the worker did not record one: its process died, most often)."""
    text = ""
    try:
        path = getattr(trial, "error_file", None)
        if path and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read().strip()
    except Exception:  # noqa: BLE001
        text = ""
    text = text or "the trial's worker process ended without a Python error (it died)"
    return redact_text(text)[-1000:]


def _sweep_figure(points: list[tuple[int, float | None, str]], metric_name: str, mode: str) -> Any:
    """Objective per trial in trial order, coloured by state, with the running best of completed trials."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colours = {"COMPLETE": "tab:blue", "STOPPED": "tab:orange", "FAIL": "tab:red"}
    for state, colour in colours.items():
        xs = [n for n, v, s in points if s == state and v is not None]
        ys = [v for n, v, s in points if s == state and v is not None]
        if xs:
            ax.scatter(
                xs,
                ys,
                c=colour,
                label={"STOPPED": "stopped by scheduler", "FAIL": "failed (last report)"}.get(state, "complete"),
            )
    best, bx, by = None, [], []
    for n, v, s in points:
        if s == "COMPLETE" and v is not None:
            best = v if best is None else (min(best, v) if mode == "min" else max(best, v))
        if best is not None:
            bx.append(n)
            by.append(best)
    if bx:
        ax.step(bx, by, where="post", c="tab:green", label="best so far")
    ax.set_xlabel("trial (Tune's order)")
    ax.set_ylabel(f"{metric_name} (last reported)")
    ax.set_title("Ray Tune sweep")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


@dataclass
class RaySweep:
    """What :func:`ray_sweep` returns: Ray's ``ResultGrid`` and the MLflow runs it made."""

    results: ResultGrid
    parent_run_id: str
    experiment_id: str
    #: Ray trial id -> MLflow child run id.
    trial_runs: dict[str, str]
    #: Ray trial id -> ``COMPLETE`` / ``STOPPED`` / ``FAIL``.
    trial_states: dict[str, str]
    best_config: dict[str, Any] | None
    best_value: float | None
    best_run_id: str | None


def _check_args(
    trainable: Any, param_space: Any, metric: Any, mode: Any, num_samples: Any, run_name: Any, metric_name: Any
) -> None:
    if not callable(trainable) or isinstance(trainable, type):
        raise TypeError(
            f"ray_sweep: `trainable` must be a function `trainable(config) -> None`, got "
            f"{type(trainable).__name__} {trainable!r:.100}. Pass the function itself (class trainables are not "
            "supported)."
        )
    if not isinstance(param_space, Mapping):
        raise TypeError(
            f"ray_sweep: `param_space` must be a dict of Tune search spaces, got {type(param_space).__name__}. "
            "Use e.g. `{'lr': tune.loguniform(1e-4, 1e-1)}`."
        )
    if not isinstance(metric, str) or not metric:
        raise ValueError(
            f"ray_sweep: `metric` must be the reported metric to optimise, e.g. 'val/loss', got {metric!r}."
        )
    if mode not in ("min", "max"):
        raise ValueError(f"ray_sweep: `mode` must be one of ['min', 'max'], got {mode!r}. Use 'min' for a loss.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples == 0 or num_samples < -1:
        raise ValueError(
            f"ray_sweep: `num_samples` must be a positive int (or -1 with a time budget), got {num_samples!r}."
        )
    if not isinstance(run_name, str) or not run_name.strip():
        raise ValueError(f"ray_sweep: `run_name` must be a non-empty string, got {run_name!r}.")
    if not isinstance(metric_name, str) or not metric_name or metric_key(metric_name) != metric_name:
        raise ValueError(
            f"ray_sweep: `metric_name` must be a valid metric key as logged (letters, digits, _ - . / space), "
            f"got {metric_name!r}. Use e.g. 'objective'."
        )


def ray_sweep(
    trainable: Callable[[dict[str, Any]], Any],
    param_space: Mapping[str, Any],
    metric: str,
    mode: Literal["min", "max"] = "min",
    num_samples: int = 1,
    *,
    scheduler: Any | None = None,
    search_alg: Any | None = None,
    run_name: str = "ray-sweep",
    experiment: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    resources_per_trial: Mapping[str, float] | None = None,
    max_concurrent_trials: int | None = None,
    time_budget_s: float | None = None,
    storage_path: str | None = None,
    address: str | None = None,
    metric_name: str = "objective",
    reuse_actors: bool = False,
    run_config: Any | None = None,
) -> RaySweep:
    """Run a Ray Tune sweep with one parent MLflow run and one child run per trial, on any Ray worker.

    The trainable is a plain Tune function, ``trainable(config)``. On whichever worker a trial lands, a
    default ``MLflowCVLogger()`` logs into that trial's child run (the parent run id travels with the pickled
    trainable; fluent ``mlflow.log_*`` calls go there too via ``MLFLOW_RUN_ID``). Add
    :class:`~lightning_mlflow_cv.callbacks.RayTuneReportCallback` to the Trainer so each validation epoch
    is reported to Tune (schedulers such as ASHA then stop weak trials); it flushes the logger first, so a
    stopped trial's data is in MLflow before its worker goes away.

    Each child run (``trial-<n>``, tags ``mlflow.parentRunId``, ``ray.trial_id``, ``ray.trial_name``) holds
    the logged training data, the trial's config as params (a key the model logged with another value is
    kept as ``tune/<key>``), the last reported ``metric`` as ``metric_name``, and tag ``trial_state``:
    ``COMPLETE`` (status FINISHED), ``STOPPED`` by the scheduler (KILLED) or ``FAIL`` (FAILED, also when the
    worker process died; tag ``ray.fail_reason``).

    The parent (params ``metric``, ``mode``, ``scheduler``, ``search_alg``, ``num_samples``) gets, like
    ``optuna_sweep``: metrics ``best_value``, ``best/<param>``, ``n_trials/complete|stopped|fail``; tags
    ``best/<param>``, ``best_trial_number``, ``best_trial_run_id``; artifacts ``best_params.json`` and
    ``figures/optimization_history.png`` (the objective of every trial in trial order). The best trial is
    the best last-reported ``metric`` among COMPLETE trials.

    Cluster: start Ray with ``ray start --head`` and ``ray start --address <head>:6379`` on the others, run
    the script with ``address="auto"`` (or ``RAY_ADDRESS``) and an ``http://`` tracking server every node
    reaches. A local SQLite/file store raises before anything starts when the cluster has nodes on other
    machines; a local Ray instance on one machine may use it.

    Args:
        trainable: ``trainable(config)``: builds and fits a Trainer (a function; not a Trainable class).
        param_space: Tune's search space (``tune.grid_search``, ``tune.loguniform``, ...).
        metric: The reported metric to optimise (e.g. ``"val/loss"``).
        mode: ``"min"`` or ``"max"``.
        num_samples: Samples of ``param_space`` (each grid point is repeated this many times).
        scheduler: A Tune scheduler, e.g. ``ASHAScheduler(max_t=10, grace_period=1)``.
        search_alg: A Tune search algorithm (default: random/grid).
        run_name: Name of the parent run.
        experiment: MLflow experiment (created if missing); default ``run_name``.
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the cwd.
        tags: Tags for the parent and every child run (CV tag schema).
        resources_per_trial: e.g. ``{"cpu": 2, "gpu": 1}`` (default one CPU).
        max_concurrent_trials: Trials running at once (default: as resources allow).
        time_budget_s: Stop the sweep after this many seconds.
        storage_path: Tune's results folder (default ``~/ray_results``).
        address: Ray cluster to join when Ray is not initialised yet (``"auto"``, ``"ray://host:10001"``).
        metric_name: Metric key of the trial's last reported ``metric`` in each child run.
        reuse_actors: Tune's actor reuse; off by default so every trial starts in a fresh worker process.
        run_config: A ``ray.tune.RunConfig`` to start from (its callbacks are kept).

    Returns:
        A :class:`RaySweep` (``.results`` is Tune's ``ResultGrid``, ``.parent_run_id`` the parent run).

    Raises:
        ImportError: Ray Tune is not installed.
        ValueError: a bad ``metric``, ``mode``, ``num_samples``, ``run_name`` or ``metric_name``; a local
            file tracking store with Ray nodes on other machines.
        TypeError: ``trainable`` not a function, ``param_space`` not a dict.

    Example::

        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.callbacks import RayTuneReportCallback
        from lightning_mlflow_cv.hpo import ray_sweep

        def train(config):
            trainer = pl.Trainer(max_epochs=10, logger=MLflowCVLogger(),  # logs into this trial's child run
                                 callbacks=[RayTuneReportCallback()])
            trainer.fit(LitClassifier(lr=config["lr"]), datamodule=DigitsDataModule())

        sweep = ray_sweep(train, {"lr": tune.loguniform(1e-4, 1e-1)}, metric="val/loss", mode="min",
                          num_samples=20, scheduler=ASHAScheduler(max_t=10, grace_period=1),
                          tracking_uri="http://mlflow.internal:5000")
        print(sweep.best_config, sweep.parent_run_id)
    """
    _check_args(trainable, param_space, metric, mode, num_samples, run_name, metric_name)
    ray = _import_ray()
    from mlflow import MlflowClient
    from ray import tune

    uri = tracking_uri or default_tracking_uri()
    clean_tags = validate_tags(tags)
    if not ray.is_initialized():
        ray.init(address=address)
    check_store_reachable(uri, ray.nodes(), ray.util.get_node_ip_address())

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment or run_name)
    parent = client.create_run(
        exp_id, run_name=run_name, tags={**clean_tags, "hpo_sweep": run_name, "hpo_engine": "ray"}
    )
    parent_id = parent.info.run_id
    log_batch(
        client,
        parent_id,
        params=[
            param("metric", metric),
            param("mode", mode),
            param("num_samples", num_samples),
            param("scheduler", type(scheduler).__name__ if scheduler is not None else "FIFOScheduler"),
            param("search_alg", type(search_alg).__name__ if search_alg is not None else "BasicVariantGenerator"),
        ],
    )
    fn: Any = _TrialTrainable(
        trainable, parent_run_id=parent_id, experiment_id=exp_id, tracking_uri=uri, tags=clean_tags
    )
    if resources_per_trial:
        fn = tune.with_resources(fn, dict(resources_per_trial))
    states = _run_states_callback(client, parent_id, exp_id, metric, metric_name, clean_tags)
    rc = copy.copy(run_config) if run_config is not None else tune.RunConfig()  # the caller's object stays as is
    rc.callbacks = [*(rc.callbacks or []), states]
    if storage_path is not None:
        rc.storage_path = storage_path
    rc.name = rc.name or f"{sanitize_key(run_name).replace('/', '-')}-{parent_id[:8]}"
    tuner = tune.Tuner(
        fn,
        param_space=dict(param_space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=max_concurrent_trials,
            time_budget_s=time_budget_s,
            reuse_actors=reuse_actors,
        ),
        run_config=rc,
    )
    outcome = {"status": "FINISHED"}
    results = None
    try:
        with status_on_exit(outcome):
            results = tuner.fit()
    finally:
        _close_leftovers(client, exp_id, parent_id)
        best = _summarise(client, parent_id, states, metric, mode, metric_name)
        try:
            set_run_status(client, parent_id, outcome["status"])
        except Exception as err:  # noqa: BLE001
            warn_tracking(_WHO, f"end the parent run {parent_id}", err, _KEEPS)
    return RaySweep(
        results=results,
        parent_run_id=parent_id,
        experiment_id=exp_id,
        trial_runs=dict(states.run_ids),
        trial_states=dict(states.states),
        best_config=dict(best.params) if best else None,
        best_value=best.value if best else None,
        best_run_id=best.run_id if best else None,
    )


def _close_leftovers(client: Any, exp_id: str, parent: str) -> None:
    """End child runs no Tune callback ended (the sweep was interrupted): KILLED, never left RUNNING."""
    try:
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
        )
        for run in runs:
            log_batch(client, run.info.run_id, tags=[_tag(TRIAL_STATE_TAG, "STOPPED")])
            set_run_status(client, run.info.run_id, "KILLED")
    except Exception as err:  # noqa: BLE001
        warn_tracking(_WHO, "end the child runs left running", err, _KEEPS)


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _summarise(client: Any, parent: str, states: Any, metric: str, mode: str, metric_name: str) -> Best | None:
    points: list[tuple[int, float | None, str]] = []
    configs: dict[int, tuple[dict[str, Any], str]] = {}
    for i, trial in enumerate(states.trials):
        tid = trial.trial_id
        if tid not in states.states:  # never started or still pending when the sweep ended
            continue
        n = trial_number(tid)
        n = i if n is None else n
        value = (trial.last_result or {}).get(metric)
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None
        points.append((n, value, states.states[tid]))
        configs[n] = (_flat(trial.config or {}), tid)
    points.sort()
    counts = {s: sum(p[2] == s for p in points) for s in ("COMPLETE", "STOPPED", "FAIL")}
    done = [(v, n) for n, v, s in points if s == "COMPLETE" and v is not None]
    best = None
    if done:
        v, n = min(done) if mode == "min" else max(done)
        cfg, tid = configs[n]
        best = Best(v, cfg, n, states.run_ids.get(tid))
    try:
        write_summary(
            client,
            parent,
            counts,
            best,
            metric_name=metric_name,
            direction=mode,
            total=len(states.trials),
            plot=(lambda: _sweep_figure(points, metric, mode)) if points else None,
            extra={"metric": metric, "best_trial_id": configs[best.number][1] if best else None},
        )
    except Exception as err:  # noqa: BLE001
        warn_tracking(_WHO, f"write the sweep summary to the parent run {parent}", err, _KEEPS)
    return best
