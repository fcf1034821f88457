"""What starting the writer process costs: forked from the training process (Linux) or a fresh interpreter.

Each measurement is a fresh Python process that imports torch (as a training process has), creates a run in a
fresh SQLite store, spools ``--points`` metric points for it, starts a ``ProcessWriter`` and waits for its first
``flush``. The child's CPU time comes from ``/proc/<pid>/stat``, its private memory (pages only it holds: what it
allocated and the shared pages it or the parent rewrote) from ``/proc/<pid>/smaps_rollup``. Rounds interleave
the configurations; the table gives medians.

Usage: ``python benchmarks/writer_start.py [--rounds 3] [--points 0,8000] [--readme benchmarks/README_writer_start.md]``
(under a minute on the 2-core development machine; Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(start: str, points: int) -> dict[str, float]:
    import torch  # noqa: F401 - the parent's memory is a training process's
    from mlflow import MlflowClient

    from lightning_mlflow_cv._delivery import writer_proc as _writer_proc
    from lightning_mlflow_cv._delivery.journal import Spool
    from lightning_mlflow_cv._delivery.writer_proc import ProcessWriter

    _writer_proc.FORK = start == "fork"
    work = Path(tempfile.mkdtemp(prefix="lmc-writer-start-"))
    uri = f"sqlite:///{work / 'store.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("writer-start")).info.run_id
    spool = Spool(work / "spool", "k")
    spool.append({"t": "run", "tracking_uri": uri, "run_id": run_id, "tags": {}})
    ts = int(time.time() * 1000)
    spool.append(*({"t": "m", "s": i // 8, "ts": ts + i, "d": {f"m{i % 8}": float(i)}} for i in range(points)))
    writer = ProcessWriter(spool, run_id, uri, flush_interval_s=0.2, request_timeout_s=30.0)
    t0 = time.perf_counter()
    writer.start()
    if not writer.flush(120.0):
        raise RuntimeError("the writer did not flush")
    wall = time.perf_counter() - t0
    assert writer._proc is not None
    pid = writer._proc.pid
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kb = {k: int(v.split()[0]) for k, v in rollup.items()}
    writer.stop(60.0)
    spool.close()
    stored = sum(len(client.get_metric_history(run_id, f"m{k}")) for k in range(8))
    return {
        "cpu_s": cpu, "wall_s": wall, "private_mb": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024,
        "rss_mb": kb["Rss"] / 1024, "stored": stored,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", default="0,8000", help="comma-separated points spooled before the writer starts")
    ap.add_argument("--readme", default=str(REPO / "benchmarks" / "README_writer_start.md"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_child(args._child[0], int(args._child[1]))))
        return
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("writer_start.py reads /proc/<pid>/smaps_rollup: Linux only")
    counts = [int(p) for p in args.points.split(",")]
    configs = [(start, n) for n in counts for start in ("fork", "fresh interpreter")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for start, n in configs:
            out = subprocess.run(
                [sys.executable, __file__, "--_child", start.split()[0], str(n)],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if res["stored"] != n:
                raise RuntimeError(f"{start}, {n} points: {res['stored']} stored")
            results[(start, n)].append(res)
            print(
                f"round {r} {start:>17} {n:>6} points: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True
            )
    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in results.items()}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Starting the writer process (`benchmarks/writer_start.py`)",
        "",
        f"Command: `python benchmarks/writer_start.py --rounds {args.rounds} --points {args.points}` ({when}); "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}. Medians of {args.rounds} interleaved rounds, one "
        "fresh process per measurement (torch imported, a run created in a fresh SQLite store), figures of the "
        "writer child until its first flush returned.",
        "",
        "| writer start | points spooled | child CPU s | wall to first flush (s) | child private memory (MB) "
        "| child RSS, shared pages included (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for start, n in configs:
        m = med[(start, n)]
        lines.append(
            f"| {start} | {n:,} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} | {m['private_mb']:.0f} | {m['rss_mb']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.readme).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
