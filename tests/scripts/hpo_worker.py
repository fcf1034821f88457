"""One optuna_sweep worker: argv = OPTUNA_STORAGE MLFLOW_URI STUDY_NAME N_TRIALS BARRIER_DIR N_WORKERS OUT_JSON.

Several of these share one Optuna RDB storage and one MLflow store. After the (slow) imports each worker
writes BARRIER_DIR/<pid>.ready and waits for N_WORKERS such files, so they race for the study creation.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import TinyModel, loaders, trainer  # noqa: E402

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402
from lightning_mlflow_cv.hpo import optuna_sweep  # noqa: E402


MINE: list[int] = []  # trial numbers this worker ran


def objective(trial):
    MINE.append(trial.number)
    train, val = loaders(n=16)
    model = TinyModel(lr=trial.suggest_float("lr", 1e-3, 0.5, log=True))
    tr = trainer(MLflowCVLogger(flush_interval_s=0.2), max_epochs=1)
    tr.fit(model, train, val)
    return tr.callback_metrics["val/loss"].item()


def main() -> None:
    storage, uri, study_name, n_trials, barrier, n_workers, out = sys.argv[1:8]
    Path(barrier, f"{os.getpid()}.ready").touch()
    deadline = time.time() + 180
    while len(list(Path(barrier).glob("*.ready"))) < int(n_workers) and time.time() < deadline:
        time.sleep(0.05)
    study = optuna_sweep(
        objective,
        n_trials=int(n_trials),
        storage=storage,
        study_name=study_name,
        tracking_uri=uri,
        experiment="hpo-dist",
        run_name="dist-sweep",
    )
    Path(out).write_text(json.dumps({"parent": study.user_attrs["mlflow_parent_run_id"], "trials": MINE}))


if __name__ == "__main__":
    main()
