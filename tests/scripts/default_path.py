"""Scenarios of the default GPU-node path (the forked writer process), each run in its own process by
tests/reliability/test_default_path.py. Prints one JSON object per line; the test reads them.

    default_path.py fork-hazard URI FITS WRITER      fits beside a thread hammering the same store
    default_path.py stopped URI POINTS WRITER RESUME_S [finalize|exit]
                                                     the writer child SIGSTOPped while POINTS points are logged
    default_path.py kill URI WRITER pause|stream      logs until the test SIGKILLs it
    default_path.py fit URI STEPS                     a Trainer fit the test signals (SIGTERM)
    default_path.py overload URI POINTS               waits for a line on stdin, logs, finalizes
    default_path.py backlog URI POINTS WRITER TIMEOUT [lock]
                                                     logs a backlog at once, then finalizes (optionally with the
                                                     SQLite store write-locked by another connection meanwhile)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny)

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def fork_hazard(uri: str, fits: int, writer: str) -> None:
    """A user's thread making ordinary MlflowClient calls on the same store while fits start their writers."""
    import lightning.pytorch as pl
    import torch
    from mlflow import MlflowClient
    from tiny import TinyModel, history_counts, trainer
    from torch.utils.data import DataLoader, TensorDataset

    client = MlflowClient(uri)
    exp = client.create_experiment("hammer")
    other = client.create_run(exp).info.run_id
    stop = threading.Event()

    def hammer() -> None:
        i = 0
        while not stop.is_set():
            MlflowClient(uri).search_runs([exp], max_results=5)
            client.log_metric(other, "hammer", float(i), step=i)
            i += 1

    threading.Thread(target=hammer, daemon=True).start()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 4, generator=g)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)  # 300 steps
    for i in range(fits):
        pl.seed_everything(0)
        logger = MLflowCVLogger(tracking_uri=uri, experiment_name="fits", writer=writer)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(logger, max_epochs=1, limit_val_batches=0).fit(TinyModel(), data)
        took = time.perf_counter() - t0
        run = client.get_run(logger.run_id)
        counts = history_counts(client, logger.run_id)
        out(
            fit=i,
            seconds=took,
            status=run.info.status,
            points=sum(v for k, v in counts.items() if k.startswith("train/")),
            warnings=[str(w.message) for w in caught if "writer process" in str(w.message)],
        )
    stop.set()


def stopped(uri: str, points: int, writer: str, resume_s: float, end: str) -> None:
    """SIGSTOP the writer child, log ``points`` points as fast as possible (8 a call), timing every call."""
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="stopped", writer=writer)
    logger.log_hyperparams({"lr": 0.1})  # starts the run and its writer
    pid = logger._writer._proc.pid
    time.sleep(0.5)  # the child said ready
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(resume_s, lambda: _signal(pid, signal.SIGCONT))
    resume.daemon = True
    resume.start()
    keys = [f"m{k}" for k in range(8)]
    worst = 0.0
    t_prev = time.perf_counter()
    t0 = t_prev
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(points // 8):
            logger.log_metrics(dict.fromkeys(keys, float(step)), step=step)
            now = time.perf_counter()
            worst = max(worst, now - t_prev)
            t_prev = now
        logged_s = time.perf_counter() - t0
        if end == "exit":
            out(max_gap_s=worst, logged_s=logged_s, points=points)
            _signal(pid, signal.SIGKILL)  # still stopped (it would hold our stdout open) or already replaced
            os._exit(0)
        logger.finalize("success")
    out(
        max_gap_s=worst,
        logged_s=logged_s,
        points=points,
        run_id=logger.run_id,
        spool_left=logger.last_spool_path is not None,
        warnings=[str(w.message) for w in caught if "writer process" in str(w.message)],
    )


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill(uri: str, writer: str, mode: str) -> None:
    """Log points whose value is the wall time they were logged at; the test SIGKILLs this process."""
    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="kill", writer=writer)
    logger.log_hyperparams({"lr": 0.1})
    w = logger._writer
    out(run_id=logger.run_id, spool=str(logger.spool_path), child=getattr(getattr(w, "_proc", None), "pid", None))
    step = 0
    if mode == "pause":
        for step in range(5):
            logger.log_metrics({"t": time.time()}, step=step)
        out(paused=time.time())
        time.sleep(600)
    while True:
        logger.log_metrics({"t": time.time()}, step=step)
        step += 1
        time.sleep(0.002)


def fit(uri: str, steps: int) -> None:
    """A fit with the default writer choice forced to the process, slow enough to be signalled mid-way."""
    import torch
    from tiny import TinyModel, trainer
    from torch.utils.data import DataLoader, TensorDataset

    class Slow(TinyModel):
        def training_step(self, batch, batch_idx):
            if batch_idx == 20:
                out(started=True)
            time.sleep(0.01)
            return super().training_step(batch, batch_idx)

    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="sigterm", writer="process")
    x = torch.randn(steps * 4, 4)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)
    out(run_id=logger.run_id, spool=str(logger.spool_path), child=logger._writer._proc.pid)
    try:
        trainer(logger, max_epochs=1, limit_val_batches=0).fit(Slow(), data)
    finally:
        out(finished=True, spool_left=str(logger.last_spool_path) if logger.last_spool_path else None)


def overload(uri: str, points: int) -> None:
    """Start a run, wait for the go, log ``points`` points in one request's worth, and finalize."""
    logger = MLflowCVLogger(
        tracking_uri=uri, experiment_name="overload", request_timeout_s=120.0, finalize_timeout_s=300.0
    )
    logger.log_hyperparams({"lr": 0.1})
    logger.flush(60)
    out(run_id=logger.run_id, spool_dir=str(logger.spool_path.parent))
    sys.stdin.readline()
    for step in range(points):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.finalize("success")
    out(done=True, spool_left=str(logger.last_spool_path) if logger.last_spool_path else None)


def backlog(uri: str, points: int, writer: str, timeout: float, lock: bool) -> None:
    """Log ``points`` points at once (8 a call) and finalize with ``finalize_timeout_s=timeout``; counts the forks."""
    import sqlite3

    forks: list[int] = []
    fork = os.fork

    def counting_fork() -> int:
        forks.append(1)
        return fork()

    os.fork = counting_fork

    logger = MLflowCVLogger(tracking_uri=uri, experiment_name="backlog", writer=writer, finalize_timeout_s=timeout)
    logger.log_hyperparams({"lr": 0.1})
    logger.flush(60)
    keys = [f"m{k}" for k in range(8)]
    for step in range(points // 8):
        logger.log_metrics(dict.fromkeys(keys, float(step)), step=step)
    holder = None
    if lock:  # a reachable store that takes nothing: another connection holds its write lock
        holder = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.finalize("success")
    took = time.perf_counter() - t0
    if holder is not None:
        holder.execute("ROLLBACK")
        holder.close()
    out(
        finalize_s=took,
        run_id=logger.run_id,
        spool_left=str(logger.last_spool_path) if logger.last_spool_path else None,
        warnings=[str(w.message) for w in caught if "not delivered" in str(w.message)],
        forks=len(forks),
    )


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "fork-hazard":
        fork_hazard(args[0], int(args[1]), args[2])
    elif mode == "stopped":
        stopped(args[0], int(args[1]), args[2], float(args[3]), args[4])
    elif mode == "kill":
        kill(args[0], args[1], args[2])
    elif mode == "fit":
        fit(args[0], int(args[1]))
    elif mode == "backlog":
        backlog(args[0], int(args[1]), args[2], float(args[3]), args[4:] == ["lock"])
    elif mode == "overload":
        overload(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
