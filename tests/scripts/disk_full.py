"""Fit with the spool's file size capped (RLIMIT_FSIZE): writes fail with EFBIG as on a full disk."""

import json
import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import TinyModel, loaders, trainer  # noqa: E402

from lightning_mlflow_cv import MLflowCVLogger  # noqa: E402

uri, spool_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
logger = MLflowCVLogger(tracking_uri=uri, experiment_name="diskfull", spool_dir=spool_dir, flush_interval_s=0.2)
_ = logger.run_id  # run created, spool opened
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (logger.spool_path.stat().st_size + 2000, resource.RLIM_INFINITY))
train, val = loaders()
tr = trainer(logger, max_epochs=3)
tr.fit(TinyModel(), train, val)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
out.write_text(json.dumps({"run_id": logger.run_id, "global_step": tr.global_step}))
