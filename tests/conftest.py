"""Shared fixtures: real SQLite stores, a real `mlflow server` subprocess, tiny digits fits."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every test runs in its own cwd with its own spool dir and no inherited tracking URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LIGHTNING_MLFLOW_CV_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("GIT_COMMIT_SHA", "0123456789abcdef0123456789abcdef01234567")
    import mlflow

    mlflow.set_tracking_uri(None)  # a logger sets MLflow's fluent URI (as Lightning's does): start each test clean
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A real SQLite tracking store in tmp_path."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a server that binds it later.

    Chosen at random below the kernel's ephemeral range (where outgoing connections, e.g. the logger's own,
    take their local ports), so neither those nor another test's pick are likely to take it before the server
    binds it; :meth:`MlflowServer.start` still moves to another port if that happens.
    """
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port that refuses connections while the context lasts: bound by this process and never listened on
    (nothing else can bind it meanwhile), unlike a fixed port assumed closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def console_script() -> list[str]:
    """The ``lightning-mlflow-cv`` command: the console script installed beside this interpreter, or, in the
    compatibility environments (the package imported from the checkout, not installed), the same ``main`` through
    ``python -m lightning_mlflow_cv.cli``. ``tests/test_cli.py`` runs the installed script itself."""
    exe = Path(sys.executable).with_name("lightning-mlflow-cv")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_mlflow_cv.cli"]


def git(cwd: Path, *args: str) -> str:
    """``git ARGS`` in ``cwd`` with a throwaway identity and no signing; its stdout, stripped."""
    cmd = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_git_repo(path: Path) -> str:
    """A git work tree at ``path`` on branch ``exp-branch`` with one commit of ``train.py``; the commit's sha."""
    path.mkdir(exist_ok=True)
    git(path, "init", "-q", "-b", "exp-branch")
    (path / "train.py").write_text("print('hi')\n")
    git(path, "add", "train.py")
    git(path, "commit", "-q", "-m", "init")
    return git(path, "rev-parse", "HEAD")


class _ServerProcess:
    """A server subprocess in its own session, logging to ``self.log``: a subclass's ``start`` runs :meth:`_spawn`
    and :meth:`_wait_ready` (polls a URL until it answers), :meth:`stop` ends its process group; ``with server:``
    starts it and always stops it."""

    log: Path
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _wait_ready(self, url: str, timeout: float, what: str, poll_s: float = 0.3) -> bool:
        """True once ``url`` answers; False when the process exited first (``proc`` is None then, the log says
        why); after ``timeout`` seconds: stop it and raise with the log's tail."""
        assert self.proc is not None
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return True
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"{what} did not start in {timeout}s: {self.log.read_text()[-3000:]}") from None
                time.sleep(poll_s)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None


def _running(server_class: Callable[[Path], _ServerProcess], root: Path) -> Iterator[Any]:
    """A fixture's body: ``server_class(root)`` started in a fresh ``root``, stopped at the end."""
    root.mkdir()
    with server_class(root) as server:
        yield server


class MlflowServer(_ServerProcess):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts); stop/start keep the data."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        backend_uri: str | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        artifacts: list[str] | None = None,
    ):
        self.root = root
        self._auto_port = port is None  # a port we chose may be taken before the first start binds it: move on
        self.port = port or free_port()
        self.backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
        self.extra = extra or []
        self.env = env or {}  # extra environment of the server process (e.g. S3 credentials)
        self.artifacts = artifacts or ["--artifacts-destination", str(root / "artifacts")]
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        # LMC_TEST_SERVER_MLFLOW: the `mlflow` executable to serve with (e.g. an MLflow 2.22 venv's, for the
        # compatibility leg: this client against an older server); default: this interpreter's own.
        exe = os.environ.get("LMC_TEST_SERVER_MLFLOW") or Path(sys.executable).with_name("mlflow")
        cmd = [
            str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_uri,
            *self.artifacts,
            "--workers", "1", *self.extra,
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        # MLflow 2.x execs `gunicorn` by name: the one installed beside that `mlflow`, not one found elsewhere
        env["PATH"] = os.pathsep.join([str(Path(exe).parent), env.get("PATH", "")])
        log_start = self.log.stat().st_size if self.log.exists() else 0
        self._spawn(cmd, env)
        if self._wait_ready(f"{self.uri}/health", timeout, "mlflow server"):
            self._auto_port = False  # clients know this port now: restarts keep it
            return
        if self._auto_port and "in use" in self.log.read_bytes()[log_start:].decode(errors="replace").lower():
            self.port = free_port()  # taken since we chose it (a busy machine): try another
            return self.start(timeout)
        raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A started real `mlflow server` subprocess; always stopped at the end."""
    yield from _running(MlflowServer, tmp_path / "server")


class S3Server(_ServerProcess):
    """moto's standalone S3-compatible server on 127.0.0.1 (bucket ``mlflow``); stop/start keep the objects.

    moto keeps its state in memory: the server records every request (``MOTO_ENABLE_RECORDING``) and a restart
    replays the recording, so a stopped and restarted store holds what it held. With ``auth=True`` it checks
    signatures against IAM users (:meth:`credentials` creates one); that mode does not survive a restart.
    """

    BUCKET = "mlflow"

    def __init__(self, root: Path, auth: bool = False) -> None:
        self.root = root
        self.port = free_port()
        self.auth = auth
        self.recording = root / "moto-recording.jsonl"
        self.log = root / "moto.log"
        self.proc: subprocess.Popen | None = None
        self.key_id, self.secret = "moto-test-key", "moto-test-secret"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, secret: str | None = None) -> dict[str, str]:
        """What a process writing to the store needs: credentials, region and MLflow's S3 endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self, timeout: float = 60.0) -> None:
        restart = self.recording.exists() and self.recording.stat().st_size > 0
        env = {**os.environ, "MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(self.recording)}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # create_user, create_access_key, put_user_policy
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._spawn(cmd, env)
        if not self._wait_ready(f"{self.endpoint}/moto-api/", timeout, "moto server", poll_s=0.2):
            raise RuntimeError(f"moto server exited: {self.log.read_text()[-3000:]}")
        if restart:
            req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/replay-recording", method="POST")
            urllib.request.urlopen(req, timeout=120).close()
        elif not self.auth:
            self.client().create_bucket(Bucket=self.BUCKET)

    def credentials(self) -> tuple[str, str]:
        """With ``auth=True``: create an IAM user allowed everything, its key, and the bucket; returns the key."""
        import json

        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="mlflow")
        key = iam.create_access_key(UserName="mlflow")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="mlflow", PolicyName="all", PolicyDocument=json.dumps(policy))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=self.BUCKET)
        return self.key_id, self.secret

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def s3_server(tmp_path: Path):
    """A started moto S3 server with the bucket ``mlflow``; always stopped at the end."""
    yield from _running(S3Server, tmp_path / "s3")


@pytest.fixture(scope="session")
def digits():
    """(uint8 images (N,1,8,8), labels (N,)) from scikit-learn's bundled digits."""
    from lightning_mlflow_cv.demos.digits import load_digits_tensors

    return load_digits_tensors()


def require_real(part: str, reason: str) -> None:
    """Skip the calling test (or module) because a real part it needs is missing here; under CI (``CI=true``)
    fail instead: CI must exercise every real part, and a skip there would leave that path untested while the
    run stays green."""
    message = f"{part} is not available: {reason}"
    if under_ci():
        pytest.fail(f"{message}. Under CI a missing real part fails the test (install it; .ci/run does).", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


#: How a skip for a part older than the test needs starts (see needs_newer); under CI, other skips fail.
NEEDS_NEWER = re.compile(r"^needs (\S+) >= (\S+) \(this is \1 [^)]*\): .")


def _installed(part: str) -> str:
    try:
        return importlib.metadata.version(part)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def newer_reason(part: str, since: str, what: str) -> str:
    """The one form of reason a skip may give under CI: ``needs torch >= 2.4 (this is torch 2.0.1): what``."""
    return f"needs {part} >= {since} (this is {part} {_installed(part)}): {what}"


def needs_newer(part: str, since: str, have_it: bool, what: str) -> pytest.MarkDecorator:
    """Skip the test where ``have_it`` is false: it exercises ``what``, which the installed ``part`` (a torch,
    torchvision, Lightning, torchmetrics or MLflow older than ``since``, e.g. at the floor pyproject admits) lacks.
    The product detects the same feature in ``lightning_mlflow_cv._compat.mlflow_api`` / ``lightning_mlflow_cv._compat.frameworks``."""
    return pytest.mark.skipif(not have_it, reason=newer_reason(part, since, what))


def skip_needs_newer(part: str, since: str, what: str) -> None:
    """:func:`needs_newer` inside a test (or at a module's top, before its imports need the part)."""
    pytest.skip(newer_reason(part, since, what), allow_module_level=True)


def ci_skip_failure(reason: str, markers: set[str]) -> str | None:
    """Why a skip with ``reason`` fails under CI (``None``: it may skip). Only two kinds skip there: a test that
    needs a newer release than the one installed (:func:`needs_newer`), and a ``gpu`` test on a machine without a
    GPU (CI has none; ``make gpu-check`` runs them on one)."""
    if NEEDS_NEWER.match(reason) or "gpu" in markers:
        return None
    return (
        f"skipped under CI: {reason}. Under CI a test may skip only when it needs a newer release than the one "
        "installed (conftest.needs_newer) or a GPU; anything else it needs must be installed (.ci/run does)"
    )


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(getattr(longrepr, "reprcrash", None) and longrepr.reprcrash.message or longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI, a skip that is neither :func:`needs_newer` nor a ``gpu`` test without a GPU fails the test."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and under_ci() and not hasattr(report, "wasxfail"):
        why = ci_skip_failure(_skip_reason(report.longrepr), {m.name for m in item.iter_markers()})
        if why is not None:
            report.outcome, report.longrepr = "failed", why


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same rule for a module that skips as a whole (``pytest.skip(..., allow_module_level=True)``)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and under_ci():
        why = ci_skip_failure(_skip_reason(report.longrepr), set())
        if why is not None:
            report.outcome, report.longrepr = "failed", why


def import_real(module: str, extra: str) -> Any:
    """``pytest.importorskip`` for an optional dependency the suite exercises, failing under CI (see require_real)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        require_real(module, f"{err}. Fix: pip install \"lightning-mlflow-cv[{extra}]\"")


def _pg_bin() -> Path:
    """The newest PostgreSQL server binaries Debian's `postgresql` package installed (/usr/lib/postgresql/N/bin)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    return max(found, key=lambda b: int(b.parts[-2])) if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def has_postgres() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("runuser") is not None


class PostgresServer:
    """A throwaway PostgreSQL cluster: initdb in a temp dir as the unprivileged user `nobody`."""

    def __init__(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="lmc-pg-", dir="/tmp"))
        self.port = free_port()
        self.data = self.dir / "data"

    def _as_nobody(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout, check=True)

    def start(self) -> None:
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody", "nogroup")
        self._as_nobody(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._as_nobody(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-w", "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start",
        )
        self._as_nobody(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def uri(self, db: str = "mlflow") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        try:
            self._as_nobody(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    """A started PostgreSQL cluster (database `mlflow`), always stopped and removed at the end."""
    if not has_postgres():
        require_real("PostgreSQL", f"no server binaries in {PG_BIN} or no runuser (Debian: apt-get install postgresql)")
    pg = PostgresServer()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
