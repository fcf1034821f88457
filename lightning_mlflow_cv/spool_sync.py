"""``sync``: replay a spool file left behind by a fit into its MLflow run.

The public face of the journal (:mod:`lightning_mlflow_cv._delivery.journal`): ``from lightning_mlflow_cv import sync`` and
the console script ``lightning-mlflow-cv sync SPOOL`` both call :func:`sync`, which delivers with the writer's
code (:class:`~lightning_mlflow_cv._delivery.deliverer.Deliverer`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_mlflow_cv._delivery.deliverer import Deliverer, concurrency_for
from lightning_mlflow_cv._delivery.journal import Spool
from lightning_mlflow_cv._facts.redact import safe_uri

__all__ = ["sync"]


def sync(spool_path: str | os.PathLike[str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Replay a spool file into its run (creating the run if the fit never reached the store).

    Idempotent: replaying twice adds nothing. Uses MLflow's normal retries. Returns a summary: the run, the
    number of journal records replayed (``records``: lines, the run header and binding included) and their size
    (``bytes``), the store (credentials masked) and how many points MLflow rejected (kept in
    ``<spool>.rejected.jsonl``).

    Example::

        >>> sync("~/.cache/lightning_mlflow_cv/spool/offline-123.jsonl")  # doctest: +SKIP
        {'run_id': '...', 'records': 1200, 'bytes': 96712, 'tracking_uri': 'http://mlflow:5000', 'rejected': 0}
    """
    from mlflow import MlflowClient

    path = Path(spool_path).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise FileNotFoundError(
            f"sync: spool file {str(path)!r} does not exist or is not a .jsonl spool. "
            "Pass the path printed by MLflowCVLogger's warning (e.g. ~/.cache/lightning_mlflow_cv/spool/<run>.jsonl)."
        )
    spool = Spool(path.parent, path.stem)
    header = spool.header()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header.get("tracking_uri")
    if not uri:
        raise ValueError(
            f"sync: no tracking URI in {path} and none given. Pass --tracking-uri or set MLFLOW_TRACKING_URI."
        )
    deliverer = Deliverer(MlflowClient(uri), spool, header.get("run_id"), concurrency_for(uri))
    try:
        end = deliverer.deliver(0, ack=False)
    finally:
        deliverer.close()
    spool.ack(end)
    spool.close()
    with open(path, "rb") as fh:  # every line up to the delivered offset is a complete record
        records = fh.read(end).count(b"\n")
    return {
        "run_id": deliverer.run_id,
        "records": records,
        "bytes": end,
        "tracking_uri": safe_uri(uri),
        "rejected": deliverer.rejected,
    }
