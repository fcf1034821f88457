"""Does a week-long fit stay flat? Memory, spool size and completeness over one fit of millions of points.

Run from the repository root::

    python benchmarks/long_fit.py                      # 5M points per (writer, store); README_long_fit.md, .png, raw .json
    python benchmarks/long_fit.py --quick --out-dir /tmp/longq   # 200,000 points, 1 MiB compaction: checks it all runs

Method. For each writer (``MLflowCVLogger(writer="thread" | "process")``) and each store (``sqlite``: a fresh copy of
a pre-migrated SQLite store; ``http``: a fresh ``mlflow server`` on 127.0.0.1 backed by a fresh PostgreSQL cluster,
started after its process group is idle), a fresh child process (``--_child SPEC.json``) constructs the logger, logs
the params once, then calls ``log_metrics`` with 8 float metrics for ``--points / 8`` steps as fast as the loop runs
(or at ``--rate`` points/s), then ``finalize("success")``, which returns once the store has everything. Loop and
finalize are timed separately; the child reads its own memory (``/proc/self/smaps_rollup``: RSS, USS = Private_Clean
+ Private_Dirty, and anonymous memory, which neither other processes' mappings nor the forked writer's copy-on-write
sharing move, unlike USS: see the README's note) at 100,000 points, at the end of the loop and at the end of finalize. ``LIGHTNING_MLFLOW_CV_SPOOL_DIR``
is a per-child directory. The child publishes its loop counter and phase in a small file every ~0.5% of the loop.

A sampler thread in this (parent) process records every 0.5 s, at no cost to the child: points logged, phase, the
training process's RSS, USS and anonymous memory, the writer process's (the child's child, for writer=process) RSS and USS, the spool
directory's total size and its undelivered bytes. Afterwards the parent counts the run's rows in the store's
``metrics`` table (all, and distinct (key, step)) and reads the run's status. Targets: training-process growth from
100,000 points to the end of finalize < 50 MB (USS, RSS, anonymous), writer-process USS < 100 MB, spool at most 2x
``COMPACT_BYTES`` (see the footnote on compaction in the Markdown), every point stored exactly once,
status FINISHED. A child past ``--cap-s`` is killed (with its writer) and reported. The plot's x axis is the time since
the loop began: an unthrottled loop logs everything in seconds and the delivery takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from logging_overhead import MlflowServer, machine_info, make_sqlite_template, wait_idle  # noqa: E402 (stdlib only)

KEYS = [f"train/m{i}" for i in range(8)]
KEY_OFFSETS = [(k, float(j)) for j, k in enumerate(KEYS)]
MARK_POINTS = 100_000
SAMPLE_S = 0.5
NAN3 = (float("nan"),) * 3
TARGET_GROWTH_MB, TARGET_WRITER_MB, TARGET_SPOOL_X = 50.0, 100.0, 2.0


def memory_mb(pid: int | str) -> tuple[float, float, float]:
    """(RSS, USS, anonymous) in MB of a process, from ``/proc/PID/smaps_rollup``; NaNs once it is gone.

    USS (Private_Clean + Private_Dirty) leaves out pages shared with a forked writer process (copy-on-write) while it
    lives; anonymous memory (the heap, shared or not) does not depend on the fork."""
    rss = uss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == "Rss":
                rss = int(rest.split()[0])
            elif name == "Anonymous":
                anon = int(rest.split()[0])
            elif name in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return NAN3
    return rss / 1024, uss / 1024, anon / 1024


# ================================================================================================
# child: one (writer, store) fit
# ================================================================================================
def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    fd = os.open(spec["status"], os.O_WRONLY | os.O_CREAT, 0o644)

    def publish(points: int, phase: str) -> None:
        os.pwrite(fd, f"{points:>14d} {phase:<12s}\n".encode(), 0)

    result: dict[str, Any] = {"finished": False}
    try:
        publish(0, "setup")
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        from lightning_mlflow_cv._delivery import journal

        if spec["compact_bytes"]:  # read by the thread writer at each ack, passed to a writer process in its config
            journal.COMPACT_BYTES = spec["compact_bytes"]
        from lightning_mlflow_cv import MLflowCVLogger

        t0 = time.perf_counter()
        logger = MLflowCVLogger(tracking_uri=spec["uri"], experiment_name=spec["experiment"], writer=spec["writer"])
        logger.log_hyperparams({"points": spec["points"], "writer": spec["writer"], "store": spec["store"]})
        Path(spec["run_id_file"]).write_text(str(logger.run_id))
        steps, rate = spec["points"] // len(KEYS), float(spec["rate"])
        every = max(1, min(6250, steps // 200))
        mark = max(1, min(MARK_POINTS, spec["points"] // 2) // len(KEYS)) - 1
        mem: dict[str, tuple[float, float, float]] = {}
        result.update(setup_s=time.perf_counter() - t0, writer_choice=logger.writer_choice, run_id=logger.run_id)
        keys_json = json.dumps(KEYS, separators=(",", ":"))  # the journal's bytes per point, for the plot
        line = journal.metric_record(steps // 2, int(time.time() * 1000), keys_json, [0.5] * len(KEYS))
        result["bytes_per_point"] = len(line) / len(KEYS)
        publish(0, "logging")
        t1 = time.perf_counter()
        for i in range(steps):
            x = 1.0 / (i + 1)
            logger.log_metrics({k: x + o for k, o in KEY_OFFSETS}, step=i)
            if i % every == every - 1:
                publish((i + 1) * len(KEYS), "logging")
            if rate and i & 15 == 15 and (ahead := t1 + (i + 1) * len(KEYS) / rate - time.perf_counter()) > 0:
                time.sleep(ahead)
            if i == mark:
                mem["mark"] = memory_mb("self")
        t2 = time.perf_counter()
        mem["loop_end"] = memory_mb("self")
        result.update(points=steps * len(KEYS), mark_points=(mark + 1) * len(KEYS), loop_s=t2 - t1, memory=mem)
        Path(spec["out"]).write_text(json.dumps(result))  # the loop's figures, should finalize pass the cap
        publish(steps * len(KEYS), "finalizing")
        logger.finalize("success")
        t3 = time.perf_counter()
        mem["finalize_end"] = memory_mb("self")
        publish(steps * len(KEYS), "done")
        result.update(
            finished=True, finalize_s=t3 - t2, undelivered=str(logger.last_spool_path or ""),
            writer_choice_end=logger.writer_choice,
        )  # fmt: skip
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(err).__name__}: {err}"
    Path(spec["out"]).write_text(json.dumps(result))
    return 0 if result["finished"] else 1


# ================================================================================================
# parent: stores, sampling, figures
# ================================================================================================
class PgMlflowServer(MlflowServer):
    """``logging_overhead.MlflowServer`` with a PostgreSQL backend store."""

    def __init__(self, root: Path, backend_uri: str) -> None:
        from conftest import free_port

        super().__init__(root)
        self.port = free_port()
        self.backend_uri = backend_uri


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def spool_mb(directory: Path) -> tuple[float, float]:
    """(total size of the files under ``directory``, bytes of its journals not yet acknowledged), in MB."""
    total = pending = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            total += size
            if name.endswith(".jsonl"):
                try:
                    pending += max(size - int(path.with_suffix(".ack").read_text().strip() or 0), 0)
                except (OSError, ValueError):
                    pending += size
    return total / 2**20, pending / 2**20


class Sampler(threading.Thread):
    """Samples the child every :data:`SAMPLE_S` seconds (see the module docstring)."""

    def __init__(self, pid: int, status: Path, spool: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.status, self.spool = pid, status, spool
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(SAMPLE_S):
            try:
                points_s, phase = self.status.read_text().split()[:2]
            except (OSError, ValueError):
                points_s, phase = "0", "start"
            kids = _children(self.pid)
            train, writer = memory_mb(self.pid), memory_mb(kids[0]) if kids else NAN3
            size, pending = spool_mb(self.spool)
            self.samples.append({
                "t": round(time.monotonic() - t0, 2), "phase": phase, "points": int(points_s),
                "train_rss_mb": train[0], "train_uss_mb": train[1], "train_anon_mb": train[2], "writer_pid": kids[0] if kids else None,
                "writer_rss_mb": writer[0], "writer_uss_mb": writer[1], "spool_mb": size, "pending_mb": pending,
            })  # fmt: skip


def count_rows(store: str, where: Any, run_id: str | None) -> dict[str, Any]:
    """Rows of the run in the ``metrics`` table (all, distinct (key, step)) and the run's status."""
    if not run_id:
        return {"rows": 0, "distinct": 0, "status": None}
    if store == "sqlite":
        import sqlite3

        with sqlite3.connect(where) as conn:
            rows = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid=?", (run_id,)).fetchone()[0]
            q = "SELECT count(*) FROM (SELECT DISTINCT key, step FROM metrics WHERE run_uuid=?)"
            distinct = conn.execute(q, (run_id,)).fetchone()[0]
            status = conn.execute("SELECT status FROM runs WHERE run_uuid=?", (run_id,)).fetchone()
    else:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=where, user="postgres", dbname="mlflow")
        try:
            with conn.cursor() as cur:
                q = "SELECT count(*), count(DISTINCT (key, step)) FROM metrics WHERE run_uuid=%s"
                cur.execute(q, (run_id,))
                rows, distinct = cur.fetchone()
                cur.execute("SELECT status FROM runs WHERE run_uuid=%s", (run_id,))
                status = cur.fetchone()
        finally:
            conn.close()
    return {"rows": rows, "distinct": distinct, "status": status[0] if status else None}


def run_one(args: argparse.Namespace, work: Path, template: Path, writer: str, store: str) -> dict[str, Any]:
    """One (writer, store) fit in a fresh child process, against a fresh store; everything stopped afterwards."""
    from conftest import PostgresServer

    d = work / f"{writer}-{store}"
    d.mkdir()
    compact = int(args.compact_mb * 2**20)
    res: dict[str, Any] = {"writer": writer, "store": store, "compact_bytes": compact or 32 * 2**20}
    res.update(rows=0, distinct=0, status=None)
    pg = server = None
    try:
        if store == "sqlite":
            db = d / "store.db"
            shutil.copy(template, db)
            uri, where = f"sqlite:///{db}", str(db)
        else:
            pg = PostgresServer()
            pg.start()
            server = PgMlflowServer(d, pg.uri())
            res["server_start_s"] = server.start()
            assert server.proc is not None
            res["server_idle_wait_s"] = wait_idle(server.proc.pid)
            uri, where = server.uri, pg.port
        spec = {
            "uri": uri, "experiment": f"long-fit-{writer}-{store}", "writer": writer, "store": store,
            "points": args.points, "rate": args.rate, "compact_bytes": compact,
            "status": str(d / "status"), "out": str(d / "result.json"), "run_id_file": str(d / "run_id"),
        }  # fmt: skip
        (d / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "LIGHTNING_MLFLOW_CV_SPOOL_DIR": str(d / "spool")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(d / "spec.json")]
        with open(d / "child.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = Sampler(proc.pid, d / "status", d / "spool")
        sampler.start()
        try:
            proc.wait(timeout=args.cap_s)
            res["killed_at_cap"] = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its writer process
            proc.wait(timeout=30)
            res["killed_at_cap"] = True
        sampler.done.set()
        sampler.join()
        res["samples"] = sampler.samples
        if (d / "result.json").exists():
            res.update(json.loads((d / "result.json").read_text()))
        if res["killed_at_cap"]:
            phase = sampler.samples[-1]["phase"] if sampler.samples else "?"
            res["error"] = f"killed at the cap ({args.cap_s:g} s) while {phase}"
        elif not res.get("finished"):
            res.setdefault("error", f"no result (exit status {proc.returncode})")
        if not res.get("finished"):
            res["log_tail"] = (d / "child.log").read_text(errors="replace")[-3000:]
        run_id = res.get("run_id") or ((d / "run_id").read_text() if (d / "run_id").exists() else None)
        res.update(count_rows(store, where, run_id))
    except Exception as err:  # noqa: BLE001 - reported; the other fits still run
        res["error"] = f"{type(err).__name__}: {err}"
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
    return res


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """The reported figures of one (writer, store) result, with the target verdicts."""
    nan = float("nan")
    mem = r.get("memory", {})
    mark, loop_end, fin_end = (mem.get(k, NAN3) for k in ("mark", "loop_end", "finalize_end"))
    # writer=process: its pages shared copy-on-write are private to neither process while it lives (see memory_mb),
    # so the USS growth runs to the end of the loop, where the writer still runs, as at 100,000 points
    uss_to = loop_end if r["writer"] == "process" else fin_end
    samples = r.get("samples", [])
    wuss = [s["writer_uss_mb"] for s in samples if s["writer_uss_mb"] == s["writer_uss_mb"]]
    spool_max = max((s["spool_mb"] for s in samples), default=nan)
    pending_max = max((s["pending_mb"] for s in samples), default=nan)
    # delivered records still on disk (the spool beyond its backlog): what compaction is there to bound
    beyond_max = max((s["spool_mb"] - s["pending_mb"] for s in samples), default=nan)
    points = r.get("points") or r["expected"]
    total_s = r.get("loop_s", nan) + r.get("finalize_s", nan)
    f = {
        "loop_s": r.get("loop_s", nan), "logged_pps": points / r["loop_s"] if r.get("loop_s") else nan,
        "finalize_s": r.get("finalize_s", nan), "delivered_pps": points / total_s if total_s == total_s else nan,
        "uss_mark": mark[1], "uss_loop_end": loop_end[1], "uss_end": fin_end[1],
        "rss_mark": mark[0], "rss_loop_end": loop_end[0], "rss_end": fin_end[0],
        "anon_mark": mark[2], "anon_loop_end": loop_end[2], "anon_end": fin_end[2],
        "growth_uss": uss_to[1] - mark[1], "growth_rss": fin_end[0] - mark[0], "growth_anon": fin_end[2] - mark[2],
        "writer_uss_max": max(wuss) if r["writer"] == "process" and wuss else nan,
        "spool_max_mb": spool_max, "pending_max_mb": pending_max, "spool_x": spool_max * 2**20 / r["compact_bytes"],
        "beyond_max_mb": beyond_max, "beyond_x": beyond_max * 2**20 / r["compact_bytes"], "rows": r["rows"], "distinct": r["distinct"],
        "expected": r["expected"], "status": r["status"],
    }  # fmt: skip
    verdicts = [
        ("finished within the cap", not r.get("killed_at_cap") and bool(r.get("finished")), r.get("error", "yes")),
        ("training USS growth < 50 MB [1]", f["growth_uss"] < TARGET_GROWTH_MB, f"{f['growth_uss']:+.1f} MB"),
        ("training RSS growth < 50 MB", f["growth_rss"] < TARGET_GROWTH_MB, f"{f['growth_rss']:+.1f} MB"),
        ("training anonymous growth < 50 MB", f["growth_anon"] < TARGET_GROWTH_MB, f"{f['growth_anon']:+.1f} MB"),
        ("spool <= 2x COMPACT_BYTES [2]", f["spool_x"] <= TARGET_SPOOL_X, f"{spool_max:.1f} MB = {f['spool_x']:.2f}x"),
        (
            "spool beyond its backlog <= max(2x COMPACT_BYTES, backlog) [2]",
            f["beyond_max_mb"] <= max(TARGET_SPOOL_X * r["compact_bytes"] / 2**20, pending_max),
            f"{beyond_max:.1f} MB = {f['beyond_x']:.2f}x; backlog max {pending_max:.1f} MB",
        ),
        ("rows == points logged", f["rows"] == r["expected"], f"{f['rows']:,} / {r['expected']:,}"),
        ("distinct (key, step) == points", f["distinct"] == r["expected"], f"{f['distinct']:,} / {r['expected']:,}"),
        ("run status FINISHED", f["status"] == "FINISHED", str(f["status"])),
    ]
    if r["writer"] == "process":
        verdicts.insert(
            3, ("writer USS max < 100 MB", f["writer_uss_max"] < TARGET_WRITER_MB, f"{f['writer_uss_max']:.1f} MB")
        )
    f["verdicts"] = [{"target": t, "pass": bool(ok), "figure": fig} for t, ok, fig in verdicts]
    return f


def _n(v: Any, fmt: str = ",.1f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one column per (writer, store), one row per figure."""
    head = "| | " + " | ".join(f"{r['writer']} / {r['store']}" for r in results) + " |"
    rows = [head, "|---" * (len(results) + 1) + "|"]

    def row(label: str, cell: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(r, r["fig"]) for r in results) + " |")

    row("writer (at the start; at the end if it changed)", lambda r, f: " / ".join(dict.fromkeys(
        str(r.get(k, "-")) for k in ("writer_choice", "writer_choice_end"))))  # fmt: skip
    row("loop (s) / points logged per s", lambda r, f: f"{_n(f['loop_s'])} / {_n(f['logged_pps'], ',.0f')}")
    row("finalize (s)", lambda r, f: _n(f["finalize_s"]))
    row("delivery, points/s (loop + finalize)", lambda r, f: _n(f["delivered_pps"], ",.0f"))
    mark = f"{results[0].get('mark_points', MARK_POINTS) / 1000:,.0f}k" if results else "100k"
    for k, lbl in (("uss", "USS"), ("rss", "RSS"), ("anon", "anonymous")):
        row(f"training {lbl} MB at {mark} points / loop end / finalize end",
            lambda r, f, k=k: f"{_n(f[k + '_mark'])} / {_n(f[k + '_loop_end'])} / {_n(f[k + '_end'])}")  # fmt: skip
        row(f"training {lbl} growth from {mark} points (MB){' [1]' if k == 'uss' else ''}",
            lambda r, f, k=k: _n(f["growth_" + k], "+,.1f"))  # fmt: skip
    row("writer USS max (MB)", lambda r, f: _n(f["writer_uss_max"]) if r["writer"] == "process" else "in training")
    row("spool max MB (x COMPACT_BYTES)", lambda r, f: f"{_n(f['spool_max_mb'])} ({_n(f['spool_x'], '.2f')}x)")
    row("undelivered max MB (the backlog)", lambda r, f: _n(f["pending_max_mb"]))
    row(
        "spool beyond its backlog, max MB (x COMPACT_BYTES)",
        lambda r, f: f"{_n(f['beyond_max_mb'])} ({_n(f['beyond_x'], '.2f')}x)",
    )
    row("rows / distinct (key, step) / logged", lambda r, f: f"{f['rows']:,} / {f['distinct']:,} / {f['expected']:,}")
    row("run status", lambda r, f: str(f["status"]))
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path, stores: list[str]) -> None:
    """One row per store: training-process memory, writer-process memory, spool, points logged; x = time since the
    loop began (an unthrottled loop logs everything in seconds and the delivery takes minutes, so points logged
    alone would squeeze the whole delivery into the last x). Dotted verticals: the end of each loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [
        "training process USS, dotted: anonymous (MB)",
        "writer process USS (MB)",
        "spool on disk, dashed: undelivered (MB)",
        "points logged, dashed: delivered (M)",
    ]
    longest = max((p["t"] for r in results for p in r.get("samples", [])), default=0.0)
    unit, scale = ("min", 60.0) if longest > 900 else ("s", 1.0)
    fig, axes = plt.subplots(len(stores), 4, figsize=(18, 4.2 * len(stores)), squeeze=False)
    colors = {"thread": "tab:blue", "process": "tab:orange"}
    for row, store in zip(axes, stores, strict=True):
        for r in (r for r in results if r["store"] == store):
            run = [p for p in r.get("samples", []) if p["phase"] not in ("start", "setup")]
            if not run:
                continue
            c, lbl, t0 = colors.get(r["writer"], "k"), f"writer={r['writer']}", run[0]["t"]
            x = [(p["t"] - t0) / scale for p in run]

            lines = [(0, "train_uss_mb", "-", ""), (0, "train_anon_mb", ":", " (anonymous)"), (2, "spool_mb", "-", "")]
            lines += [(2, "pending_mb", "--", " undelivered")] + (
                [(1, "writer_uss_mb", "-", "")] if r["writer"] == "process" else []
            )
            for col, key, style, suffix in lines:
                row[col].plot(x, [p[key] for p in run], style, lw=1, c=c, label=lbl + suffix)
            row[3].plot(x, [p["points"] / 1e6 for p in run], c=c, lw=1, label=lbl)
            if r.get("bytes_per_point"):
                bpp = r["bytes_per_point"]
                delivered = [max(p["points"] - p["pending_mb"] * 2**20 / bpp, 0) / 1e6 for p in run]
                row[3].plot(x, delivered, "--", c=c, lw=1, label=lbl + " delivered")
            loop_end = next((p["t"] for p in run if p["phase"] in ("finalizing", "done")), None)
            for ax in row if loop_end is not None else ():
                ax.axvline((loop_end - t0) / scale, c=c, ls=":", lw=0.8)
        cap = 2 * (results[0]["compact_bytes"] if results else 32 * 2**20) / 2**20
        row[2].axhline(cap, c="red", ls=":", lw=1, label="2 x COMPACT_BYTES")
        for ax, title in zip(row, cols, strict=True):
            ax.set_title(f"{store}: {title}", fontsize=9)
            ax.set_xlabel(f"{unit} since the loop began (dotted vertical: loop end, finalize after it)", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    # fmt: off
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=None, help="metric points per fit, 8 per step (default 5,000,000; --quick 200,000)")
    p.add_argument("--writers", default="thread,process", help="comma-separated: thread,process")
    p.add_argument("--stores", default="sqlite,http", help="comma-separated: sqlite (fresh file), http (mlflow server + PostgreSQL)")
    p.add_argument("--quick", action="store_true", help="200,000 points and --compact-mb 1: checks that everything runs")
    p.add_argument("--compact-mb", type=float, default=None, help="journal.COMPACT_BYTES in MiB (default: the package's 32; --quick 1)")
    p.add_argument("--rate", type=float, default=0.0, help="log at most this many points/s (default 0: as fast as the loop runs)")
    p.add_argument("--cap-s", type=float, default=1800.0, help="kill a child (and its writer) after this long, reported")
    p.add_argument("--out-dir", default=str(HERE), help="where README_long_fit.md, README_long_fit_raw.json and long_fit.png go")
    p.add_argument("--no-readme", action="store_true", help="write the raw JSON and the PNG, not the README")
    p.add_argument("--keep", action="store_true", help="keep the work directory (stores, spools, child logs)")
    # fmt: on
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child)
    args.points = args.points or (200_000 if args.quick else 5_000_000)
    args.compact_mb = args.compact_mb if args.compact_mb is not None else (1.0 if args.quick else 0.0)
    writers, stores = [w for w in args.writers.split(",") if w], [s for s in args.stores.split(",") if s]
    sys.path.insert(0, str(REPO / "tests"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(argparse.Namespace(device="cpu"))
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    work = Path(tempfile.mkdtemp(prefix="lmc-longfit-"))
    results: list[dict[str, Any]] = []
    try:
        template = make_sqlite_template(work)
        for store in stores:
            for writer in writers:
                print(f"[long_fit] {writer} / {store}: {args.points:,} points ...", flush=True)
                r = run_one(args, work, template, writer, store)
                r["expected"] = args.points // len(KEYS) * len(KEYS)
                r["fig"] = figures(r)
                results.append(r)
                f = r["fig"]
                print(f"[long_fit]   loop {f['loop_s']:.1f} s, finalize {f['finalize_s']:.1f} s, delivery "
                      f"{f['delivered_pps']:,.0f} points/s; " + ", ".join(f"{v['target']}: {'pass' if v['pass'] else 'FAIL'} "
                      f"({v['figure']})" for v in f["verdicts"]), flush=True)  # fmt: skip
                if r.get("error"):
                    print(f"[long_fit]   error: {r['error']}\n{r.get('log_tail', '')}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    raw = []  # samples as columns and rows of values: a 5M-point run has thousands of samples per fit
    for r in results:
        cols = list(r["samples"][0]) if r.get("samples") else []
        rows = [[round(v, 2) if isinstance(v, float) else v for v in s.values()] for s in r.get("samples", [])]
        raw.append({**{k: v for k, v in r.items() if k != "samples"}, "sample_columns": cols, "samples": rows})
    meta = {"args": vars(args), "date": started, "machine": machine, "sample_s": SAMPLE_S}
    (out / "README_long_fit_raw.json").write_text(json.dumps({**meta, "results": raw}, separators=(",", ":")) + "\n")
    plot(results, out / "long_fit.png", stores)
    cmd = "python benchmarks/long_fit.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    verdicts = "\n".join(
        f"- {r['writer']} / {r['store']}: " + "; ".join(f"{v['target']}: **{'pass' if v['pass'] else 'FAIL'}** ({v['figure']})" for v in r["fig"]["verdicts"])
        for r in results
    )  # fmt: skip
    mark_text = f"{results[0].get('mark_points', MARK_POINTS):,}" if results else "100,000"
    compact = f"{args.compact_mb:g} MiB (set by --compact-mb)" if args.compact_mb else "32 MiB (the package's)"
    text = f"""# Long fit: does a week-long fit stay flat?{" (--quick)" if args.quick else ""}

One fit of {args.points:,} metric points (8 per step, {"logged as fast as the loop runs" if not args.rate else f"at {args.rate:,.0f} points/s"})
per writer and store, in a fresh process, without a Trainer: the logger's own cost over a long fit. Measured: the
training process's memory (RSS, USS, anonymous) from 100,000 points to the end of `finalize`, the writer process's memory,
the spool's size on disk (`COMPACT_BYTES` = {compact}: see [2]),
the time `finalize` takes to deliver what is left, and that the store holds every point exactly once. Method: the
module docstring of `benchmarks/long_fit.py`. Samples: `README_long_fit_raw.json`; plot: `long_fit.png`.

    {cmd.strip()}

- Date: {started}
{chr(10).join(machine)}

{table(results)}

[1] USS (Private_Clean + Private_Dirty) moves with what other processes map: the training process's library pages
(torch alone maps ~350 MB) are private only while no other process on the machine maps the same files, so USS can
jump by hundreds of MB either way when another Python process using this environment starts or ends. And with
writer=process the writer is forked from the training process: the pages they share copy-on-write are private to
neither while it lives, so the training process's USS is low until the writer exits at the end of `finalize`. Its
USS growth is therefore taken from {mark_text} points to the end of the loop (the writer alive at both). RSS and
anonymous memory (the heap, shared or not) depend on neither and run to the end of `finalize`: anonymous memory is the
figure to read for a leak. The writer's own USS is what it allocated or copied for itself.

[2] The journal is compacted when its delivered part passes `COMPACT_BYTES`: what is not delivered yet moves to
just after the header, in place (before, compaction waited for a journal with nothing left to deliver, which a fit
that logs without pause may never have). What is not delivered cannot be dropped: when the loop logs faster than
the store takes points (this loop logs 5M points in seconds; the store takes thousands per second), the spool
holds that backlog ("undelivered max") whatever the threshold, so the literal bound holds only while delivery
keeps up. The move is done only while the undelivered part is smaller than the delivered one (so a process killed
mid-copy loses nothing, without a second copy on disk): delivered records on disk stay under the larger of
2x `COMPACT_BYTES` and the backlog.

## Targets

{verdicts}

![long fit](long_fit.png)
"""
    if not args.no_readme:
        (out / "README_long_fit.md").write_text(text)
    print(text)
    return 0  # the verdicts are in the Markdown; a missed target is a finding, not a failed run


if __name__ == "__main__":
    sys.exit(main())
