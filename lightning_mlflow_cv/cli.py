"""The ``lightning-mlflow-cv`` console script.

Subcommands: ``demo`` (the digits job), ``sync SPOOL`` (replay spooled data), ``promote`` (the command form of
:func:`lightning_mlflow_cv.promotion.promote`, for CI/CD) and the LightningCLI subcommands (``fit``,
``validate``, ``test``, ``predict``) of :class:`~lightning_mlflow_cv.MLflowCVCLI`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


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


def promote_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-mlflow-cv promote``: exit 0 when promoted, 1 when not, 2 on a usage or lookup error.

    Parses the command line into :func:`lightning_mlflow_cv.promotion.promote`'s arguments and prints the
    decision as one JSON object on stdout.
    """
    from lightning_mlflow_cv.promotion import parse_gate_expr, promote

    parser = argparse.ArgumentParser(
        prog="lightning-mlflow-cv promote",
        description="Gate a registered model version and move the champion alias when it wins. "
        "Exit code: 0 promoted, 1 not promoted, 2 error.",
    )
    parser.add_argument("--model-name", "-m", required=True, help="registered model name")
    parser.add_argument("--candidate", "-c", required=True, help="version number or the run id that registered it")
    parser.add_argument(
        "--gate",
        "-g",
        action="append",
        default=[],
        metavar="METRIC<OP>NUMBER",
        help="e.g. 'val/acc>=0.9' (repeatable; op in >= <= > < == !=)",
    )
    parser.add_argument("--champion-alias", default="champion")
    parser.add_argument("--compare-metric", default=None)
    parser.add_argument("--compare-mode", choices=("max", "min"), default="max")
    parser.add_argument("--min-improvement", type=float, default=0.0)
    parser.add_argument("--use-stages", action="store_true", help="also transition to Production (legacy)")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        decision = promote(
            args.model_name,
            args.candidate,
            [parse_gate_expr(expr) for expr in args.gate],
            args.champion_alias,
            args.compare_metric,
            args.min_improvement,
            args.tracking_uri,
            compare_mode=args.compare_mode,
            use_stages=args.use_stages,
        )
    except Exception as err:  # noqa: BLE001 - a CLI reports, it does not trace back
        print(f"promote: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(decision.to_dict(), default=str))
    return 0 if decision.promoted else 1


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
        from lightning_mlflow_cv.demos.digits import main as demo_main

        return demo_main(argv[1:])
    if cmd == "promote":
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
