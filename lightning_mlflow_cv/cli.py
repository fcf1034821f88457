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
    from lightning_mlflow_cv.spool_sync import sync

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
        except Exception as err:
            print(f"sync: {path}: {type(err).__name__}: {err}", file=sys.stderr)
            rc = 1
            continue
        print(json.dumps({"spool": path, **out}))
    return rc


USAGE = """usage: lightning-mlflow-cv {fit,validate,test,predict,demo,sync,promote} ...

LightningCLI with MLflow by default (MLflowCVLogger, the config as a run artifact), plus the jobs around it.

subcommands:
  fit, validate, test, predict
           Lightning's subcommands (MLflowCVCLI): `lightning-mlflow-cv fit --config examples/digits/config.yaml`;
           `lightning-mlflow-cv fit --help` lists every option
  demo     train the digits CNN into sqlite:///mlflow.db, register it and gate it to @champion
  sync     replay a spool file (data kept while the tracking store was unreachable) into its run
  promote  gates + champion/challenger comparison + alias move for a registered version (CI/CD)

Each subcommand takes --help.
"""


def _missing_extra(err: BaseException) -> str | None:
    """The one-line message of a missing optional dependency somewhere in ``err``'s chain, else ``None``."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError) and "lightning-mlflow-cv[" in str(e):
            return " ".join(str(e).split())
        e = e.__cause__ or e.__context__
    return None


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
    if cmd in ("", "-h", "--help"):
        print(USAGE, end="", file=sys.stdout if cmd else sys.stderr)
        return 0 if cmd else 2
    from lightning_mlflow_cv.cli_lightning import MLflowCVCLI

    try:
        MLflowCVCLI(args=argv)
    except (Exception, SystemExit) as err:
        msg = _missing_extra(err)
        if msg is None:
            raise
        print(f"lightning-mlflow-cv: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
