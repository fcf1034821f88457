"""One prepared GPU check: the ``gpu`` tests, the logging benchmark on CUDA, the realistic CV fit, the sync count.

Run it as ``make gpu-check`` on a machine with a CUDA GPU. Every step has its own time budget so the whole check
finishes well inside 8 minutes on one GPU; a step that runs out of time is reported as such and the next one runs.
All figures, with the GPU model and driver, go to ``benchmarks/README_gpu.md`` (``--out`` to change; a copy goes
to ``$OUT`` when that variable names a directory, as on the lent GPU machine). Without CUDA it says what it skipped
and why, writes nothing, and exits 0 (the CPU dry run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: (name, seconds allowed, command). ``{py}`` is this interpreter.
STEPS: list[tuple[str, int, list[str]]] = [
    ("gpu tests", 150, ["{py}", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "tests/gpu"]),
    ("sync count", 60, ["{py}", "benchmarks/gpu_sync_count.py", "--steps", "50"]),
    ("logging benchmark (cuda)", 150, ["{py}", "benchmarks/logging_overhead.py", "--device", "cuda", "--steps", "400",
                                       "--rounds", "2", "--no-outage", "--no-slow", "--no-readme"]),  # fmt: skip
    ("ResNet-18 CV fit (cuda)", 90, ["{py}", "benchmarks/cv_fit_overhead.py", "--device", "cuda", "--no-readme"]),
]


def gpu_info() -> dict[str, str]:
    """GPU model, count, driver, CUDA and cuDNN versions (empty when torch sees no CUDA device)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    driver = "unknown"
    if shutil.which("nvidia-smi"):
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]  # fmt: skip
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return {
        "gpu": torch.cuda.get_device_name(0),
        "count": str(torch.cuda.device_count()),
        "driver": driver,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "torch": torch.__version__,
    }


def run_step(name: str, budget: int, cmd: list[str]) -> dict[str, object]:
    """Run one step under its budget; keep the tail of its output."""
    cmd = [c.replace("{py}", sys.executable) for c in cmd]
    script = next((c for c in cmd if c.endswith(".py")), None)
    if script and not (REPO / script).exists():
        return {"name": name, "status": "skipped", "why": f"{script} is not in this checkout", "seconds": 0.0, "tail": ""}
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget)
        status = "passed" if p.returncode == 0 else f"failed (exit {p.returncode})"
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status = f"out of time ({budget} s)"
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"name": name, "status": status, "seconds": round(time.monotonic() - t0, 1), "tail": out[-4000:]}


def dry_check(cmd: list[str]) -> str:
    """On a CPU machine: does the step's command start (``--help``, or pytest ``--collect-only``)?"""
    cmd = [c.replace("{py}", sys.executable) for c in cmd]
    script = next((c for c in cmd if c.endswith(".py")), None)
    if script and not (REPO / script).exists():
        return f"absent ({script} is not in this checkout; it will be skipped)"
    probe = [*cmd, "--collect-only"] if "pytest" in cmd else [*cmd[:2], "--help"]
    p = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    return "ready" if p.returncode == 0 else f"BROKEN (exit {p.returncode}): {(p.stdout + p.stderr)[-300:]}"


def report(info: dict[str, str], results: list[dict[str, object]]) -> str:
    lines = [
        "# GPU check results",
        "",
        f"Written by `make gpu-check` (benchmarks/gpu_check.py) on {dt.date.today().isoformat()}.",
        "",
        "- " + ", ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
        *[f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in results],
        "",
    ]
    for r in results:
        lines += [f"## {r['name']}", "", "```", str(r["tail"]).strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "README_gpu.md"))
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = p.parse_args(argv)
    info = gpu_info()
    steps = [s for s in STEPS if args.only is None or s[0] in args.only.split(",")]
    if not info:
        ok = True
        for name, budget, cmd in steps:
            ready = dry_check(cmd)
            ok = ok and not ready.startswith("BROKEN")
            print(f"skipped: {name} ({budget} s budget): no CUDA GPU is visible to torch; command {ready}")
        print("gpu-check: dry run on a machine without CUDA; nothing measured, nothing written")
        return 0 if ok else 1
    print(json.dumps(info), flush=True)
    results = []
    for name, budget, cmd in steps:
        r = run_step(name, budget, cmd)
        print(f"{name}: {r['status']} in {r['seconds']} s", flush=True)
        results.append(r)
    text = report(info, results)
    Path(args.out).write_text(text)
    out_dir = os.environ.get("OUT")
    if out_dir and Path(out_dir).is_dir():
        (Path(out_dir) / Path(args.out).name).write_text(text)
    print(f"gpu-check: results in {args.out}")
    return 0 if all(r["status"] in ("passed",) or str(r["status"]).startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
