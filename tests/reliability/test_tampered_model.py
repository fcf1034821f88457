"""A tampered model artifact (a pickle with a payload in place of the network) is refused, unexecuted."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest

from lightning_mlflow_cv import MLflowCVLogger, ModelRegistryCallback
from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_tampered_network_pickle_is_refused_and_never_executed(tracking_uri, tmp_path, digits):
    logger = MLflowCVLogger(tracking_uri=tracking_uri, experiment_name="tamper")
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=logger, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path / "root"),
        callbacks=[ModelRegistryCallback("tamper-digits")],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts("models:/tamper-digits/1", dst_path=str(tmp_path / "model"))
    finally:
        mlflow.set_tracking_uri(None)
    images = digits[0][:3].permute(0, 2, 3, 1).numpy().astype(np.uint8)  # NHWC uint8

    # control: the untouched copy loads and predicts probabilities
    clean = tmp_path / "clean"
    shutil.copytree(local, clean)
    probs = np.asarray(mlflow.pyfunc.load_model(str(clean)).predict(images))
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)

    marker = tmp_path / "PWNED"
    networks = [p for p in (tmp_path / "model").rglob("network.*")]
    assert networks
    for p in networks:
        p.write_bytes(pickle.dumps(_Payload(str(marker))))
    # what the user gets: torch.export's loader refuses a file that is not a .pt2 (zip) archive, without
    # unpickling it (torch.load would have run the payload)
    with pytest.raises(zipfile.BadZipFile, match=r"^File is not a zip file$"):
        mlflow.pyfunc.load_model(local).predict(images)
    assert not marker.exists(), "the pickle payload ran"
