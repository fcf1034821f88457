"""What storing metric points costs in CPU, without a training loop beside it.

``logging_overhead.py`` measures the store cost inside a fit, where torch's threads make the floor's CPU time
move by seconds from one run to the next. This script stores the same points (8 metrics per step, one
``log_metrics`` call per step) into a fresh copy of a pre-migrated SQLite store, one fresh Python process per
measurement, and reports the CPU seconds (the process and any writer process it started, from the first point
to the last one stored) per 1,000 points:

- ``bare``: ``MlflowClient.log_batch`` in 1,000-point batches (the store's own cost; building the entities
  included);
- ``autolog``: MLflow autolog's ``BatchMetricsLogger.record_metrics`` then ``flush`` (what
  ``mlflow.pytorch.autolog`` calls every step);
- ``cv_thread`` / ``cv_process``: ``MLflowCVLogger(writer=...)``, then ``finalize`` (``cv_process`` includes
  forking the writer process from the measuring process, as the logger does on Linux).

Usage: ``python benchmarks/store_cpu.py [--rounds 3] [--steps 1000,5000] [--readme benchmarks/README_store_cpu.md]``
(about 3 minutes on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
# the fit benchmark's CPU clocks and pre-migrated store (its module imports only the standard library)
from logging_overhead import _cpu_children_s, _cpu_s, make_sqlite_template  # noqa: E402

CONFIGS = ["bare", "autolog", "cv_thread", "cv_process"]
KEYS = [f"train/m{i}" for i in range(8)]


def _cpu_total_s() -> float:
    """CPU of this process and of the child processes it waited for (the writer process)."""
    import resource

    return _cpu_s(resource) + _cpu_children_s(resource)


def child(config: str, uri: str, steps: int, spool: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    exp = client.create_experiment("store-cpu")
    writer = None
    if config in ("bare", "autolog"):
        run_id = client.create_run(exp).info.run_id
        cpu0 = _cpu_total_s()
        if config == "bare":
            now = int(time.time() * 1000)
            points = [Metric(k, float(s), now + s, s) for s in range(steps) for k in KEYS]
            for i in range(0, len(points), 1000):
                client.log_batch(run_id, metrics=points[i : i + 1000])
        else:
            from mlflow.utils.autologging_utils import BatchMetricsLogger

            batch = BatchMetricsLogger(run_id, tracking_uri=uri)
            for s in range(steps):
                batch.record_metrics({k: float(s) for k in KEYS}, s)
            batch.flush()
        cpu = _cpu_total_s() - cpu0
    else:
        from lightning_mlflow_cv import MLflowCVLogger

        mode = {"cv_thread": "thread", "cv_process": "process"}[config]
        logger = MLflowCVLogger(experiment_name="store-cpu", tracking_uri=uri, spool_dir=spool, writer=mode)
        _ = logger.run_id  # the run exists before the timed part, as for bare and autolog
        cpu0 = _cpu_total_s()
        for s in range(steps):
            logger.log_metrics({k: float(s) for k in KEYS}, step=s)
        logger.finalize("success")
        cpu = _cpu_total_s() - cpu0
        run_id, writer = logger.run_id, logger.writer_choice
    stored = sum(len(client.get_metric_history(run_id, k)) for k in KEYS)
    return {"config": config, "steps": steps, "cpu_s": cpu, "stored": stored, "writer": writer}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", default="1000,5000", help="comma-separated fit lengths in steps (8 points each)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--readme", default=str(HERE / "README_store_cpu.md"))
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        config, uri, steps, spool = args._child
        print(json.dumps(child(config, uri, int(steps), spool)))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    lengths = [int(s) for s in args.steps.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="lmc-store-cpu-"))
    results: list[dict[str, Any]] = []
    try:
        template = make_sqlite_template(work)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for rnd in range(args.rounds):
            for steps in lengths:
                for config in configs:
                    tag = f"r{rnd}-{steps}-{config}"
                    db = work / f"{tag}.db"
                    shutil.copy(template, db)
                    cmd = [sys.executable, __file__, "--_child", config, f"sqlite:///{db}", str(steps), str(work / tag)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        print(out.stderr[-2000:], file=sys.stderr)
                        raise SystemExit(f"{tag} failed")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    results.append(r)
                    print(f"{tag:28s} {1000 * r['cpu_s'] / (8 * steps):.3f} CPU s per 1,000 points", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "| points per fit | configuration | CPU s per 1,000 points, median | ratio to bare | points stored | "
        "writer | runs (CPU s per 1,000 points) |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for steps in lengths:
        per = {
            c: [1000 * r["cpu_s"] / (8 * steps) for r in results if r["config"] == c and r["steps"] == steps]
            for c in configs
        }
        bare = statistics.median(per["bare"]) if per.get("bare") else None
        for c in configs:
            if not per[c]:
                continue
            med = statistics.median(per[c])
            ratio = f"{med / bare:.2f}x" if bare else "-"
            stored = min(r["stored"] for r in results if r["config"] == c and r["steps"] == steps)
            writer = next((r["writer"] for r in results if r["config"] == c and r["writer"]), None) or "-"
            writer = writer.split(":")[0]
            runs = ", ".join(f"{v:.3f}" for v in per[c])
            lines.append(f"| {8 * steps:,} | {c} | {med:.3f} | {ratio} | {stored:,} | {writer} | {runs} |")
    import platform

    import mlflow

    text = "\n".join(
        [
            "# Store CPU without a training loop (`benchmarks/store_cpu.py`)",
            "",
            f"Command: `python benchmarks/store_cpu.py --rounds {args.rounds} --steps {args.steps}` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, mlflow {mlflow.__version__}. Medians of {args.rounds} interleaved rounds, "
            "one fresh process per measurement, a fresh copy of a pre-migrated SQLite store each.",
            "",
            *lines,
            "",
        ]
    )
    Path(args.readme).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
