"""Sweeps: one parent MLflow run per sweep, one nested child run per trial.

``optuna_sweep`` (here) for Optuna, ``ray_sweep`` (implemented in ``_sweeps.ray_sweep``) for Ray Tune. Both are
optional dependencies (``pip install "lightning-mlflow-cv[optuna]"`` / ``[ray]``), imported lazily.
"""

from __future__ import annotations

import contextvars
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning_mlflow_cv._facts.keys import MAX_TAG_VAL_LENGTH, metric_key, validate_tags
from lightning_mlflow_cv._facts.redact import redact_text
from lightning_mlflow_cv._facts.runs import (
    Stage,
    active_stage,
    default_tracking_uri,
    get_or_create_experiment,
    set_run_status,
    status_on_exit,
)
from lightning_mlflow_cv._sweeps.ray_sweep import RaySweep, ray_sweep  # noqa: F401 - public names of this module
from lightning_mlflow_cv._sweeps.tracking import (
    TRIAL_STATE_TAG,
    Best,
    drain_loggers,
    new_params,
    warn_tracking,
    write_summary,
)
from lightning_mlflow_cv._sweeps.tracking import log_batch as _log_batch
from lightning_mlflow_cv._sweeps.tracking import param as _param

if TYPE_CHECKING:
    import optuna

    from lightning_mlflow_cv.logger import MLflowCVLogger

#: Study user attribute holding the MLflow parent run id (shared by every worker of the study).
PARENT_RUN_ATTR = "mlflow_parent_run_id"
#: Study user attribute holding the MLflow experiment id of the parent run.
EXPERIMENT_ATTR = "mlflow_experiment_id"
#: Trial user attribute holding the trial's MLflow child run id (``study.best_trial.user_attrs[...]``).
TRIAL_RUN_ATTR = "mlflow_run_id"
# TRIAL_STATE_TAG (from _sweeps.tracking): on each child run ``RUNNING``, ``COMPLETE``, ``PRUNED`` or ``FAIL`` (Optuna's names).
#: MLflow run status per final Optuna trial state.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
#: How long a worker that did not create the study waits for the creator to publish the parent run id.
PARENT_WAIT_S = 120.0
_INSTALL_HINT = 'pip install "lightning-mlflow-cv[optuna]"'


@dataclass
class TrialRun:
    """The MLflow child run of one Optuna trial (``run_id`` is None when it could not be created)."""

    number: int
    run_id: str | None
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    error: str | None = None
    loggers: list[Any] = field(default_factory=list)


_ACTIVE_TRIAL: contextvars.ContextVar[TrialRun | None] = contextvars.ContextVar("lmc_active_trial", default=None)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise ImportError(f"optuna_sweep needs Optuna, which is not installed ({err}). Fix: {_INSTALL_HINT}") from err
    return optuna


def trial_logger(trial: optuna.trial.Trial | None = None, **kwargs: Any) -> MLflowCVLogger:
    """An :class:`~lightning_mlflow_cv.MLflowCVLogger` bound to the running trial's MLflow child run.

    Inside an :func:`optuna_sweep` objective, a plain ``MLflowCVLogger()`` already logs into the trial's run;
    use this helper when you want to say so explicitly or pass logger options (``prefix``, ``flush_interval_s``,
    ``tags``, ...).

    Args:
        trial: The trial the objective received (checked against the running one); ``None`` for the current one.
        **kwargs: Further ``MLflowCVLogger`` arguments (not ``run_id``, ``tracking_uri``, ``parent_run_id``,
            ``nested``: those come from the sweep).

    Raises:
        RuntimeError: called outside an ``optuna_sweep`` objective, or for another trial than the running one.
        ValueError: a reserved argument was passed in ``kwargs``.

    Example::

        def objective(trial):
            model = TinyModel(lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True))
            trainer = Trainer(logger=trial_logger(trial), max_epochs=3)
            trainer.fit(model, train, val)
            return trainer.callback_metrics["val/loss"].item()
    """
    from lightning_mlflow_cv.logger import MLflowCVLogger

    active = _ACTIVE_TRIAL.get()
    if active is None:
        raise RuntimeError(
            "trial_logger: no optuna_sweep trial is running in this thread. Call it inside the objective passed "
            "to `optuna_sweep(objective, ...)`; for a plain `study.optimize`, use `MLflowCVLogger(...)` directly."
        )
    if trial is not None and trial.number != active.number:
        raise RuntimeError(
            f"trial_logger: got trial {trial.number}, but the running optuna_sweep trial is {active.number}. Pass "
            "the trial your objective received (or no trial)."
        )
    reserved = sorted({"run_id", "tracking_uri", "parent_run_id", "nested"} & set(kwargs))
    if reserved:
        raise ValueError(
            f"trial_logger: {reserved} are set by optuna_sweep (the trial's run and store); got them in kwargs. "
            "Remove them; pass only other MLflowCVLogger options such as `prefix` or `tags`."
        )
    if active.run_id is None:  # the child run could not be created: let the logger spool it under the parent
        from mlflow import MlflowClient

        exp = MlflowClient(active.tracking_uri).get_experiment(active.experiment_id)
        kwargs.setdefault("run_name", f"trial-{active.number}")
        kwargs.setdefault("experiment_name", exp.name)
        lg = MLflowCVLogger(tracking_uri=active.tracking_uri, parent_run_id=active.parent_run_id, **kwargs)
    else:
        lg = MLflowCVLogger(run_id=active.run_id, tracking_uri=active.tracking_uri, **kwargs)
    active.loggers.append(lg)
    return lg


def _check_args(
    objective: Any,
    n_trials: Any,
    direction: Any,
    run_name: Any,
    timeout: Any,
    metric_name: Any,
    storage: Any,
) -> None:
    if not callable(objective):
        raise TypeError(
            f"optuna_sweep: `objective` must be a callable `objective(trial) -> float`, got "
            f"{type(objective).__name__} {objective!r:.100}. Pass the function itself, e.g. "
            "`optuna_sweep(objective, 20)`."
        )
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(
            f"optuna_sweep: `n_trials` must be a positive int (trials run by this process) or None together with "
            f"`timeout`, got {n_trials!r}. Use e.g. `n_trials=20`."
        )
    if n_trials is None and timeout is None:
        raise ValueError(
            "optuna_sweep: `n_trials=None` needs a `timeout` (seconds), otherwise the sweep never ends. Pass "
            "`n_trials=20` or `timeout=3600`."
        )
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"optuna_sweep: `timeout` must be a positive number of seconds or None, got {timeout!r}.")
    if direction not in ("minimize", "maximize"):
        raise ValueError(
            f"optuna_sweep: `direction` must be one of ['minimize', 'maximize'], got {direction!r}. Use "
            "'minimize' for a loss, 'maximize' for an accuracy (multi-objective studies are not supported)."
        )
    if not isinstance(run_name, str) or not run_name.strip():
        raise ValueError(f"optuna_sweep: `run_name` must be a non-empty string, got {run_name!r}.")
    if not isinstance(metric_name, str) or not metric_name or metric_key(metric_name) != metric_name:
        raise ValueError(
            f"optuna_sweep: `metric_name` must be a valid metric key as logged (letters, digits, _ - . / space), "
            f"got {metric_name!r}. Use e.g. 'objective' or 'val/loss'."
        )
    if storage is not None and not isinstance(storage, str) and not hasattr(storage, "create_new_study"):
        raise TypeError(
            f"optuna_sweep: `storage` must be None, an RDB URL such as 'sqlite:///optuna.db' or "
            f"'postgresql://host/db', or an optuna storage object, got {type(storage).__name__}."
        )


def _make_storage(optuna: Any, storage: Any) -> Any:
    """An RDB storage from a URL, tolerating two workers initialising the same fresh database at once."""
    if not isinstance(storage, str):
        return storage
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        except (OperationalError, IntegrityError, ProgrammingError):  # another worker is creating the schema
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _open_study(
    optuna: Any,
    *,
    client: Any,
    storage: Any,
    study_name: str | None,
    direction: str,
    sampler: Any,
    pruner: Any,
    run_name: str,
    experiment: str,
    tags: dict[str, str],
    storage_label: str | None,
) -> tuple[Any, str, str]:
    """Create or load the study; the worker that creates it creates the parent run and publishes its id."""
    kw = {"storage": storage, "study_name": study_name, "direction": direction, "sampler": sampler, "pruner": pruner}
    try:
        study = optuna.create_study(**kw, load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:  # another worker (or an earlier sweep) made it: join it
        study = optuna.create_study(**kw, load_if_exists=True)
        created = False
    if not created:
        parent = _wait_for_parent(study)
        if parent is not None:
            return (
                study,
                parent,
                str(study.user_attrs.get(EXPERIMENT_ATTR) or client.get_run(parent).info.experiment_id),
            )
        warnings.warn(
            f"optuna_sweep: study {study.study_name!r} has no MLflow parent run (attribute {PARENT_RUN_ATTR!r}); "
            "this worker creates one. If another worker is still starting, it may create a second parent: start "
            "the workers on a study created by optuna_sweep.",
            RuntimeWarning,
            stacklevel=3,
        )
    exp_id = get_or_create_experiment(client, experiment)
    run = client.create_run(
        exp_id,
        run_name=run_name,
        tags={
            **tags,
            "hpo_study": study.study_name,
            "optuna.direction": direction,
            **({"optuna.storage": redact_text(storage_label)} if storage_label else {}),
        },
    )
    parent = run.info.run_id
    client.log_batch(
        parent,
        params=[
            _param("study_name", study.study_name),
            _param("direction", direction),
            _param("sampler", type(study.sampler).__name__),
            _param("pruner", type(study.pruner).__name__),
        ],
    )
    study.set_user_attr(EXPERIMENT_ATTR, exp_id)
    study.set_user_attr(PARENT_RUN_ATTR, parent)
    return study, parent, exp_id


def _wait_for_parent(study: Any) -> str | None:
    deadline = time.monotonic() + PARENT_WAIT_S
    while True:
        parent = study._storage.get_study_user_attrs(study._study_id).get(PARENT_RUN_ATTR)
        if parent:
            return str(parent)
        if study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            return None  # a study made without optuna_sweep (it has trials but no parent), or the creator died
        time.sleep(0.2)


def _warn_tracking(what: str, err: BaseException) -> None:
    warn_tracking("optuna_sweep", what, err, "the Optuna study still holds every trial")


class _Tracker:
    """Opens a child run per trial (objective wrapper) and closes it with Optuna's final state (callback)."""

    def __init__(
        self, client: Any, uri: str, study: Any, parent: str, exp_id: str, metric_name: str, tags: dict[str, str]
    ):
        self.client = client
        self.uri = uri
        self.study = study
        self.parent = parent
        self.exp_id = exp_id
        self.metric_name = metric_name
        self.tags = tags
        self.pending: dict[int, TrialRun] = {}
        self.lock = threading.Lock()

    def wrap(self, objective: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def wrapped(trial: Any) -> Any:
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            tr = TrialRun(trial.number, None, self.parent, self.exp_id, self.uri)
            try:
                run = self.client.create_run(
                    self.exp_id,
                    run_name=f"trial-{trial.number}",
                    tags={
                        **self.tags,
                        MLFLOW_PARENT_RUN_ID: self.parent,
                        "hpo_study": self.study.study_name,
                        "optuna.trial_number": str(trial.number),
                        TRIAL_STATE_TAG: "RUNNING",
                    },
                )
                tr.run_id = run.info.run_id
                trial.set_user_attr(TRIAL_RUN_ATTR, tr.run_id)
            except Exception as err:  # noqa: BLE001 - tracking never stops the sweep
                _warn_tracking(f"create the MLflow run of trial {trial.number}", err)
            with self.lock:
                self.pending[trial._trial_id] = tr
            token = _ACTIVE_TRIAL.set(tr)
            stage = Stage(f"trial-{trial.number}", tr.run_id, self.exp_id, self.uri) if tr.run_id else None
            try:
                with active_stage(stage):
                    return objective(trial)
            except BaseException as err:
                tr.error = redact_text(f"{type(err).__name__}: {err}")[:MAX_TAG_VAL_LENGTH]
                raise
            finally:
                _ACTIVE_TRIAL.reset(token)

        return wrapped

    def __call__(self, study: Any, frozen: Any) -> None:
        """Optuna callback: the trial's state is final here."""
        self.close(frozen)

    def close(self, frozen: Any) -> None:
        with self.lock:
            tr = self.pending.pop(frozen._trial_id, None)
        if tr is None:
            return
        drain_loggers(tr.run_id, tr.loggers)
        if tr.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        state = frozen.state.name
        now = int(time.time() * 1000)
        try:
            params = new_params(self.client.get_run(tr.run_id).data.params, frozen.params, "optuna")
            metrics = [
                Metric("optuna/intermediate_value", float(v), now, int(s))
                for s, v in sorted(frozen.intermediate_values.items())
            ]
            if state == "COMPLETE" and frozen.value is not None:
                metrics.append(Metric(self.metric_name, float(frozen.value), now, 0))
            if state == "PRUNED" and frozen.intermediate_values:
                metrics.append(Metric("optuna/pruned_at_step", float(max(frozen.intermediate_values)), now, 0))
            if frozen.duration is not None:
                metrics.append(Metric("optuna/duration_s", frozen.duration.total_seconds(), now, 0))
            tags = [RunTag(TRIAL_STATE_TAG, state), RunTag("optuna.trial_state", state)]
            if state == "FAIL":
                tags.append(RunTag("optuna.fail_reason", tr.error or "the objective returned no valid value"))
            _log_batch(self.client, tr.run_id, metrics, params, tags)
            interrupted = state == "FAIL" and (tr.error or "").startswith("KeyboardInterrupt")
            set_run_status(self.client, tr.run_id, "KILLED" if interrupted else RUN_STATUS.get(state, "FAILED"))
        except Exception as err:  # noqa: BLE001
            _warn_tracking(f"record trial {frozen.number} in MLflow run {tr.run_id}", err)

    def close_pending(self) -> None:
        """Close runs of trials the optimize loop left without a callback (an exception it re-raised)."""
        with self.lock:
            ids = list(self.pending)
        for trial_id in ids:
            try:
                frozen = self.study._storage.get_trial(trial_id)
            except Exception:  # noqa: BLE001
                continue
            self.close(frozen)


def _summarise(client: Any, study: Any, parent: str, metric_name: str) -> None:
    """Best value/params, trial counts and the optimisation-history plot on the parent run."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    best = None
    if counts["COMPLETE"]:
        bt = study.best_trial
        best = Best(bt.value, bt.params, bt.number, bt.user_attrs.get(TRIAL_RUN_ATTR))
    try:
        write_summary(
            client,
            parent,
            counts,
            best,
            metric_name=metric_name,
            direction=study.direction.name.lower(),
            total=len(trials),
            plot=(lambda: _history_figure(study)) if best is not None else None,
        )
    except Exception as err:  # noqa: BLE001
        _warn_tracking(f"write the sweep summary to the parent run {parent}", err)


def _history_figure(study: Any) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    return ax.figure


def optuna_sweep(
    objective: Callable[[optuna.trial.Trial], float],
    n_trials: int | None,
    direction: Literal["minimize", "maximize"] = "minimize",
    run_name: str = "hpo-sweep",
    storage: str | Any | None = None,
    study_name: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    *,
    timeout: float | None = None,
    catch: Iterable[type[Exception]] | type[Exception] = (),
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    tags: Mapping[str, Any] | None = None,
    metric_name: str = "objective",
    gc_after_trial: bool = False,
) -> optuna.Study:
    """Run an Optuna study with one parent MLflow run and one nested child run per trial.

    The objective is a plain Optuna objective, ``objective(trial) -> float``. While it runs, a default
    ``MLflowCVLogger()`` (and :func:`trial_logger`) logs into the trial's child run, so a Lightning objective
    needs no MLflow code. Prune with Optuna's own Lightning callback
    (``optuna_integration.PyTorchLightningPruningCallback(trial, monitor="val/loss")``).

    Each child run (``trial-<n>``, tag ``mlflow.parentRunId``) holds the trial's params, its objective value
    as the metric ``metric_name``, the reported intermediate values (``optuna/intermediate_value`` by step),
    tag ``trial_state`` (``COMPLETE``/``PRUNED``/``FAIL``) and status FINISHED / KILLED (pruned) / FAILED.
    The trial's run id is the trial user attribute ``mlflow_run_id``.

    The parent holds params ``study_name``, ``direction``, ``sampler``, ``pruner``; metrics ``best_value``,
    ``best/<param>`` (numeric params), ``n_trials/complete|pruned|failed``; tags ``best/<param>``,
    ``best_trial_number``, ``best_trial_run_id``; artifacts ``best_params.json`` and
    ``figures/optimization_history.png``. Best params are tags and metrics (not params) because they change
    while workers still run and MLflow params cannot change.

    Distributed: start the same call in several processes or machines with one RDB ``storage`` (SQLite or
    PostgreSQL URL) and one ``study_name``. The worker that creates the study creates the parent run and
    stores its id in the study user attribute ``mlflow_parent_run_id``; the others find it there, so all
    trials land in one tree. ``n_trials`` counts this process's trials. Each worker writes the summary of the
    whole study when it ends; the last one to finish marks the parent FINISHED. Calling again with the same
    storage and study name adds trials to the same study and parent run.

    Args:
        objective: ``objective(trial) -> float``, as for ``study.optimize``.
        n_trials: Trials run by this process (``None``: until ``timeout``).
        direction: ``"minimize"`` or ``"maximize"``.
        run_name: Name of the parent run.
        storage: Optuna storage: ``None`` (in memory), an RDB URL, or an optuna storage object.
        study_name: Study name; default ``run_name``. Workers sharing a study use the same name.
        experiment: MLflow experiment (created if missing); default ``run_name``.
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the cwd.
        sampler: Optuna sampler (default: Optuna's, TPE).
        pruner: Optuna pruner (default: Optuna's, median).
        timeout: Stop starting trials after this many seconds.
        catch: Exception types that fail a trial without stopping the sweep (as in ``study.optimize``).
        callbacks: Extra ``study.optimize`` callbacks.
        tags: Tags for the parent and every child run (CV tag schema, e.g. ``{"task": "classification"}``).
        metric_name: Metric key of the objective value in each child run.
        gc_after_trial: As in ``study.optimize``.

    Returns:
        The ``optuna.Study`` (``study.user_attrs["mlflow_parent_run_id"]`` is the parent run).

    Raises:
        ImportError: Optuna is not installed.
        ValueError: a bad ``n_trials``, ``direction``, ``run_name``, ``timeout`` or ``metric_name``; a study
            whose parent run does not exist in this tracking store.
        TypeError: ``objective`` not callable, or a ``storage`` of the wrong type.

    Example::

        import lightning.pytorch as pl
        from optuna_integration import PyTorchLightningPruningCallback
        from lightning_mlflow_cv import MLflowCVLogger
        from lightning_mlflow_cv.hpo import optuna_sweep

        def objective(trial):
            model = LitClassifier(lr=trial.suggest_float("lr", 1e-4, 1e-1, log=True))
            trainer = pl.Trainer(
                max_epochs=10,
                logger=MLflowCVLogger(),  # logs into this trial's child run
                callbacks=[PyTorchLightningPruningCallback(trial, monitor="val/loss")],
            )
            trainer.fit(model, datamodule=dm)
            return trainer.callback_metrics["val/loss"].item()

        study = optuna_sweep(objective, n_trials=20, direction="minimize",
                             storage="sqlite:///optuna.db", study_name="digits-lr")
        print(study.best_params, study.user_attrs["mlflow_parent_run_id"])
    """
    _check_args(objective, n_trials, direction, run_name, timeout, metric_name, storage)
    optuna = _import_optuna()
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    clean_tags = validate_tags(tags)
    rdb = _make_storage(optuna, storage)
    study, parent, exp_id = _open_study(
        optuna,
        client=client,
        storage=rdb,
        study_name=study_name or (run_name if storage is not None else None),
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        run_name=run_name,
        experiment=experiment or run_name,
        tags=clean_tags,
        storage_label=storage if isinstance(storage, str) else None,
    )
    try:
        client.update_run(parent, status="RUNNING")
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            raise ValueError(
                f"optuna_sweep: study {study.study_name!r} points at MLflow parent run {parent!r}, which does not "
                f"exist in {redact_text(uri)}. Use the tracking URI the study was started with, or a new "
                "`study_name`."
            ) from err
        _warn_tracking(f"mark the parent run {parent} running", err)
    tracker = _Tracker(client, uri, study, parent, exp_id, metric_name, clean_tags)
    outcome = {"status": "FINISHED"}
    try:
        with status_on_exit(outcome):
            study.optimize(
                tracker.wrap(objective),
                n_trials=n_trials,
                timeout=timeout,
                catch=catch,
                callbacks=[tracker, *(callbacks or [])],
                gc_after_trial=gc_after_trial,
            )
    finally:
        tracker.close_pending()
        _summarise(client, study, parent, metric_name)
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("RUNNING", "WAITING")]
        status = outcome["status"]
        if status != "FINISHED" or not running:  # other workers still running: the last one ends the parent
            try:
                set_run_status(client, parent, status)
            except Exception as err:  # noqa: BLE001
                _warn_tracking(f"end the parent run {parent}", err)
    return study
