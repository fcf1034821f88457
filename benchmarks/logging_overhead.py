"""What does per-step MLflow logging cost a training run? MLflowCVLogger vs. Lightning's MLFlowLogger vs. autolog.

Run from the repository root (see ``benchmarks/README.md`` for the method and the latest figures)::

    python benchmarks/logging_overhead.py            # full run, writes the results into benchmarks/README.md
    python benchmarks/logging_overhead.py --quick    # smoke version, under two minutes, prints only

Workload: a small CNN on random ``1x16x16`` images (10 classes), ``log_every_n_steps=1``, 8 scalar metrics per
training step and 2 epoch metrics, no validation loop, no checkpointing, no progress bar.

Configurations, each in a fresh Python process, interleaved per round (floor, sync, autolog, cv_thread,
cv_process, floor, ...), medians over rounds:

1. ``none``        no logger (the floor);
2. ``sync``        ``lightning.pytorch.loggers.MLFlowLogger`` (synchronous, its default);
3. ``async``       ``MLFlowLogger(synchronous=False)`` (MLflow's async logging queue; not in the default set);
4. ``autolog``     ``mlflow.pytorch.autolog(log_every_n_step=1, log_models=False, checkpoint=False)``;
5. ``cv``          ``lightning_mlflow_cv.MLflowCVLogger`` (defaults: ``writer=None`` picks for the machine; used
                   by the outage and slow-server scenarios);
6. ``cv_thread`` / ``cv_process``: ``MLflowCVLogger(writer="thread" | "process")``;
7. ``bare``        (SQLite, automatic) the workload's points sent with ``MlflowClient.log_batch`` in 1,000-point
                   batches from a plain script: what the store itself costs, per round.

Every round runs both torch-thread settings (``--thread-modes default,1``): torch's default (training keeps every
core busy) and one thread (a spare core, as on a GPU node). Per configuration the tables also give the log-batch
requests per fit (HTTP, from the server's access log), the training-thread CPU per point inside the logging call
(``time.thread_time()`` around ``log_metrics``; for autolog around ``BatchMetricsLogger.record_metrics``) and the
store cost (extra CPU of the training process and any writer process per 1,000 points, against ``bare``).

Stores: ``sqlite`` (a fresh copy of an already-migrated SQLite database per run) and ``http`` (a local
``mlflow server`` on 127.0.0.1 with a SQLite backend, started and stopped by this script; a unique experiment
per run).

Timed window (in the child, ``time.perf_counter``): ``trainer.fit(...)`` from call to return, which includes
creating the MLflow run and the logger's ``finalize`` (MLflowCVLogger drains its spool there and returns only when
the store has everything or gives up; autolog flushes its queue at the end of its patched ``fit``), plus
``mlflow.flush_async_logging()`` for the ``async`` configuration. A logger is only done when its data is in the
store. Outside the window and reported separately as "setup": constructing the logger (Lightning's
``MLFlowLogger.__init__`` builds the ``MlflowClient``, which opens the SQLite store) or calling
``mlflow.set_experiment`` + ``mlflow.pytorch.autolog``, and ``Trainer(...)``. Process start-up, imports, data
creation and the completeness count are outside both. The CPU-time ratio (user + system time of all threads of
the child during the window, divided by the floor's) is a check that is much less sensitive to other load on the
machine than wall time; the server's own CPU time is not in it.

Outage scenario (``http`` only; ``sync``, ``autolog``, ``cv`` and a ``none`` floor with the same steps, one run
each; ``--quick``: ``none`` and ``cv`` only): a fresh server; when the fit reaches 20% of its steps the parent
SIGKILLs the server's process group, waits ``--outage-s`` seconds, and starts it again on the same port and
backend (so the server is down for ``--outage-s`` plus its start-up time, both reported). The floor goes
through the same kill and restart, since the server's start-up loads the machine too. The outage fits are
sized from the measured floor speed so that the server is back by about 70% of the floor's fit. Each child is
capped at ``--cap-s`` seconds (outage runs: at least 8x the outage floor's fit time + 2x ``--outage-s``, so a
slow but working baseline is not cut off); a child still running then is killed and reported as not finished (its
completeness is then counted by the parent). If MLflowCVLogger left data in its spool (the store was still down
when the fit ended), the child replays it with ``lightning_mlflow_cv.sync`` afterwards and reports the
completeness after that separately; the bar is judged on the completeness at the end of the fit.

Slow-server scenario (issue 8; ``http`` only; ``none``, ``sync``, ``autolog`` and ``cv`` with the outage fits'
steps, one run each; ``--quick``: ``none`` and ``cv``): a fresh server behind a proxy (``tests/faults.py``,
running in this parent process) that holds every request ``--slow-delay-s`` seconds (default 2) before
forwarding it; ``cv`` also runs once through the same proxy without the delay, so that what the latency adds
is separated from what logging to this (local, CPU-sharing) server costs anyway. Completeness is counted against the server directly. Baselines that log synchronously pay the
delay on every step, so they are capped at 2x the floor + 30 s and reported as not finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = ["none", "null", "sync", "async", "autolog", "cv", "cv_thread", "cv_process"]
DEFAULT_CONFIGS = ["none", "sync", "autolog", "cv_thread", "cv_process"]
#: With a spare core (torch on one thread) only the floor and both MLflowCVLogger writers run by default (the
#: target there is MLflowCVLogger's ratio to the floor; ``--spare-configs none,sync,autolog,cv_thread,cv_process``
#: adds the peers, about 2.5 minutes more).
DEFAULT_SPARE_CONFIGS = ["none", "cv_thread", "cv_process"]
OUTAGE_CONFIGS = ["none", "sync", "autolog", "cv"]
SLOW_CONFIGS = ["none", "cv_nodelay", "sync", "autolog", "cv"]
LABELS = {
    "none": "no logger (floor)",
    "null": "a Lightning Logger that drops everything (Lightning's own logging path)",
    "sync": "MLFlowLogger (sync, default)",
    "async": "MLFlowLogger(synchronous=False)",
    "autolog": "mlflow.pytorch.autolog",
    "cv": "MLflowCVLogger",
    "cv_thread": "MLflowCVLogger(writer=\"thread\")",
    "cv_process": "MLflowCVLogger(writer=\"process\")",
    "bare": "bare MlflowClient.log_batch, 1,000-point batches",
    "cv_nodelay": "MLflowCVLogger, same proxy without the delay",
}
STEP_KEYS = [
    "train/loss",
    "train/acc",
    "train/logit_mean",
    "train/logit_std",
    "train/confidence",
    "train/entropy",
    "train/weight_norm",
    "train/lr",
]
EPOCH_KEYS = ["epoch/loss", "epoch/acc"]
README_BEGIN = "<!-- results:begin (generated by benchmarks/logging_overhead.py; do not edit by hand) -->"
README_END = "<!-- results:end -->"


# ================================================================================================
# child: one configuration, one fit
# ================================================================================================
def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out_path = Path(spec["out"])
    result: dict[str, Any] = {"config": spec["config"], "store": spec["store"], "finished": False}
    try:
        result.update(_child_run(spec))
        result["finished"] = True
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    out_path.write_text(json.dumps(result))
    return 0 if result["finished"] else 1


def _child_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """The store's own cost: the workload's points sent with ``MlflowClient.log_batch`` in 1,000-point batches."""
    import resource

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(spec["tracking_uri"])
    exp = client.create_experiment(spec["experiment"])
    run_id = client.create_run(exp).info.run_id
    steps, epochs = spec["steps"], spec["epochs"]
    now = int(time.time() * 1000)
    cpu0, t0 = _cpu_s(resource), time.perf_counter()  # building the entities is part of using log_batch
    points = [Metric(k, float(s), now + s, s) for s in range(steps) for k in STEP_KEYS]
    points += [Metric(k, float(e), now + e, e) for e in range(epochs) for k in EPOCH_KEYS]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
    wall, cpu = time.perf_counter() - t0, _cpu_s(resource) - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "cpu_total_s": cpu, "points": len(points), "log_batch_requests": -(-len(points) // 1000)}


def _child_run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["config"] == "bare":
        return _child_bare(spec)
    import resource
    import warnings

    # every configuration pays the same imports, outside the timed window
    import lightning.pytorch as pl
    import mlflow
    import mlflow.pytorch  # noqa: F401
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mlflow_cv import MLflowCVLogger

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    config, uri = spec["config"], spec["tracking_uri"]
    steps, epochs, batch = spec["steps"], spec["epochs"], spec["batch_size"]
    steps_per_epoch = steps // epochs
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    x = torch.randn(steps_per_epoch * batch, 1, 16, 16)
    y = torch.randint(0, 10, (steps_per_epoch * batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)

    class SmallCNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                nn.Flatten(), nn.Linear(16, 10),
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            logits = self(xb)
            loss = F.cross_entropy(logits, yb)
            with torch.no_grad():
                prob = logits.softmax(-1)
                acc = (logits.argmax(-1) == yb).float().mean()
                step_metrics = {
                    "train/loss": loss.detach(),
                    "train/acc": acc,
                    "train/logit_mean": logits.mean(),
                    "train/logit_std": logits.std(),
                    "train/confidence": prob.max(-1).values.mean(),
                    "train/entropy": -(prob * prob.clamp_min(1e-12).log()).sum(-1).mean(),
                    "train/weight_norm": self.net[-1].weight.norm(),
                    "train/lr": torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]),
                }
            self.log_dict(step_metrics, on_step=True, on_epoch=False)
            self.log_dict({"epoch/loss": loss.detach(), "epoch/acc": acc}, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class OutageMarker(pl.Callback):
        """Tells the parent (by creating a file) that the fit reached the step where the outage starts."""

        def __init__(self, path: str, at_step: int) -> None:
            self.path, self.at_step, self.done = path, at_step, False

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if not self.done and trainer.global_step >= self.at_step:
                self.done = True
                Path(self.path).write_text(str(time.time()))
                time.sleep(0.05)

    callbacks: list[Any] = []
    if spec.get("marker"):
        callbacks.append(OutageMarker(spec["marker"], spec["marker_step"]))
    accelerator = "gpu" if spec["device"] == "cuda" else "cpu"
    model = SmallCNN()
    experiment = spec["experiment"]
    run_id: str | None = None
    state_path = Path(spec["state"])

    t_setup = time.perf_counter()
    logger: Any = False
    if config == "sync":
        logger = MLFlowLogger(experiment_name=experiment, tracking_uri=uri)
    elif config == "async":
        logger = MLFlowLogger(experiment_name=experiment, tracking_uri=uri, synchronous=False)
    elif config in ("cv", "cv_thread", "cv_process"):
        writer = None if config == "cv" else config.split("_", 1)[1]
        logger = MLflowCVLogger(experiment_name=experiment, tracking_uri=uri, spool_dir=spec["spool_dir"], writer=writer)
    elif config == "null":
        from lightning.pytorch.loggers.logger import Logger

        class NullLogger(Logger):
            """What Lightning does for any logger (tensors to floats, per-step bookkeeping), with no store."""

            name, version = "null", 0

            def log_metrics(self, metrics: Any, step: Any = None) -> None:
                pass

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

        logger = NullLogger()
    elif config == "autolog":
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        mlflow.pytorch.autolog(log_every_n_step=1, log_models=False, checkpoint=False, silent=True)
    if logger is not False and config != "null":

        class RunIdToParent(pl.Callback):
            def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
                state_path.write_text(json.dumps({"run_id": trainer.logger.run_id}))

        callbacks.append(RunIdToParent())
    elif config == "autolog":

        class RunIdToParent(pl.Callback):  # type: ignore[no-redef]
            def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
                state_path.write_text(json.dumps({"run_id": mlflow.active_run().info.run_id}))

        callbacks.append(RunIdToParent())
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    setup = time.perf_counter() - t_setup
    # training-thread CPU inside the logging call (thread CPU clock): the logger's log_metrics, or autolog's recorder
    log_cpu = {"s": 0.0, "points": 0}

    def thread_clock(fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                log_cpu["s"] += time.thread_time() - t
                metrics = kw.get("metrics", a[0] if a else None)
                log_cpu["points"] += len(metrics or ())

        return timed

    if logger is not False:
        logger.log_metrics = thread_clock(logger.log_metrics)
    elif config == "autolog":
        from mlflow.utils.autologging_utils import BatchMetricsLogger

        BatchMetricsLogger.record_metrics = thread_clock(BatchMetricsLogger.record_metrics)
    cpu0 = _cpu_s(resource)
    cpu_children0 = _cpu_children_s(resource)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    if config == "async":
        mlflow.flush_async_logging()
    wall = time.perf_counter() - t0
    cpu = _cpu_s(resource) - cpu0
    cpu_total = cpu + _cpu_children_s(resource) - cpu_children0  # + a writer process, reaped inside the fit
    fit_end = time.time()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if trainer.global_step != steps:
        raise RuntimeError(f"the fit ran {trainer.global_step} steps, expected {steps}")

    if config in ("sync", "async", "cv", "cv_thread", "cv_process"):
        run_id = logger.run_id
    elif config == "autolog":
        run = mlflow.last_active_run()
        run_id = run.info.run_id if run else None
    out: dict[str, Any] = {"wall_s": wall, "setup_s": setup, "cpu_s": cpu, "cpu_total_s": cpu_total, "fit_end": fit_end, "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib, "run_id": run_id}
    if config not in ("none", "null"):
        out["log_cpu_s"], out["log_points"] = log_cpu["s"], log_cpu["points"]
    if config.startswith("cv"):
        out["writer"] = logger.writer_choice
    from lightning_mlflow_cv._delivery.writer_choice import choose_writer, machine_from

    out["auto_writer"] = choose_writer(machine_from(trainer))[0]
    count_uri = spec.get("count_uri") or uri
    if config not in ("none", "null"):
        out.update(count_points(MlflowClient(count_uri), run_id, steps, epochs))
    left = getattr(logger, "last_spool_path", None) if config.startswith("cv") else None
    if left is not None and out.get("completeness", 1.0) < 1.0:
        # what the logger kept on disk, delivered the documented way (`lightning-mlflow-cv sync SPOOL`)
        from lightning_mlflow_cv import sync

        sync(left, tracking_uri=count_uri)
        out["after_sync"] = count_points(MlflowClient(count_uri), run_id, steps, epochs)["completeness"]
    return out


def _cpu_s(resource: Any) -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


def _cpu_children_s(resource: Any) -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # child processes that ended and were waited for
    return ru.ru_utime + ru.ru_stime


def expected_points(steps: int, epochs: int) -> int:
    return steps * len(STEP_KEYS) + epochs * len(EPOCH_KEYS)


def count_points(client: Any, run_id: str | None, steps: int, epochs: int) -> dict[str, Any]:
    """Metric points of the workload's keys found in the store (per key at most what was logged)."""
    expected = expected_points(steps, epochs)
    if not run_id:
        return {"expected": expected, "found": 0, "completeness": 0.0}
    found = 0
    for key in STEP_KEYS:
        found += min(len(client.get_metric_history(run_id, key)), steps)
    for key in EPOCH_KEYS:
        found += min(len(client.get_metric_history(run_id, key)), epochs)
    return {"expected": expected, "found": found, "completeness": found / expected}


# ================================================================================================
# parent: servers, scheduling, tables
# ================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A local ``mlflow server`` on 127.0.0.1 with a SQLite backend; stop()/start() keep the data and port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.backend_uri = f"sqlite:///{root / 'server.db'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait until ``/health`` answers; returns the seconds it took."""
        t0 = time.monotonic()
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(exe), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not start in {timeout}s: {self.log.read_text()[-3000:]}")

    def requests(self) -> tuple[int, int]:
        """(log-batch requests, all requests) answered so far, from the server's access log."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if '"POST /' in line or '"GET /' in line]
        except OSError:
            return (0, 0)
        return sum("/runs/log-batch " in line for line in lines), len(lines)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of process group ``pgid``, from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the name: state ppid pgrp ...
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(pgid: int, cap_s: float = 60.0, window_s: float = 2.0, threshold: float = 0.05) -> float:
    """Wait until process group ``pgid`` uses less than ``threshold`` of a core over ``window_s`` (a freshly
    started ``mlflow server`` burns CPU for a while after ``/health`` answers); returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < cap_s:
        c0 = group_cpu_s(pgid)
        time.sleep(window_s)
        if (group_cpu_s(pgid) - c0) / window_s < threshold:
            break
    return time.monotonic() - t0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def run_child(
    args: argparse.Namespace,
    work: Path,
    config: str,
    store: str,
    uri: str,
    steps: int,
    epochs: int,
    tag: str,
    outage: dict[str, Any] | None = None,
    cap_s: float | None = None,
    count_uri: str | None = None,
    threads: int | None | str = "args",
    server: MlflowServer | None = None,
) -> dict[str, Any]:
    """One configuration in a fresh process. ``outage``: {"server", "at_step", "seconds"}. ``count_uri``: where
    completeness is counted (default ``uri``)."""
    d = work / tag
    d.mkdir(parents=True)
    spec = {
        "config": config,
        "store": store,
        "tracking_uri": uri,
        "experiment": f"bench-{tag}-{uuid.uuid4().hex[:8]}",
        "steps": steps,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads if threads == "args" else threads,
        "spool_dir": str(d / "spool"),
        "out": str(d / "result.json"),
        "state": str(d / "state.json"),
        "marker": str(d / "outage.marker") if outage else None,
        "marker_step": outage["at_step"] if outage else None,
        "count_uri": count_uri,
    }
    (d / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["LIGHTNING_MLFLOW_CV_SPOOL_DIR"] = spec["spool_dir"]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(d / "spec.json")]
    cap_s = cap_s or args.cap_s
    t_start = time.monotonic()
    outage_info: dict[str, Any] = {}
    requests_before = server.requests() if server is not None else None
    with open(d / "child.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=d, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        capped = False
        while proc.poll() is None:
            if time.monotonic() - t_start > cap_s:
                capped = True
                _kill_group(proc)
                break
            if outage and not outage_info and Path(spec["marker"]).exists():
                server: MlflowServer = outage["server"]
                t_kill = time.monotonic()
                server.stop(signal.SIGKILL)
                time.sleep(outage["seconds"])
                server.start()
                outage_info = {"down_s": time.monotonic() - t_kill, "server_back": time.time()}
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    result_path = Path(spec["out"])
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"config": config, "store": store, "finished": False}
    result.update(outage_info)
    if requests_before is not None:
        time.sleep(0.2)  # the access log line follows the answer
        after = server.requests()  # type: ignore[union-attr]
        result["log_batch_requests"] = after[0] - requests_before[0]
        result["requests"] = after[1] - requests_before[1]
    if capped:
        result["finished"] = False
        result["error"] = f"still running after the {cap_s:.0f}s cap: killed"
        result["wall_s"] = None
        state = Path(spec["state"])
        run_id = json.loads(state.read_text()).get("run_id") if state.exists() else None
        if config != "none":
            try:
                from mlflow import MlflowClient

                result.update(count_points(MlflowClient(count_uri or uri), run_id, steps, epochs))
            except Exception as err:  # noqa: BLE001
                result["count_error"] = str(err)
    if not result.get("finished"):
        tail = (d / "child.log").read_text(errors="replace")[-2500:]
        print(f"  !! {tag}: {result.get('error')}\n{_indent(tail)}", file=sys.stderr)
    return result


def _indent(text: str) -> str:
    return "\n".join("     | " + line for line in text.splitlines())


def make_sqlite_template(work: Path) -> Path:
    """An MLflow SQLite database with the schema migrations already applied (copied for each run)."""
    template = work / "template.db"
    code = (
        "import sys; from mlflow import MlflowClient; "
        "MlflowClient(sys.argv[1]).search_experiments()"
    )
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{template}"], check=True, capture_output=True)
    return template


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def median_or_none(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _paired_ratio(runs: list[dict[str, Any]], floor_runs: list[dict[str, Any]]) -> float | None:
    """Median over rounds of (this configuration's fit / the floor's fit in the same round). Interleaving puts both
    in the same stretch of time, so a machine that turns slower part-way through an invocation (seen: the floor
    going from ~5.3 s to ~8.5 s for the last 5 of 12 rounds) moves both; the ratio of medians can then compare a
    fast-regime floor with a slow-regime run."""
    floor_by_round = {r.get("round"): r["wall_s"] for r in floor_runs if r.get("wall_s")}
    return median_or_none([r["wall_s"] / floor_by_round[r.get("round")] for r in runs if r.get("wall_s") and r.get("round") in floor_by_round])


def summarise(results: list[dict[str, Any]], stores: list[str], configs: list[str]) -> dict[str, dict[str, Any]]:
    """Medians per (torch-threads mode, store, configuration), ratios to the floor of the same mode and store."""
    out: dict[str, dict[str, Any]] = {}
    modes = list(dict.fromkeys(r.get("mode", "default") for r in results))
    for mode in modes:
        in_mode = [r for r in results if r.get("mode", "default") == mode]
        for store in stores:
            base = [r for r in in_mode if r["store"] == store and r["config"] == "none" and r.get("finished")]
            floor = median_or_none([r.get("wall_s") for r in base])
            floor_cpu = median_or_none([r.get("cpu_s") for r in base])
            floor_cpu_total = median_or_none([r.get("cpu_total_s") for r in base])
            for config in [*configs, "bare"]:
                rs = [r for r in in_mode if r["store"] == store and r["config"] == config]
                if not rs:
                    continue
                ok = [r for r in rs if r.get("finished")]
                wall = median_or_none([r.get("wall_s") for r in ok])
                cpu = median_or_none([r.get("cpu_s") for r in ok])
                comp = [r["completeness"] for r in rs if "completeness" in r]
                # training-thread CPU inside the logging call, per point (microseconds)
                per_point = median_or_none([1e6 * r["log_cpu_s"] / r["log_points"] for r in ok if r.get("log_points")])
                # store cost: extra CPU (training process + writer process) per 1,000 points over the floor
                extra = None
                if config == "bare":
                    extra = median_or_none([1000 * r["cpu_total_s"] / r["points"] for r in ok if r.get("points")])
                elif config != "none" and floor_cpu_total is not None:
                    extra = median_or_none(
                        [1000 * (r["cpu_total_s"] - floor_cpu_total) / r["found"] for r in ok if r.get("found") and "cpu_total_s" in r]
                    )
                out[f"{mode}/{store}/{config}"] = {
                    "mode": mode,
                    "store": store,
                    "config": config,
                    "n": len(rs),
                    "finished": len(ok),
                    "wall": wall,
                    "walls": [r.get("wall_s") for r in rs],
                    "ratio": wall / floor if wall is not None and floor and config != "bare" else None,
                    "paired": _paired_ratio(ok, base) if config != "bare" else None,
                    "cpu_ratio": cpu / floor_cpu if cpu is not None and floor_cpu and config != "bare" else None,
                    "setup": median_or_none([r.get("setup_s") for r in ok]),
                    "completeness": min(comp) if comp else None,
                    "rss": median_or_none([r.get("peak_rss_mib") for r in ok]),
                    "log_us_per_point": per_point,
                    "store_cost": extra,
                    "log_batch_requests": median_or_none([r.get("log_batch_requests") for r in ok]),
                    "requests": median_or_none([r.get("requests") for r in ok]),
                    "auto_writer": next((r["auto_writer"] for r in ok if r.get("auto_writer")), None),
                    "threads": next((r["threads"] for r in ok if r.get("threads")), None),
                }
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def overhead_table(summary: dict[str, dict[str, Any]], stores: list[str], configs: list[str], mode: str = "default") -> str:
    lines = [
        "| store | configuration | fit wall (s), median | ratio to floor | ratio to floor, paired per round (median) "
        "| CPU-time ratio | completeness (min) "
        "| log-batch requests per fit (all requests) | training-thread CPU per point in the logging call (us) "
        "| store cost: extra CPU s per 1,000 points | peak RSS (MiB) | setup (s) | runs: fit wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for store in stores:
        for config in [*configs, "bare"]:
            s = summary.get(f"{mode}/{store}/{config}")
            if s is None:
                continue
            comp = "n/a" if config in ("none", "bare") else _pct(s["completeness"])
            runs = ", ".join(fmt_s(w) for w in s["walls"])
            rss = "-" if s["rss"] is None else f"{s['rss']:.0f}"
            reqs = "-"
            if s["log_batch_requests"] is not None:
                reqs = _n(s["log_batch_requests"]) + (f" ({_n(s['requests'])})" if s["requests"] is not None else "")
            label = LABELS[config]
            if config == "cv_" + str(s.get("auto_writer")) or (config == "cv" and s.get("auto_writer")):
                label += f" = default (`writer=None` picks {s['auto_writer']} here)"
            us = "-" if s["log_us_per_point"] is None else f"{s['log_us_per_point']:.1f}"
            cost = "-" if s["store_cost"] is None else f"{s['store_cost']:.3f}"
            lines.append(
                f"| {store} | {label} | {fmt_s(s['wall'])} | {_x(s['ratio'])} | {_x(s['paired'])} | {_x(s['cpu_ratio'])} | {comp} "
                f"| {reqs} | {us} | {cost} | {rss} | {fmt_s(s['setup'])} | {runs} |"
            )
    return "\n".join(lines)


def outage_table(results: list[dict[str, Any]]) -> str:
    base = [r for r in results if r["config"] == "none" and r.get("finished")]
    floor = median_or_none([r.get("wall_s") for r in base])
    floor_cpu = median_or_none([r.get("cpu_s") for r in base])
    lines = [
        "| configuration | finished | fit wall (s) | ratio to floor | CPU-time ratio | completeness at fit end "
        "| server down (s) | server back before the fit ended |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for config in OUTAGE_CONFIGS:
        for r in [r for r in results if r["config"] == config]:
            wall, cpu = r.get("wall_s"), r.get("cpu_s")
            ratio = wall / floor if wall and floor else None
            cpu_ratio = cpu / floor_cpu if cpu and floor_cpu else None
            comp = "n/a" if config == "none" else _pct(r.get("completeness"))
            if r.get("after_sync") is not None:
                comp += f" ({_pct(r['after_sync'])} after `lightning-mlflow-cv sync`)"
            fin = "yes" if r.get("finished") else f"**no** ({str(r.get('error', '?'))[:80]})"
            down = fmt_s(r.get("down_s"))
            back = "-"
            if config != "none" and r.get("server_back") and r.get("fit_end"):
                back = "yes" if r["server_back"] < r["fit_end"] else "no"
            lines.append(
                f"| {LABELS[config]} | {fin} | {fmt_s(wall)} | {_x(ratio)} | {_x(cpu_ratio)} | {comp} | {down} | {back} |"
            )
    return "\n".join(lines)


def slow_table(results: list[dict[str, Any]], delay_s: float) -> str:
    floor = median_or_none([r.get("wall_s") for r in results if r["config"] == "none" and r.get("finished")])
    fast = median_or_none([r.get("wall_s") for r in results if r["config"] == "cv_nodelay" and r.get("finished")])
    lines = [
        "| configuration | finished | fit wall (s) | ratio to floor | what the delay added, in round trips "
        "| requests sent | completeness at fit end |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in SLOW_CONFIGS:
        for r in [r for r in results if r["config"] == config]:
            wall = r.get("wall_s")
            ratio = wall / floor if wall and floor else None
            trips = (wall - fast) / delay_s if wall and fast and config not in ("none", "cv_nodelay") else None
            fin = "yes" if r.get("finished") else f"**no** ({str(r.get('error', '?'))[:60]})"
            comp = "n/a" if config == "none" else _pct(r.get("completeness"))
            reqs = "-" if config == "none" else str(r.get("requests", "-"))
            lines.append(f"| {LABELS[config]} | {fin} | {fmt_s(wall)} | {_x(ratio)} | {_x(trips)} | {reqs} | {comp} |")
    return "\n".join(lines)


def _auto(summary: dict[str, dict[str, Any]], mode: str, store: str) -> dict[str, Any] | None:
    """The MLflowCVLogger row that ``writer=None`` picks in this mode (the default a user gets): ``cv`` itself when
    it ran, else the row of the writer the machine's choice names."""
    if summary.get(f"{mode}/{store}/cv"):
        return summary[f"{mode}/{store}/cv"]
    for config in ("cv_thread", "cv_process"):
        s = summary.get(f"{mode}/{store}/{config}")
        if s and s.get("auto_writer") and config == f"cv_{s['auto_writer']}":
            return s
    return summary.get(f"{mode}/{store}/cv")


def bar_verdicts(summary: dict[str, dict[str, Any]], outage: list[dict[str, Any]], stores: list[str], modes: list[str]) -> list[str]:
    """The targets of issue 17, judged on MLflowCVLogger's default writer for each configuration."""
    out = []
    saturated = "default" if "default" in modes else None
    spare = next((m for m in modes if m == "1"), None)
    for store in stores:
        if saturated is None:
            break
        cv = _auto(summary, saturated, store)
        peers = [summary.get(f"{saturated}/{store}/{c}") for c in ("autolog", "sync")]
        peers = [p for p in peers if p and p["ratio"] is not None]
        if cv and cv["ratio"] is not None and peers:
            ok = all(cv["ratio"] <= p["ratio"] for p in peers) and cv["completeness"] == 1.0
            vs = ", ".join(f"{LABELS[p['config']]} {p['ratio']:.2f} (paired {_x(p['paired'])})" for p in peers)
            out.append(
                f"- {'PASS' if ok else 'FAIL'}: saturated CPU, {store}: MLflowCVLogger ({cv['config']}) ratio {cv['ratio']:.2f} "
                f"(paired {_x(cv['paired'])}) "
                f"<= every peer ({vs}), completeness {_pct(cv['completeness'])} (target 100%)"
            )
    if outage:
        floor = median_or_none([r.get("wall_s") for r in outage if r["config"] == "none"])
        ratios = {r["config"]: (r["wall_s"] / floor if r.get("wall_s") and floor else None) for r in outage}
        cv = next((r for r in outage if r["config"] == "cv"), None)
        peers = {c: v for c, v in ratios.items() if c in ("sync", "autolog") and v is not None}
        if cv is not None:
            mine = ratios.get("cv")
            ok = bool(cv.get("finished")) and cv.get("completeness") == 1.0 and mine is not None and all(mine <= v for v in peers.values())
            vs = ", ".join(f"{LABELS[c]} {v:.2f}" for c, v in peers.items()) or "no peer finished"
            out.append(
                f"- {'PASS' if ok else 'FAIL'}: outage: MLflowCVLogger ratio {fmt_s(mine)} <= every peer ({vs}), "
                f"finished={bool(cv.get('finished'))}, completeness {_pct(cv.get('completeness'))}"
            )
    for store in stores:
        if spare is None:
            break
        cv = _auto(summary, spare, store)
        if cv and cv["ratio"] is not None:
            ok = cv["ratio"] <= 1.03 and cv["completeness"] == 1.0
            out.append(
                f"- {'PASS' if ok else 'FAIL'}: a spare core (torch on 1 thread), {store}: MLflowCVLogger ({cv['config']}) "
                f"ratio {cv['ratio']:.3f} (target <= 1.03; paired per round {_x(cv['paired'])}), "
                f"completeness {_pct(cv['completeness'])} (target 100%)"
            )
    if saturated is not None:
        cv, sync = _auto(summary, saturated, "http"), summary.get(f"{saturated}/http/sync")
        if cv and sync and cv["log_us_per_point"] and sync["log_us_per_point"]:
            factor = sync["log_us_per_point"] / cv["log_us_per_point"]
            out.append(
                f"- {'PASS' if factor >= 100 else 'FAIL'}: training-thread CPU per point in log_metrics over HTTP: "
                f"MLflowCVLogger {cv['log_us_per_point']:.1f} us, synchronous MLFlowLogger {sync['log_us_per_point']:.1f} us: "
                f"{factor:.0f}x lower (target >= 100x)"
            )
    for mode in modes:
        cv, bare = _auto(summary, mode, "sqlite"), summary.get(f"{mode}/sqlite/bare")
        if cv and bare and cv["store_cost"] is not None and bare["store_cost"]:
            factor = cv["store_cost"] / bare["store_cost"]
            where = "saturated CPU" if mode == "default" else f"torch on {mode} thread(s)"
            out.append(
                f"- {'PASS' if factor <= 1.1 else 'FAIL'}: store cost on SQLite ({where}): MLflowCVLogger ({cv['config']}) "
                f"{cv['store_cost']:.3f} CPU s per 1,000 points, bare log_batch {bare['store_cost']:.3f}: {factor:.2f}x "
                f"(target <= 1.1x)"
            )
    return out


def machine_info(args: argparse.Namespace) -> list[str]:
    import importlib.metadata as md

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    load = "?"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    vers = []
    for dist in ("torch", "lightning", "mlflow", "lightning-mlflow-cv"):
        try:
            vers.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            vers.append(f"{dist} ?")
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = f", GPU: {torch.cuda.get_device_name(0)}"
    return [
        f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu}, {ram} RAM{gpu}; load average at the start {load}",
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}; " + ", ".join(vers),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke version (< 2 min on a quiet 2-core machine): 100 steps, "
                   "1 round, a 3 s outage in a 400-step fit for the floor and MLflowCVLogger only; it checks that "
                   "everything runs, its figures are not the benchmark")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="training steps per fit (default 1000; --quick 100)")
    p.add_argument("--epochs", type=int, default=None, help="epochs the steps are split into (default 4; --quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each fit, one configuration only "
                   "(default: both --thread-modes)")  # fmt: skip
    p.add_argument("--thread-modes", default="default,1", help="comma-separated torch thread settings run in the same "
                   "invocation, interleaved: 'default' (torch's default: training saturates the CPU) and 1 (a spare "
                   "core, as on a GPU node)")  # fmt: skip
    p.add_argument("--stores", default="sqlite,http", help="comma-separated: sqlite,http")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--spare-configs", default=",".join(DEFAULT_SPARE_CONFIGS), help="configurations run with torch on "
                   "1 thread (the spare-core mode)")  # fmt: skip
    p.add_argument("--no-bare", action="store_true", help="skip the bare MlflowClient.log_batch store-cost runs (SQLite)")
    p.add_argument("--slow-baselines", action="store_true", help="also run the synchronous baselines in the slow-server "
                   "scenario (each capped at 2x the floor + 30 s; they do not finish)")  # fmt: skip
    p.add_argument("--no-outage", action="store_true", help="skip the outage scenario")
    p.add_argument("--outage-steps", type=int, default=None, help="steps of the outage fits (default: at least 2000, raised so that the server is "
                   "back by ~70%% of the floor fit, from the measured ms/step and server start-up; --quick: 400)")
    p.add_argument("--outage-s", type=float, default=None, help="seconds the server stays down (default 10; --quick 3)")
    p.add_argument("--outage-at", type=float, default=0.2, help="fraction of the outage fit at which the server is killed")
    p.add_argument("--no-slow", action="store_true", help="skip the slow-server scenario")
    p.add_argument("--slow-delay-s", type=float, default=2.0, help="seconds the proxy holds each request in the slow-server scenario")
    p.add_argument("--cap-s", type=float, default=240.0, help="kill a child (reported as not finished) after this long; "
                   "outage runs get at least 8x the outage floor's fit time + 2x --outage-s")  # fmt: skip
    p.add_argument("--readme", default=None, help="write the results into this Markdown file (default: benchmarks/README.md, "
                   "except with --quick)")  # fmt: skip
    p.add_argument("--no-readme", action="store_true", help="print only")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child)

    q = args.quick
    args.steps = args.steps or (100 if q else 1000)
    args.epochs = args.epochs or (2 if q else 4)
    args.rounds = args.rounds or (1 if q else 3)
    outage_auto = args.outage_steps is None
    args.outage_steps = args.outage_steps or (400 if q else 2000)
    args.outage_s = args.outage_s if args.outage_s is not None else (3.0 if q else 10.0)
    if args.steps % args.epochs or args.outage_steps % args.epochs:
        p.error(f"--steps ({args.steps}) and --outage-steps ({args.outage_steps}) must be multiples of --epochs ({args.epochs})")
    stores = [s for s in args.stores.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    spare_configs = [c for c in args.spare_configs.split(",") if c]
    bad = [s for s in stores if s not in ("sqlite", "http")] + [c for c in configs + spare_configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown store/config {bad}; stores: sqlite,http; configs: {','.join(CONFIGS)}")
    for cs in (configs, spare_configs):
        if "none" not in cs:
            cs.insert(0, "none")
    if args.threads:
        modes = [str(args.threads)]
    else:
        modes = [m.strip() for m in args.thread_modes.split(",") if m.strip()]
        if any(m != "default" and not m.isdigit() for m in modes):
            p.error(f"--thread-modes: 'default' or a number of threads, got {args.thread_modes!r}")
    mode_configs = {m: (configs if m == "default" or len(modes) == 1 else spare_configs) for m in modes}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA GPU is visible to torch")
    readme = None if args.no_readme else Path(args.readme) if args.readme else (None if q else HERE / "README.md")
    command = "python benchmarks/logging_overhead.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    info = machine_info(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print("\n".join(info), flush=True)
    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lmc-bench-"))
    results: list[dict[str, Any]] = []
    outage_results: list[dict[str, Any]] = []
    slow_results: list[dict[str, Any]] = []
    outage_cap = args.cap_s
    server: MlflowServer | None = None
    startups: list[float] = []
    try:
        template = make_sqlite_template(work) if "sqlite" in stores else None
        if "http" in stores:
            (work / "server").mkdir()
            server = MlflowServer(work / "server")
            startups.append(server.start())
            print(f"mlflow server up in {startups[-1]:.1f}s at {server.uri}", flush=True)
        for rnd in range(args.rounds):
            for mode in modes:
                threads = None if mode == "default" else int(mode)
                for store in stores:
                    bare = ["bare"] if store == "sqlite" and not args.no_bare else []
                    for config in mode_configs[mode] + bare:
                        tag = f"r{rnd}-t{mode}-{store}-{config}"
                        if store == "sqlite":
                            db = work / f"{tag}.db"
                            shutil.copy(template, db)  # type: ignore[arg-type]
                            uri = f"sqlite:///{db}"
                        else:
                            uri = server.uri  # type: ignore[union-attr]
                        srv = server if store == "http" else None
                        r = run_child(args, work, config, store, uri, args.steps, args.epochs, tag, threads=threads, server=srv)
                        r["round"], r["mode"], r["store"] = rnd, mode, store
                        results.append(r)
                        comp = f" completeness {100 * r['completeness']:.1f}%" if "completeness" in r else ""
                        reqs = f" log-batch requests {r['log_batch_requests']}" if "log_batch_requests" in r else ""
                        print(f"[{time.monotonic() - t_all:6.0f}s] {tag:<34} wall {fmt_s(r.get('wall_s'))}s{comp}{reqs}", flush=True)
        if server is not None:
            server.stop()
            server = None
        if not args.no_outage and "http" in stores:
            (work / "outage-server").mkdir()
            server = MlflowServer(work / "outage-server")
            startups.append(server.start())
            floors = [r["wall_s"] / args.steps for r in results if r["config"] == "none" and r.get("wall_s") and r["mode"] == modes[0]]
            if outage_auto and floors and not q:
                # long enough that the server (down outage_s + its start-up time) is back by ~70% of the fit
                need_s = (args.outage_s + 1.5 * max(startups)) / max(0.7 - args.outage_at, 0.1)
                need = int(need_s / statistics.median(floors)) + 1
                need += -need % args.epochs
                if need > args.outage_steps:
                    args.outage_steps = min(need, 50 * args.steps)
                print(
                    f"outage fits: {args.outage_steps} steps (floor {statistics.median(floors) * 1000:.1f} ms/step, "
                    f"server start-up up to {max(startups):.1f}s)",
                    flush=True,
                )
            outage_cap = args.cap_s
            at_step = max(1, int(args.outage_steps * args.outage_at))
            has_cv = any(c.startswith("cv") for c in configs)
            for config in [c for c in OUTAGE_CONFIGS if (c in configs or (c == "cv" and has_cv)) and (not q or c in ("none", "cv"))]:
                tag = f"outage-{config}"
                # the floor goes through the same kill and restart: the server's start-up loads the machine too
                outage = {"server": server, "at_step": at_step, "seconds": args.outage_s}
                threads = None if modes[0] == "default" else int(modes[0])
                r = run_child(args, work, config, "http", server.uri, args.outage_steps, args.epochs, tag, outage, outage_cap, threads=threads)
                outage_results.append(r)
                if config == "none" and r.get("wall_s"):
                    # a cap is for hangs: the slowest baseline (sync, ~5x the floor) plus the outage must fit in it
                    outage_cap = max(args.cap_s, 8 * r["wall_s"] + 2 * args.outage_s)
                comp = f" completeness {100 * r['completeness']:.1f}%" if "completeness" in r else ""
                down = f" server down {r['down_s']:.1f}s" if "down_s" in r else ""
                print(f"[{time.monotonic() - t_all:6.0f}s] {tag:<22} wall {fmt_s(r.get('wall_s'))}s{comp}{down}", flush=True)
        if server is not None:
            server.stop()
            server = None
        if not args.no_slow and "http" in stores:
            slow_results = run_slow(args, work, ["none", "cv"] + (["sync", "autolog"] if args.slow_baselines else []), startups, t_all)
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarise(results, stores, list(dict.fromkeys(configs + spare_configs)))
    if readme is not None:  # the raw per-fit figures beside the tables, to re-read them without re-running
        readme.with_name(readme.stem + "_raw.json").write_text(json.dumps({"command": command, "results": results, "outage": outage_results, "slow": slow_results}))
    total = time.monotonic() - t_all
    notes = []
    if q:
        notes.append("**--quick smoke run: it shows that the script works; its figures are not the benchmark.**")
    if load > 0.5 * (os.cpu_count() or 1):
        notes.append(
            f"**The machine was busy (1-min load average {load:.1f} on {os.cpu_count()} CPUs at the start): "
            "wall-time ratios are not reliable; rerun on a quiet machine.**"
        )
    md = [
        *[n + "\n" for n in notes],
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total / 60:.1f} min in all)",
        "",
        *info,
        f"- Workload: {args.steps} steps ({args.epochs} epochs x {args.steps // args.epochs}), batch {args.batch_size}, "
        f"device {args.device}, {len(STEP_KEYS)} step metrics + {len(EPOCH_KEYS)} epoch metrics "
        f"= {expected_points(args.steps, args.epochs)} points per fit; {args.rounds} interleaved round(s) of every "
        "configuration below (both torch-thread settings), medians; ratios to the floor of the same setting and store",
    ]
    for mode in modes:
        in_mode = [r for r in results if r.get("mode") == mode]
        if mode == "default":
            title = f"### Saturated CPU: torch threads {_threads(args, in_mode)} (training keeps every core busy)"
        else:
            title = f"### A spare core: torch on {mode} thread(s) of {os.cpu_count()} CPUs (as on a GPU node, where the CPU mostly waits)"
        md += ["", title, "", overhead_table(summary, stores, mode_configs[mode], mode)]
    md += [
        "",
        "*log-batch requests per fit*: counted in the local server's access log (HTTP only), with all requests in "
        "brackets (run creation, params, status, ...). *Training-thread CPU per point*: `time.thread_time()` around "
        "each `log_metrics` call of the logger (for autolog: around its `BatchMetricsLogger.record_metrics`, which "
        "also sends its batches inline), divided by the points passed. *Store cost*: (CPU time of the training "
        "process and any writer process during the fit - the floor's) / points stored x 1,000; the bare row is "
        "`MlflowClient.log_batch` of the same points in 1,000-point batches into a fresh SQLite copy, in the same "
        "round. With torch on every core the floor's CPU time includes torch's threads spinning, so the extra CPU "
        "there is only indicative; the spare-core figure is the one to read.",
    ]
    if outage_results:
        md += [
            "",
            f"### Outage: server killed at step {max(1, int(args.outage_steps * args.outage_at))} of {args.outage_steps}, "
            f"restarted after {args.outage_s:.0f}s (+ its start-up time), cap {outage_cap:.0f}s per run, 1 run each",
            "",
            outage_table(outage_results),
        ]
    if slow_results:
        md += [
            "",
            f"### Slow server: every request held {args.slow_delay_s:.0f}s by a proxy, {args.outage_steps} steps, 1 run each",
            "",
            slow_table(slow_results, args.slow_delay_s),
            "",
            "*What the delay added*: (fit wall - fit wall of MLflowCVLogger through the proxy without the delay) / "
            "the delay. *Requests sent*: requests that reached the proxy during the child's whole life (run creation, "
            "logging, the final drain and status).",
        ]
    md += ["", "### The targets (issue 17)", "", *bar_verdicts(summary, outage_results, stores, modes)]
    text = "\n".join(md)
    print("\n" + text)
    if readme is not None:
        write_readme(readme, text)
        print(f"\nwritten to {readme}")
    return 0


def run_slow(args: argparse.Namespace, work: Path, configs: list[str], startups: list[float], t_all: float) -> list[dict[str, Any]]:
    """The slow-server scenario: a fresh server behind a proxy that holds every request ``--slow-delay-s``."""
    sys.path.insert(0, str(REPO / "tests"))
    from faults import FaultProxy

    (work / "slow-server").mkdir()
    server = MlflowServer(work / "slow-server")
    startups.append(server.start())
    results: list[dict[str, Any]] = []
    try:
        with FaultProxy(server.uri) as proxy:
            proxy.mode, proxy.delay_s = "slow", args.slow_delay_s
            cap = args.cap_s
            wanted = [c for c in configs if not args.quick or c in ("none", "cv")]
            if "cv" in wanted:
                wanted.append("cv_nodelay")
            for config in [c for c in SLOW_CONFIGS if c in wanted]:
                before = len(proxy.log)
                # cv_nodelay: the same logger through the same proxy with no delay, the baseline for what latency adds
                proxy.mode = "ok" if config == "cv_nodelay" else "slow"
                child_config = "cv" if config == "cv_nodelay" else config
                r = run_child(args, work, child_config, "http", proxy.uri, args.outage_steps, args.epochs, f"slow-{config}", None, cap, server.uri)
                r["config"] = config
                r["requests"] = len(proxy.log) - before
                results.append(r)
                if config == "none" and r.get("wall_s"):
                    cap = max(60.0, 2 * r["wall_s"] + 30)
                comp = f" completeness {100 * r['completeness']:.1f}%" if "completeness" in r else ""
                print(f"[{time.monotonic() - t_all:6.0f}s] slow-{config:<17} wall {fmt_s(r.get('wall_s'))}s{comp} requests {r['requests']}", flush=True)
    finally:
        server.stop()
    return results


def _threads(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    seen = sorted({r["threads"] for r in results if r.get("threads")})
    return f"{args.threads} (--threads)" if args.threads else f"{'/'.join(map(str, seen)) or '?'} (torch default)"


def write_readme(path: Path, text: str) -> None:
    block = f"{README_BEGIN}\n{text}\n{README_END}"
    if path.exists():
        old = path.read_text()
        if README_BEGIN in old and README_END in old:
            head, rest = old.split(README_BEGIN, 1)
            tail = rest.split(README_END, 1)[1]
            path.write_text(head + block + tail)
            return
        heading = "" if old.rstrip().endswith("## Results") else "\n\n## Results"
        path.write_text(old.rstrip() + heading + "\n\n" + block + "\n")
        return
    path.write_text("# Benchmarks\n\n## Results\n\n" + block + "\n")


if __name__ == "__main__":
    sys.exit(main())
