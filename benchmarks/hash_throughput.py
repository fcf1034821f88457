"""Dataset hashing throughput of DatasetLineageCallback: cold and cached, against `sha256sum` on the same files.

    .venv/bin/python benchmarks/hash_throughput.py --size-gb 1

Generates a dataset of random files (``--file-mb`` each) in ``--dir`` (default: a temp dir, removed after), then
runs ``--rounds`` interleaved rounds (the order alternates each round) of

- **cold**: :func:`hash_path` with an empty digest cache (every byte read and hashed);
- **sha256sum** (and ``openssl dgst -sha256`` when installed): over the same files, one process;
- **cached**: :func:`hash_path` with the digest cache from the cold pass (only ``stat`` per file).

Before each cold and each reference-tool pass the files' pages are evicted from the OS page cache with
``posix_fadvise(DONTNEED)`` (no root needed, other processes' caches untouched), so both read from disk;
``--no-evict`` measures hashing from memory instead. Reports medians (MB = 10^6 bytes) and writes
``benchmarks/README_hash.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning_mlflow_cv.callbacks.dataset_lineage import DigestCache, hash_path

HERE = Path(__file__).resolve().parent


NOTE = """
Note: the machine was shared with other jobs while this ran (load average above the core count), so absolute
figures are low and noisy; compare the passes within a round."""
NOTE_COREUTILS = """ GNU coreutils' `sha256sum` here is not linked
against OpenSSL (`ldd` shows no libcrypto), so it does not use the CPU's SHA extensions (`sha_ni`) that Python's
hashlib gets from OpenSSL; `openssl dgst -sha256` is listed as the like-for-like reference."""


def sha256sum_without_openssl() -> bool:
    try:
        out = subprocess.run(["ldd", shutil.which("sha256sum") or "sha256sum"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return bool(out) and "libcrypto" not in out


def make_dataset(root: Path, size_gb: float, file_mb: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    n = max(1, round(size_gb * 1000 / file_mb))
    files = []
    block = os.urandom(file_mb * 10**6)
    for i in range(n):
        p = root / f"shard_{i // 64:03d}" / f"{i:05d}.bin"
        p.parent.mkdir(exist_ok=True)
        if not p.exists() or p.stat().st_size != len(block):
            # distinct content per file without generating 1 GB of randomness
            p.write_bytes(i.to_bytes(8, "little") + block[8:])
        files.append(p)
    return files


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_ours(root: Path, cache: DigestCache) -> tuple[float, str]:
    t = time.perf_counter()
    digest, _ = hash_path(root, cache)
    return time.perf_counter() - t, digest


def run_tool(root: Path, files: list[Path], tool: list[str]) -> float:
    rel = [str(f.relative_to(root)) for f in files]
    t = time.perf_counter()
    subprocess.run([*tool, *rel], cwd=root, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


TOOLS = {"sha256sum": ["sha256sum"], "openssl": ["openssl", "dgst", "-sha256"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{cpu}, {cores} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()} (load avg {load:.1f} at start)"


def versions() -> str:
    import ssl

    coreutils = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    out = f"Python {platform.python_version()} (hashlib on {ssl.OPENSSL_VERSION}), {coreutils}"
    if shutil.which("openssl"):
        out += ", CLI " + subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="dataset size (GB, 10^9 bytes)")
    ap.add_argument("--file-mb", type=int, default=4, help="size of each file (MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to generate the data (kept); default: temp dir")
    ap.add_argument("--no-evict", action="store_true", help="do not evict the files from the page cache")
    ap.add_argument("--out", type=Path, default=HERE / "README_hash.md")
    args = ap.parse_args(argv)
    if shutil.which("sha256sum") is None:
        print("sha256sum not found", file=sys.stderr)
        return 2

    tmp = None if args.dir else tempfile.mkdtemp(prefix="hashbench-")
    root = args.dir or Path(tmp)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        files = make_dataset(root, args.size_gb, args.file_mb)
        total = sum(f.stat().st_size for f in files)
        print(f"dataset: {len(files)} files, {total / 1e9:.2f} GB in {root} ({time.perf_counter() - t0:.1f}s)")
        tools = [t for t in TOOLS if shutil.which(TOOLS[t][0])]
        res: dict[str, list[float]] = {"cold": [], **{t: [] for t in tools}, "cached": []}
        digests = set()
        for r in range(args.rounds):
            order = ["cold", *tools]
            order = order if r % 2 == 0 else order[::-1]
            cache = DigestCache(None)
            for what in order:
                if not args.no_evict:
                    evict(files)
                if what == "cold":
                    dt, d = run_ours(root, cache)
                    digests.add(d)
                else:
                    dt = run_tool(root, files, TOOLS[what])
                res[what].append(total / dt / 1e6)
            dt, d = run_ours(root, cache)  # the cache is full now: only stat()
            digests.add(d)
            res["cached"].append(total / dt / 1e6)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} MB/s" for k, v in res.items()))
        assert len(digests) == 1, "digests differ between passes"
        med = {k: statistics.median(v) for k, v in res.items()}
        ratio = med["cold"] / med["sha256sum"]
        print(f"median: cold {med['cold']:,.0f} MB/s, sha256sum {med['sha256sum']:,.0f} MB/s "
              f"(cold/sha256sum = {ratio:.2f}), cached {med['cached']:,.0f} MB/s")
        busy = os.getloadavg()[0] > (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        cmd = "benchmarks/hash_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        names = {
            "cold": "`hash_path`, empty digest cache (cold)",
            "sha256sum": "`sha256sum` on the same files",
            "openssl": "`openssl dgst -sha256` on the same files",
            "cached": "`hash_path`, digest cache filled (cached)",
        }
        rows = "\n".join(
            f"| {names[k]} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in res[k])} |" for k in res
        )
        args.out.write_text(
            f"""# Dataset hashing throughput (DatasetLineageCallback)

Machine: {machine()}

Versions: {versions()}

Command: `.venv/bin/python {cmd.strip()}`

Data: {len(files)} files of {args.file_mb} MB, {total / 1e9:.2f} GB in total; {args.rounds} interleaved rounds (order
alternating), median reported; MB = 10^6 bytes. Page cache {"evicted (`posix_fadvise` DONTNEED) before every cold and "
"reference-tool pass, so the passes read from storage where the filesystem honours the hint" if not args.no_evict else "not evicted: hashing from memory"}.

| pass | median MB/s | rounds MB/s |
|---|---:|---:|
{rows}

Cold / sha256sum: **{ratio:.2f}**. Cached: a file whose (path, size, mtime) is unchanged is not read; only `stat`
is called, so the cached figure is the dataset size divided by the time to walk and stat it.
{NOTE if busy else ""}{NOTE_COREUTILS if sha256sum_without_openssl() else ""}
"""
        )
        print(f"wrote {args.out}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
