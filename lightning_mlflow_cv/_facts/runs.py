"""Run plumbing shared by the logger, ``pipeline_run`` and the sweeps.

One place for what every part that creates or joins an MLflow run needs: the default tracking store, the run a
pipeline stage (or sweep trial) is running (so a default ``MLflowCVLogger()`` inside it logs there), get-or-create
of an experiment that survives two processes creating it at once, creating a run from a spool header, the run
status a block ended with, and the registry of live loggers (drained before a sweep ends a trial's run).

This module imports nothing from the package, so every other module may import it without a cycle.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: The embedded default store (MLflow 3's own default), resolved against the cwd when read.
DEFAULT_TRACKING_DB = "mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (read at call time)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_TRACKING_DB}"


def normalize_uri(uri: str) -> str:
    """A form of a tracking URI under which two spellings of one store compare equal.

    SQLite and file stores become absolute, resolved paths (``sqlite:///mlflow.db`` in the cwd equals
    ``sqlite:////<cwd>/mlflow.db``); for servers and databases the scheme (without a ``+driver``), host and port are
    lower-cased and credentials dropped (the same server with another user is the same store).

    Example::

        >>> normalize_uri("HTTP://user:pw@Host:5000/") == normalize_uri("http://host:5000")
        True
    """
    s = uri.strip()
    scheme, sep, rest = s.partition(":")
    if not sep and s.lower().startswith("databricks"):
        return s.lower()
    if not sep or len(scheme) == 1 or "/" in scheme:  # a bare path (or a Windows drive letter): a file store
        return "file://" + str(Path(s).expanduser().resolve())
    scheme = scheme.lower().split("+", 1)[0]
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        path = path[3:] if path.startswith("///") else path.lstrip("/")
        if path in ("", ":memory:"):
            return s
        return f"sqlite:///{Path(path).expanduser().resolve()}" + (f"?{query}" if query else "")
    if scheme == "file":
        path = urlsplit(s).path if rest.startswith("//") else rest
        return "file://" + str(Path(path).expanduser().resolve())
    parts = urlsplit(s)
    if not parts.netloc:
        return f"{scheme}:{rest}"
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    path = parts.path.rstrip("/")
    return f"{scheme}://{host}{port}{path}" + (f"?{parts.query}" if parts.query else "")


def same_store(a: str, b: str) -> bool:
    """Whether two tracking URIs name the same store (see :func:`normalize_uri`)."""
    return a == b or normalize_uri(a) == normalize_uri(b)


def is_relative_store(uri: str) -> bool:
    """Whether ``uri`` names a local store by a relative path (``sqlite:///mlflow.db``, ``file:./mlruns``,
    ``./mlruns``): such a URI recorded by another process names a different store in each working directory.

    Example::

        >>> is_relative_store("sqlite:///mlflow.db"), is_relative_store("sqlite:////tmp/mlflow.db")
        (True, False)
    """
    s = uri.strip()
    if ":" not in s:
        return not os.path.isabs(s)
    scheme, _, rest = s.partition(":")
    scheme = scheme.split("+")[0].lower()
    if scheme == "sqlite":
        return not rest.startswith("////")  # sqlite:////abs/path.db; sqlite:///rel.db is relative
    if scheme == "file":
        return not (rest[2:] if rest.startswith("//") else rest).startswith("/")
    return False


# ------------------------------------------------------------------------------------------------------------
# the run a block of code is "in": a pipeline stage or a sweep trial
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """A run that a default-configured logger joins: ``run_id``, ``name``, and the store it lives in."""

    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str


#: The stage a default-configured MLflowCVLogger logs into (set by ``Pipeline.stage`` and the sweeps' trials).
ACTIVE_STAGE: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("lmc_active_stage", default=None)


@contextlib.contextmanager
def active_stage(stage: Stage | None) -> Iterator[Stage | None]:
    """Make ``stage`` the active one inside the block (``None``: leave the active stage as it is)."""
    if stage is None:
        yield None
        return
    token = ACTIVE_STAGE.set(stage)
    try:
        yield stage
    finally:
        ACTIVE_STAGE.reset(token)


# ------------------------------------------------------------------------------------------------------------
# experiments and runs
# ------------------------------------------------------------------------------------------------------------
def get_or_create_experiment(client: Any, name: str, artifact_location: str | None = None, attempts: int = 3) -> str:
    """The id of the active experiment ``name``, created when missing.

    Safe when several processes create the same experiment at once: the one whose create fails finds the
    experiment another made (SQL stores answer RESOURCE_ALREADY_EXISTS, SQLite may also answer "database is
    locked" while the other writes) and returns its id. A deleted experiment of that name is not reused.

    Raises:
        ValueError: the experiment ``name`` is deleted (names the fix: restore, purge, or another name).
        mlflow.exceptions.MlflowException: the experiment could not be found or created after ``attempts`` tries.
    """
    last: BaseException | None = None
    for attempt in range(max(1, attempts)):
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage != "deleted":
            return str(exp.experiment_id)
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location))
        except Exception as err:
            if exp is not None:  # deleted: the name stays taken until the experiment is restored or purged
                raise ValueError(
                    f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted, so it can neither be logged "
                    "into nor created again. Fix: restore it (`MlflowClient().restore_experiment("
                    f"{str(exp.experiment_id)!r})`), delete it for good (`mlflow gc`), or use another experiment name."
                ) from err
            last = err  # another process may have created it meanwhile: look again
            time.sleep(0.05 * (attempt + 1))
    assert last is not None
    raise last


def create_run(client: Any, header: dict[str, Any]) -> str:
    """Create the run a spool header describes (experiment created when missing); returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    exp_id = header.get("experiment_id")
    if exp_id is None:
        exp_id = get_or_create_experiment(
            client, header.get("experiment_name") or "Default", header.get("artifact_location")
        )
    tags = dict(header.get("tags") or {})
    if header.get("run_name"):
        tags[MLFLOW_RUN_NAME] = header["run_name"]
    if header.get("parent_run_id"):
        tags[MLFLOW_PARENT_RUN_ID] = header["parent_run_id"]
    run = client.create_run(experiment_id=exp_id, tags=tags, run_name=header.get("run_name"))
    return str(run.info.run_id)


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


@contextlib.contextmanager
def status_on_exit(outcome: dict[str, str]) -> Iterator[None]:
    """Record in ``outcome["status"]`` the MLflow status a block ended with: KILLED on Ctrl+C, FAILED on any other
    exception (re-raised), unchanged otherwise."""
    try:
        yield
    except KeyboardInterrupt:
        outcome["status"] = "KILLED"
        raise
    except BaseException:
        outcome["status"] = "FAILED"
        raise


# ------------------------------------------------------------------------------------------------------------
# live loggers
# ------------------------------------------------------------------------------------------------------------
#: Loggers with a running writer (flushed at interpreter exit; drained by a sweep before it ends a trial's run).
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def register_live(logger: Any) -> None:
    """Record a logger whose writer runs."""
    _LIVE.add(logger)


def live_loggers(run_id: str | None = None) -> list[Any]:
    """The live loggers (those writing to ``run_id``, when given; read from their public ``known_run_id``)."""
    found = list(_LIVE)
    if run_id is None:
        return found
    return [lg for lg in found if getattr(lg, "known_run_id", None) == run_id]
