"""The ``lightning-mlflow-cv`` console script.

Subcommands: ``demo`` (the digits job), ``sync SPOOL`` (replay spooled data), and, when available,
``promote`` and the LightningCLI subcommands (``fit``, ``validate``, ``test``, ``predict``) of
:class:`~lightning_mlflow_cv.MLflowCVCLI`.
"""

from __future__ import annotations

import argparse
import json
import sys


def _sync(argv: list[str]) -> int:
    from lightning_mlflow_cv._spool import sync

    parser = argparse.ArgumentParser(
        prog="lightning-mlflow-cv sync",
        description="Replay spooled MLflow data into its run. Idempotent: running it twice adds nothing.",
    )
    parser.add_argument("spool", nargs="+", help="spool file(s) (*.jsonl) printed by MLflowCVLogger")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the spool's own")
    args = parser.parse_args(argv)
    rc = 0
    for path in args.spool:
        try:
            out = sync(path, args.tracking_uri)
        except Exception as err:  # noqa: BLE001 - report per file, keep going
            print(f"sync: {path}: {type(err).__name__}: {err}", file=sys.stderr)
            rc = 1
            continue
        print(json.dumps({"spool": path, **out}))
    return rc


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-mlflow-cv`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else ""
    if cmd == "sync":
        return _sync(argv[1:])
    if cmd == "demo":
        from lightning_mlflow_cv.demo import main as demo_main

        return demo_main(argv[1:])
    if cmd == "promote":
        try:
            from lightning_mlflow_cv.registry import promote_main
        except ImportError:
            print("promote: not available in this version", file=sys.stderr)
            return 2
        return promote_main(argv[1:])
    try:
        from lightning_mlflow_cv.cli_lightning import MLflowCVCLI
    except ImportError:
        print(
            "usage: lightning-mlflow-cv {demo,sync} ...\n"
            "  demo   train the digits CNN into sqlite:///mlflow.db\n"
            "  sync   replay a spool file into its MLflow run",
            file=sys.stderr,
        )
        return 2 if cmd not in ("-h", "--help") else 0
    MLflowCVCLI(args=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
