"""MLflowCVLogger: Lightning's MLFlowLogger with a non-blocking, never-losing writer and CV conventions."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

from lightning.fabric.utilities.logger import _add_prefix, _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._facts import trainer_frames as _trainer_frames
from lightning_mlflow_cv._facts.keys import (
    MAX_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    flatten,
    metric_key,
    metric_value,
    param_value,
    sanitize_key,
    split_long_params,
    validate_tags,
)
from lightning_mlflow_cv._facts.redact import redact, redact_text, safe_uri
from lightning_mlflow_cv._facts.runs import (
    ACTIVE_STAGE,
    DEFAULT_TRACKING_DB,  # noqa: F401 - kept importable from here
    default_tracking_uri,
    live_loggers,
    same_store,
)
from lightning_mlflow_cv._logger.images import IMAGE_KEY_ILLEGAL, to_pil_image
from lightning_mlflow_cv._logger.resume import (
    CHECKPOINT_KEY,  # noqa: F401 - kept importable from here
    ResumeMixin,
    read_run_id,
    run_id_from_checkpoint,  # noqa: F401 - kept importable from here
)
from lightning_mlflow_cv._logger.run_start import RunStartMixin
from lightning_mlflow_cv._logger.state import WriterLike
from lightning_mlflow_cv._logger.state import rank as _rank
from lightning_mlflow_cv._logger.writers import WriterMixin
from lightning_mlflow_cv.environment import git_commit

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


#: The ModelCheckpoint settings Lightning's MLFlowLogger records in each checkpoint's metadata.yaml.
_CHECKPOINT_META = (
    "monitor",
    "mode",
    "save_last",
    "save_top_k",
    "save_weights_only",
    "_every_n_train_steps",
    "_every_n_val_epochs",
)
_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def _context_tags() -> dict[str, str]:
    """MLflow's context tags for a new run (``mlflow.user``, ``mlflow.source.name``/``type``, git), as Lightning's
    ``MLFlowLogger`` applies them through ``resolve_tags``; credentials in values (a git remote URL) are redacted."""
    try:
        from mlflow.tracking.context.registry import resolve_tags
    except ImportError:  # pragma: no cover - very old MLflow
        return {}
    try:
        return {str(k): str(v) for k, v in redact(resolve_tags({})).items()}
    except Exception as err:  # noqa: BLE001 - a context provider failing must not stop training
        log.warning(
            "MLflowCVLogger: MLflow's context tags could not be resolved (%s); the run is created without them", err
        )
        return {}


def _lightning_version() -> str:
    import lightning

    return f"Lightning {lightning.__version__}"


class MLflowCVLogger(ResumeMixin, RunStartMixin, WriterMixin, MLFlowLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger` made fit for CV training at scale.

    Accepts everything ``MLFlowLogger`` accepts and behaves the same (naming, ``run_id=``, ``prefix``, metric key
    renaming, params, statuses, ``log_model`` files and metadata, ``artifact_location``, MLflow's context tags and
    fluent tracking URI, pickling for ``ddp_spawn``), except for the differences listed in the README section
    "Differences from Lightning's MLFlowLogger" (non-blocking writes, no data loss when the store is down, longer
    params kept, secrets redacted, a real ``save_dir`` with SQLite/HTTP stores, KILLED on Ctrl+C, resume from a
    checkpoint's run); ``tests/test_parity.py`` compares both loggers on real stores. It adds:

    - **Embedded default**: with no ``tracking_uri`` and no ``MLFLOW_TRACKING_URI`` (read when the logger
      is built), runs go to ``sqlite:///mlflow.db`` in the working directory, so ``mlflow ui`` shows them.
    - **Non-blocking writes**: ``log_metrics``, params, tags and artifacts are appended to a local spool
      file (microseconds); a background writer (thread or child process, see ``writer``) sends them in full
      ``log_batch`` requests (MLflow's 1,000-point limit) as soon as one is ready, and a partial one once its
      oldest point has waited ``flush_interval_s`` (longer while the store is slow). :meth:`flush` drains;
      :meth:`finalize` drains and sets the run status (FINISHED, FAILED, or KILLED on KeyboardInterrupt).
    - **Failure policy**: when the store is unreachable, slow, answers 5xx or refuses credentials, training
      goes on; one warning names the spool file, the writer retries with backoff, and anything not delivered
      at the end stays in the spool for ``lightning-mlflow-cv sync SPOOL`` (idempotent).
    - **Run hierarchy**: ``parent_run_id=`` makes a child run; ``nested=True`` nests under the active fluent
      run (``mlflow.start_run()``).
    - **CV tags**: ``tags`` may hold task, backbone, dataset, env, team, git_commit, hardware (and any other
      key); ``task`` is checked, ``git_commit`` and ``hardware`` are filled in when absent.
    - **Resume**: ``trainer.fit(..., ckpt_path=...)`` with a new logger continues the checkpoint's run unless
      ``run_id=`` says otherwise; ``resume_from=`` names that checkpoint explicitly (Lightning publishes
      ``trainer.ckpt_path`` only after the run is chosen, so the plain form reads it from Lightning's call frames,
      a fallback that warns if Lightning changes them).
    - **Pipelines and sweeps**: inside ``pipeline_run(...).stage(...)`` (or a sweep trial), a logger given no
      ``run_id`` logs into the stage's run when its ``tracking_uri`` is unset or names the same store, and warns
      (naming both stores) when it names another.
    - **DDP**: the run is created once on global rank 0, and every rank gets the same :attr:`run_id`.
    - **Artifacts**: :meth:`log_image` (step history in the MLflow UI), :meth:`log_figure`,
      :meth:`log_artifact`, :meth:`log_dict`, :meth:`log_text`, all under the same failure policy.

    Args:
        experiment_name: MLflow experiment (created if missing).
        run_name: Display name of the run.
        tracking_uri: Store URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``.
        tags: Run tags, see above.
        save_dir: Local directory for ``trainer.log_dir`` and ModelCheckpoint's default
            ``<save_dir>/<experiment id>/<run id>/checkpoints``, with SQLite and HTTP stores; default: the Trainer's
            ``default_root_dir`` (where Lightning puts checkpoints then). With a ``file:`` store, as in
            ``MLFlowLogger``: the store's directory (this argument is ignored).
        log_model: As in ``MLFlowLogger``: log ModelCheckpoint files as artifacts.
        prefix: Prefix for metric keys.
        artifact_location: Artifact root for a newly created experiment.
        run_id: Continue this run instead of creating one.
        synchronous: ``True``: every ``log_metrics``/``log_hyperparams`` call returns only once the store holds its
            data (a flush per call: one ``log_batch`` round trip plus a wake-up of the writer thread, i.e.
            milliseconds on SQLite and a network round trip over HTTP per step; while the store is unreachable,
            one failed attempt per call, at most ``request_timeout_s``, and the data stays in the spool).
            ``None`` (default) and ``False``: non-blocking writes.
        parent_run_id: Create the run as a child of this run.
        nested: Nest under the active fluent MLflow run.
        flush_interval_s: The longest a logged point waits for a full request before it is sent anyway (while
            the store is slow: up to 10x the time a request takes, at most 10 s or this value).
        spool_dir: Where undelivered data is kept; default ``$LIGHTNING_MLFLOW_CV_SPOOL_DIR`` or
            ``~/.cache/lightning_mlflow_cv/spool``.
        request_timeout_s: Per-request timeout of the background writer (no retries inside one attempt).
        finalize_timeout_s: How long :meth:`finalize` (and :meth:`flush`) wait with nothing delivered before giving
            up: they wait as long as the store keeps taking data, however large the backlog, and show progress
            on stderr when that takes more than a few seconds.
        writer: Where MLflow's per-point work runs (env ``LIGHTNING_MLFLOW_CV_WRITER`` when not given).
            ``None`` / ``"auto"`` (default): chosen for the machine when the writer starts (at fit start): a child
            process when the cores this process may use (``os.sched_getaffinity``) exceed what training keeps
            busy (one core per process on a GPU or other accelerator, ``torch.get_num_threads()`` per process on
            the CPU), a thread otherwise. ``"process"``: a child process tails the spool, so MLflow's per-point
            Python work never holds the training process's GIL and a crashed trainer's spool is still
            delivered; best with a core to spare (e.g. GPU training). ``"thread"``: a low-priority background
            thread; best when training keeps every core busy. :attr:`writer_choice` says what was chosen and
            why; see benchmarks/README.md for the measurements behind the rule.
        resume_from: A Lightning checkpoint whose MLflow run this logger continues (read when the run starts);
            what ``trainer.fit(ckpt_path=...)`` does implicitly, said explicitly.

    Raises:
        ValueError: ``nested=True`` with no active MLflow run, both ``nested`` and ``parent_run_id``, both
            ``run_id`` and ``resume_from``, or a non-positive ``flush_interval_s``.
        FileNotFoundError: ``resume_from`` is not a file.

    Example::

        from lightning.pytorch import Trainer
        from lightning_mlflow_cv import MLflowCVLogger

        logger = MLflowCVLogger(experiment_name="digits", tags={"task": "classification", "backbone": "cnn"})
        trainer = Trainer(logger=logger, max_epochs=3)
        trainer.fit(model, datamodule=dm)
        print(logger.run_id)
    """

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = None,
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        *,
        parent_run_id: str | None = None,
        nested: bool = False,
        flush_interval_s: float = 2.0,
        spool_dir: str | None = None,
        request_timeout_s: float = 10.0,
        finalize_timeout_s: float = 60.0,
        writer: Literal["auto", "process", "thread"] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError(
                f"MLflowCVLogger: `flush_interval_s` must be > 0 seconds, got {flush_interval_s!r}. "
                "Use a small value such as 0.5 for near-real-time charts."
            )
        writer = writer or os.environ.get("LIGHTNING_MLFLOW_CV_WRITER") or "auto"  # type: ignore[assignment]
        if writer not in ("auto", "process", "thread"):
            raise ValueError(
                f"MLflowCVLogger: `writer` must be one of ('auto', 'process', 'thread') or None, got {writer!r}. "
                "'auto' (default) picks a child process when a core is to spare, else a thread; 'process' keeps "
                "MLflow's per-point work off the training process; 'thread' avoids a child process (e.g. where "
                "spawning is not allowed)."
            )
        if nested and parent_run_id:
            raise ValueError(
                f"MLflowCVLogger: pass either `nested=True` or `parent_run_id=` (got parent_run_id={parent_run_id!r} "
                "and nested=True). `nested` uses the active `mlflow.start_run()` run as parent."
            )
        if resume_from is not None:
            if run_id is not None:
                raise ValueError(
                    f"MLflowCVLogger: pass either `run_id=` or `resume_from=` (got run_id={run_id!r} and "
                    f"resume_from={os.fspath(resume_from)!r}). `resume_from` continues the run stored in that "
                    "checkpoint; `run_id` names the run directly."
                )
            if not Path(resume_from).is_file():
                raise FileNotFoundError(
                    f"MLflowCVLogger: `resume_from` must be a Lightning checkpoint file, got {os.fspath(resume_from)!r}, "
                    "which does not exist. Pass the checkpoint you resume the fit from (e.g. the `ckpt_path` of "
                    "`trainer.fit`), or no `resume_from` to start a new run."
                )
        parent_experiment_id = None
        if nested:
            import mlflow

            active = mlflow.active_run()
            if active is None:
                raise ValueError(
                    "MLflowCVLogger: `nested=True` needs an active MLflow run, but `mlflow.active_run()` is None. "
                    "Create the logger inside `with mlflow.start_run():` (or `pipeline_run(...)`), or pass "
                    "`parent_run_id=`."
                )
            parent_run_id = active.info.run_id
            parent_experiment_id = active.info.experiment_id
            if tracking_uri is None:
                tracking_uri = mlflow.get_tracking_uri()
        stage = ACTIVE_STAGE.get()
        if stage is not None and run_id is None and parent_run_id is None and not nested and resume_from is None:
            # inside `pipeline_run(...).stage(...)` or a sweep trial: log into its run when this is the same store
            if tracking_uri is None or same_store(tracking_uri, stage.tracking_uri):
                tracking_uri, run_id = tracking_uri or stage.tracking_uri, stage.run_id
            else:
                warnings.warn(
                    f"MLflowCVLogger: created inside the pipeline stage (or sweep trial) {stage.name!r}, whose run "
                    f"{stage.run_id} lives in {safe_uri(stage.tracking_uri)}, but `tracking_uri` "
                    f"{safe_uri(tracking_uri)!r} is another store, so this logger starts a separate top-level run "
                    f"there. Fix: drop `tracking_uri` (or pass {safe_uri(stage.tracking_uri)!r}) to log into the "
                    "stage's run, or pass `run_id=` / `parent_run_id=` to say which run this is.",
                    UserWarning,
                    stacklevel=2,
                )
        tracking_uri = tracking_uri or default_tracking_uri()
        user_tags = validate_tags(redact(dict(tags or {})))
        if "git_commit" not in user_tags:
            sha = git_commit()
            if sha:
                user_tags["git_commit"] = sha
        # MLflow's context tags (mlflow.user, mlflow.source.*, git), resolved here in the training process: the run
        # may be created later by the background writer or by `sync`, which carry them in the spool header
        context_tags = _context_tags()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=user_tags,
            save_dir=save_dir,
            log_model=log_model,
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
        )
        self._explicit_run_id = run_id is not None
        self._resume_from = None if resume_from is None else os.fspath(resume_from)
        self._context_tags = context_tags
        self._save_dir_arg = None if save_dir is None else os.fspath(save_dir)
        self._root_dir = os.getcwd()  # the Trainer's default_root_dir once attached (Lightning's checkpoint root)
        self._synchronous = synchronous is True
        self._parent_run_id = parent_run_id
        self._parent_experiment_id = parent_experiment_id
        self._flush_interval_s = float(flush_interval_s)
        self._writer_mode = writer
        #: The writer in use and why (``"process: ..."`` / ``"thread: ..."``), set when it starts.
        self.writer_choice: str | None = None
        self._spool_dir = spool_dir
        self._request_timeout_s = float(request_timeout_s)
        self._finalize_timeout_s = float(finalize_timeout_s)
        self._spool: Spool | None = None
        self._writer: WriterLike | None = None  # Writer (thread) or ProcessWriter
        self._process_failure: str | None = None  # why the writer process was given up (then: threads only)
        self._writer_lock = threading.Lock()
        self._params: dict[str, str] = {}
        self._whole_params: dict[str, str] = {}
        self._key_cache: dict[str, str] = {}
        self._metric_names: dict[str, str] = {}  # metric key as logged -> as stored (log_metrics' fast path)
        self._next_ready_check = 0.0  # log_metrics checks the spool and the writer at most this often (time.time)
        self._warned: set[str] = set()
        self._pending_points = 0
        self._broadcast_done = False
        self._spool_key: str | None = None
        self.last_spool_path: Path | None = None
        self.offline = False
        self.resumed = False
        if _rank() == 0:
            self._warn_if_autolog()

    # ------------------------------------------------------------------------------------------
    # pickling (ddp_spawn, Ray and other launchers ship the Trainer and its logger to workers)
    # ------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The logger without its process-local parts (lock, writer, open spool); they are recreated lazily."""
        state = self.__dict__.copy()
        state.pop("_writer_lock", None)
        state["_writer"] = None
        state["_spool"] = None
        if self._spool is not None or self._spool_key is not None:
            # a copy made after use logs into the same run through a spool of its own: two processes never
            # append to (or deliver and compact) one journal
            state["_spool_key"] = f"{self._spool_key or self._run_id}.{uuid.uuid4().hex[:8]}"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._writer_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # run lifecycle
    # ------------------------------------------------------------------------------------------
    @property
    @override
    def experiment(self) -> MlflowClient:
        """The ``MlflowClient`` (rank 0; a dummy on other ranks). Creating it creates or resumes the run."""
        if not self._initialized or not self._broadcast_done:
            self._initialize()
        if _rank() != 0:
            return DummyExperiment()  # type: ignore[return-value]
        return self._mlflow_client

    def _initialize(self) -> None:
        ctx = _trainer_frames.trainer_context()
        trainer = ctx.trainer
        if ctx.missed:
            self._warn_once(
                "frames",
                "MLflowCVLogger: Lightning touched the logger without going through `Trainer._run` -> "
                f"`_call_setup_hook`, the frames it reads the resumed checkpoint from (checked on Lightning "
                f"{_trainer_frames.CHECKED_ON}; this is {_lightning_version()}). A fit resumed with `ckpt_path=` "
                "starts a new MLflow run instead of continuing the checkpoint's. Fix: "
                "`MLflowCVLogger(resume_from=<the checkpoint>)` (or `run_id=`) continues that run.",
                RuntimeWarning,
            )
        if trainer is not None:
            self._attach(trainer)
        if not self._initialized:
            if _rank() == 0:
                import mlflow

                # as Lightning's logger does: `with mlflow.start_run(run_id=logger.run_id)` then finds the run
                mlflow.set_tracking_uri(self._tracking_uri)
                ckpt = self._resume_from or ctx.ckpt_path
                if not self._explicit_run_id and ckpt and self._run_id is None:
                    # unreadable: said once, with both run ids, when Lightning restores it (_check_resumed_run)
                    self._run_id, self._ckpt_unread = read_run_id(ckpt)
                self._start_run(trainer)
                if self._resume_from is not None and self._ckpt_unread is not None:
                    self._warn_once(
                        "resume-missed",
                        f"MLflowCVLogger: could not read the MLflow run id from resume_from={self._resume_from!r} "
                        f"({self._ckpt_unread}); this fit logs into the new run {self._run_id}. Fix: pass the "
                        "checkpoint's run as `run_id=` (shown in the MLflow UI) instead of `resume_from=`.",
                        RuntimeWarning,
                    )
            self._initialized = True
        if trainer is not None and trainer.world_size <= 1:
            self._broadcast_done = True  # single process: nothing to share
        # with more processes, the internal callback's `setup` hook (run on every rank) shares rank 0's run id;
        # without a Trainer (e.g. `logger.run_id` read before `fit`), the Trainer's setup attaches it later

    @property
    @override
    def save_dir(self) -> str | None:
        """The local directory of this logger: ``trainer.log_dir`` and the root of ModelCheckpoint's
        ``<save_dir>/<experiment id>/<run id>/checkpoints``.

        With a ``file:`` store, the store's directory (as in ``MLFlowLogger``). With any other store (SQLite,
        HTTP), the ``save_dir`` argument when given, else the Trainer's ``default_root_dir`` (the working directory
        until a Trainer uses the logger), which is where Lightning puts the checkpoints in that case.
        """
        if self._tracking_uri.startswith("file:"):
            return super().save_dir
        return self._save_dir_arg or self._root_dir

    @property
    def known_run_id(self) -> str | None:
        """The run id as known now, without creating or resuming the run (unlike :attr:`run_id`): ``None`` before
        the run started (and, under DDP, on ranks other than 0 before the Trainer's ``setup``); an ``offline-...``
        placeholder while the store is unreachable."""
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        """The tracking store this logger writes to, as resolved at construction (may carry credentials: mask it
        with ``safe_uri`` before printing)."""
        return self._tracking_uri

    @property
    def request_timeout_s(self) -> float:
        """Per-request timeout in seconds of the background writer (callbacks bound their own MLflow calls by it)."""
        return self._request_timeout_s

    @property
    def logged_params(self) -> Mapping[str, str]:
        """The params the run holds so far (read-only): those logged by this logger and, on resume, the run's own."""
        return MappingProxyType(self._params)

    @property
    def spool_path(self) -> Path | None:
        """Path of this run's spool file (rank 0, once the run started)."""
        return self._spool.path if self._spool is not None else None

    @rank_zero_only
    def flush(self, timeout: float = 60.0) -> bool:
        """Deliver everything logged so far. Returns True when the store has it all.

        Returns early (False) when the store is unreachable; the data stays in the spool.
        """
        if self._spool is None:
            return True
        return self._ensure_writer().flush(timeout)

    @override
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Drain the writer and set the run status (FINISHED, FAILED, or KILLED on KeyboardInterrupt)."""
        if not self._initialized or self._spool is None:
            return
        exc = sys.exc_info()[1]
        mlflow_status = "KILLED" if isinstance(exc, KeyboardInterrupt) else _STATUS.get(status, status.upper())
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        self._spool.append({"t": "status", "status": mlflow_status, "end": int(time.time() * 1000)})
        self._close_writer()

    # ------------------------------------------------------------------------------------------
    # writes (all rank zero, all through the spool)
    # ------------------------------------------------------------------------------------------
    def _spool_ready(self) -> Spool:
        if not self._initialized:
            _ = self.experiment
        if self._spool is None:  # finalized before (e.g. `trainer.test` after `fit`): reopen the same run
            key = self._spool_key or str(self._run_id)
            self._open_spool(key, {"t": "run", "tracking_uri": safe_uri(self._tracking_uri), "run_id": self._run_id})
        elif self._writer is None or not self._writer.is_alive():
            self._ensure_writer()
        else:
            self._follow_spool_to_memory()
        return self._spool  # type: ignore[return-value]

    def _warn_non_numeric(self, key: str, value: Any) -> None:
        self._warn_once(
            f"nonnum:{key}",
            f"MLflowCVLogger: metric {key!r} has a non-numeric value {str(value)[:100]!r} ({type(value).__name__}) and "
            "is not logged. Log numbers (or 1-element tensors); put text in a tag or `log_text`.",
        )

    def _warn_once(self, key: str, msg: str, category: type[Warning] = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, category, stacklevel=4)

    def _key(self, key: str, kind: Literal["metric", "param", "tag"] = "param") -> str:
        cache_key = f"{kind}:{key}"
        cached = self._key_cache.get(cache_key)
        if cached is None:
            cached = metric_key(key) if kind == "metric" else sanitize_key(key)
            if cached != key:
                rule = (
                    "metric keys are named as Lightning's MLFlowLogger names them: characters other than letters, "
                    "digits and _ - . / space are deleted"
                    if kind == "metric"
                    else "characters MLflow rejects (other than letters, digits and _ - . / space :) are deleted"
                )
                self._warn_once(
                    f"key:{cache_key}",
                    f"MLflowCVLogger: {kind} key {key!r} is logged as {cached!r} ({rule}; empty, '.' and '..' path "
                    f"segments are dropped or replaced and keys cut to {MAX_KEY_LENGTH} characters, so MLflow accepts "
                    "them). Rename the key to keep it as written.",
                )
            self._key_cache[cache_key] = cached
        return cached

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Enqueue metric points (non-blocking). NaN/inf are kept; non-numeric values are dropped with a warning."""
        # The training thread's hot path (every logging step). Inside a fit everything here runs with cold caches
        # beside torch's threads, several times slower than in a micro-benchmark, so it does as little as it can:
        # the spool/writer health check at most every 0.5 s, no per-key calls once a key has been seen, floats and
        # ints (Lightning adds `epoch`) straight through, and the record queued for the journal's group commit.
        now = time.time()
        spool = self._spool
        if spool is None or now >= self._next_ready_check:
            spool = self._spool_ready()
            self._next_ready_check = now + 0.5
        if self._prefix:
            metrics = _add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR)
        names = self._metric_names
        out: dict[str, float] = {}
        for k, v in metrics.items():
            tv = type(v)
            if tv is not float:
                v = float(v) if tv is int else metric_value(v)
                if v is None:
                    self._warn_non_numeric(k, metrics[k])
                    continue
            name = names.get(k)
            if name is None:
                name = names[k] = self._key(k, "metric")
            out[name] = v
        if not out:
            return
        spool.append_metrics(int(step or 0), int(now * 1000), out)
        self._pending_points += len(out)
        if self._synchronous:
            self._pending_points = 0
            self.flush(self._finalize_timeout_s)
        elif self._pending_points >= 1000:
            self._pending_points = 0
            cast(WriterLike, self._writer).wake()  # _spool_ready started it

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Log flattened, redacted params; over-long values are truncated and kept whole in an artifact.

        Logging a key again with a different value warns (MLflow params are immutable) instead of failing.
        """
        flat = _flatten_dict(_convert_params(params))
        flat = flatten(redact(flat))
        # a value that is not a string (an object, a number) is checked again once it is the text MLflow stores
        values = {self._key(k): v if isinstance(v, str) else redact_text(param_value(v)) for k, v in flat.items()}
        self.log_params_dict(values)
        if self._synchronous:
            self.flush(self._finalize_timeout_s)

    def log_params_dict(self, values: Mapping[str, str]) -> None:
        """Log already-flat string params (used by callbacks). Same limits and collision policy."""
        if _rank() != 0:
            return
        spool = self._spool_ready()
        short, whole = split_long_params(dict(values), MAX_PARAM_VAL_LENGTH)
        new: dict[str, str] = {}
        for k, v in short.items():
            old = self._params.get(k)
            if old is None:
                new[k] = v
                self._params[k] = v
            elif old != v:
                self._warn_once(
                    f"param:{k}",
                    f"MLflowCVLogger: param {k!r} was already logged for run {self._run_id} as {old[:200]!r}; the new "
                    f"value {v[:200]!r} is not logged because MLflow params cannot change. Fix: start a new run "
                    "(drop `ckpt_path`/`run_id`) or log the changed value under another key.",
                )
        if whole:
            self._whole_params.update(whole)
            self.log_dict(self._whole_params, "params/full_values.json")
        if new:
            spool.append({"t": "p", "d": new})

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted, truncated to MLflow's limit)."""
        from lightning_mlflow_cv._facts.keys import MAX_TAG_VAL_LENGTH

        spool = self._spool_ready()
        clean = {
            self._key(k, "tag"): (v if isinstance(v, str) else redact_text(str(v)))[:MAX_TAG_VAL_LENGTH]
            for k, v in redact(dict(tags)).items()
        }
        if clean:
            spool.append({"t": "tag", "d": clean})

    @rank_zero_only
    def log_dataset(self, dataset: Any, context: str | None = None) -> None:
        """Record an MLflow dataset input (what ``mlflow.log_input`` does), through the spool.

        Args:
            dataset: an ``mlflow.data.dataset.Dataset`` (e.g. from ``mlflow.data.from_numpy``) or its entity.
            context: ``training``, ``validation``, ``testing`` (stored as the ``mlflow.data.context`` tag).
        """
        entity = dataset._to_mlflow_entity() if hasattr(dataset, "_to_mlflow_entity") else dataset
        d = {
            "name": entity.name,
            "digest": entity.digest,
            "source_type": entity.source_type,
            "source": entity.source,
            "schema": entity.schema,
            "profile": entity.profile,
        }
        self._spool_ready().append({"t": "input", "d": d, "ctx": context})

    @rank_zero_only
    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's files) to the run; a copy is kept in the spool until delivered."""
        spool = self._spool_ready()
        p = Path(local_path)
        if not p.exists():
            raise FileNotFoundError(
                f"MLflowCVLogger.log_artifact: {str(p)!r} does not exist. Pass the path of a file or directory to upload."
            )
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            rel = f.parent.relative_to(p).as_posix() if p.is_dir() else ""
            dst = "/".join(x for x in (artifact_path or "", rel if rel != "." else "") if x)
            spool.append({"t": "a", "src": spool.stage_file(f), "dst": dst})

    def _log_file(self, artifact_file: str, write: Any) -> None:
        spool = self._spool_ready()
        artifact_file = artifact_file.strip("/")
        name = os.path.basename(artifact_file)
        path = spool.new_file_path(name)
        write(path)
        spool.append({"t": "a", "src": str(path), "dst": os.path.dirname(artifact_file)})

    @rank_zero_only
    def log_dict(self, data: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
        """Log ``data`` (secrets redacted) as a JSON (or, for ``.yaml``/``.yml``, YAML) artifact at ``artifact_file``."""
        data = redact(data)

        def write(path: Path) -> None:
            if artifact_file.endswith((".yaml", ".yml")):
                import yaml

                path.write_text(yaml.safe_dump(data, sort_keys=False))
            else:
                path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))

        self._log_file(artifact_file, write)

    @rank_zero_only
    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` (secrets redacted: credential shapes, ``user:pass@`` in URLs, ``secret=value`` pairs) as the
        artifact ``artifact_file``."""
        text = redact_text(text)
        self._log_file(artifact_file, lambda path: path.write_text(text, encoding="utf-8"))

    @rank_zero_only
    def log_image(self, key: str, image: Any, step: int | None = None) -> None:
        """Log an image under ``key`` at ``step``, stored the way MLflow's step-aware image logging does,
        so the MLflow UI shows its history by step.

        Args:
            key: Image series name (``/`` allowed).
            image: ``torch.Tensor`` ``(C, H, W)`` or ``(H, W)``; ``numpy.ndarray`` ``(H, W[, C])``; or PIL image.
                Floats must be in ``[0, 1]``; ``uint8`` in ``[0, 255]``; C in (1, 3, 4).
            step: The step (e.g. the epoch).

        Raises:
            ValueError: on an unsupported dtype, shape or value range (names the fix).
        """
        from lightning_mlflow_cv._compat.mlflow_api import compress_image_size

        spool = self._spool_ready()
        pil = to_pil_image(image)
        clean_key = IMAGE_KEY_ILLEGAL.sub("_", key)
        if clean_key != key:
            self._warn_once(
                f"image:{key}",
                f"MLflowCVLogger: image key {key!r} has characters an artifact name cannot hold; it is logged as "
                f"{clean_key!r}. Use letters, digits and _ - . / space to keep the name as written.",
            )
        ts = int(time.time() * 1000)
        base = f"{clean_key.replace('/', '~')}+step+{int(step or 0)}+timestamp+{ts}+{uuid.uuid4()}"
        png = spool.new_file_path(f"{base}.png")
        pil.save(png)
        webp = png.with_name(f"{base}+compressed.webp")
        compress_image_size(pil).save(webp)
        spool.append(
            {"t": "a", "src": str(png), "dst": "images"},
            {"t": "a", "src": str(webp), "dst": "images"},
            {"t": "tag", "d": {"mlflow.loggedImages": "True"}},
        )

    @rank_zero_only
    def log_image_artifact(self, image: Any, artifact_file: str) -> None:
        """Log a single (non-series) image as the PNG artifact ``artifact_file`` (e.g. ``augmentations/x.png``).

        Accepts what :meth:`log_image` accepts and raises the same ``ValueError`` on bad input.
        """
        pil = to_pil_image(image)
        self._log_file(artifact_file, lambda path: pil.save(path, format="PNG"))

    @rank_zero_only
    def log_figure(self, key: str, figure: Any, step: int | None = None, close: bool = True) -> None:
        """Log a matplotlib figure: with ``step``, as an image series ``key``; without, as ``figures/<key>.png``
        (or at ``key`` itself when it ends in .png/.svg/.pdf)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        figure.savefig(buf, format="png", bbox_inches="tight", dpi=100)
        if close:
            plt.close(figure)
        buf.seek(0)
        if step is not None:
            from PIL import Image

            self.log_image(key, Image.open(buf).convert("RGB"), step=step)
            return
        artifact_file = key if key.endswith((".png", ".svg", ".pdf")) else f"figures/{key}.png"
        if artifact_file.endswith(".png"):
            self._log_file(artifact_file, lambda path: path.write_bytes(buf.getvalue()))
        else:
            fmt = artifact_file.rsplit(".", 1)[1]
            out = io.BytesIO()
            figure.savefig(out, format=fmt, bbox_inches="tight")
            self._log_file(artifact_file, lambda path: path.write_bytes(out.getvalue()))

    @override
    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        import yaml
        from lightning.pytorch.loggers.utilities import _scan_checkpoints

        for t, p, s, _tag in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            artifact_path = Path(p).stem
            self.log_artifact(p, artifact_path)
            meta = {
                "score": s.item() if hasattr(s, "item") else s,
                "original_filename": Path(p).name,
                "Checkpoint": {
                    k: getattr(checkpoint_callback, k) for k in _CHECKPOINT_META if hasattr(checkpoint_callback, k)
                },
            }
            aliases = ["latest", "best"] if p == checkpoint_callback.best_model_path else ["latest"]
            self._log_file(
                f"{artifact_path}/metadata.yaml",
                lambda path, m=meta: path.write_text(yaml.dump(m, default_flow_style=False)),
            )
            self.log_text(str(aliases), f"{artifact_path}/aliases.txt")
            self._logged_model_time[p] = t

    def _warn_if_autolog(self) -> None:
        try:
            from mlflow.utils.autologging_utils import autologging_is_disabled
        except ImportError:  # pragma: no cover
            return
        if not autologging_is_disabled("pytorch"):
            self._warn_once(
                "autolog",
                "MLflowCVLogger: `mlflow.pytorch.autolog()` is active. It patches `Trainer.fit`, opens a second run "
                "and logs the same metrics again. Fix: call `mlflow.pytorch.autolog(disable=True)`; MLflowCVLogger "
                "already logs metrics and params, and ModelRegistryCallback logs the model. To keep one autolog "
                "feature, log it through this logger instead.",
            )


@atexit.register
def _flush_at_exit() -> None:  # pragma: no cover - exercised by process exit
    for lg in live_loggers():
        writer = lg._writer
        if writer is not None and writer.is_alive():
            try:
                writer.stop(min(lg._finalize_timeout_s, 10.0))
            except Exception:  # noqa: BLE001
                pass
