"""DatasetLineageCallback: streamed hashing, the (path, size, mtime) digest cache, dataset classification, and
a real fit with a file-backed (ImageFolder) and an array-backed dataset read back from a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_mlflow_cv.callbacks.dataset_lineage import (
    DatasetLineageCallback,
    DigestCache,
    describe_dataset,
    hash_path,
    sha256_file,
)
from lightning_mlflow_cv.demos.digits import DigitsClassifier, NormalizedDigits
from lightning_mlflow_cv.logger import MLflowCVLogger


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    assert sha256_file(f, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    assert hash_path(f)[0] == hashlib.sha256(data).hexdigest()  # a single file: its own digest


def test_directory_digest_is_sha256sum_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write_tree(root, {"b/2.png": b"two", "a/1.png": b"one", "a/10.png": os.urandom(5000), "c.txt": b""})
    digest, stats = hash_path(root)
    # the same manifest `sha256sum` writes, hashed
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    manifest = subprocess.run(["sha256sum", *names], cwd=root, check=True, capture_output=True).stdout
    assert digest == hashlib.sha256(manifest).hexdigest()
    assert stats.files == stats.hashed_files == 4 and stats.total_bytes == 5006
    # renaming a file changes the digest even though no content changed
    (root / "c.txt").rename(root / "d.txt")
    assert hash_path(root)[0] != digest


def test_digest_cache_skips_unchanged_files_and_rehashes_changed_ones(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _write_tree(root, {f"cls{i % 2}/{i}.bin": os.urandom(2048) for i in range(6)})
    cache_file = tmp_path / "cache" / "digests.json"

    cache = DigestCache(cache_file)
    first, stats = hash_path(root, cache)
    cache.save()
    assert stats.hashed_files == 6 and stats.cached_files == 0
    assert len(json.loads(cache_file.read_text())["files"]) == 6

    # a fresh process (new DigestCache from disk): nothing is read again
    again, stats = hash_path(root, DigestCache(cache_file))
    assert again == first and stats.hashed_files == 0 and stats.cached_files == 6 and stats.hashed_bytes == 0

    # proof that an unchanged file is not re-read: a planted cache entry with matching (size, mtime) is trusted
    victim = str((root / "cls0" / "0.bin").resolve())
    data = json.loads(cache_file.read_text())
    data["files"][victim][2] = "f" * 64
    cache_file.write_text(json.dumps(data))
    planted, _ = hash_path(root, DigestCache(cache_file))
    assert planted != first

    # a changed file (new content, new mtime) is hashed again, and only that one
    cache = DigestCache(cache_file)
    target = root / "cls1" / "3.bin"
    target.write_bytes(os.urandom(2048))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed, stats = hash_path(root, cache)
    assert stats.hashed_files == 1 and stats.cached_files == 5
    assert cache.get(str(target.resolve()), st.st_size, st.st_mtime_ns + 1_000_000_000) == sha256_file(target)
    assert changed not in (first, planted)


def test_unreadable_cache_warns_and_rehashes(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    bad = tmp_path / "digests.json"
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match=r"digest cache .* is unreadable"):
        cache = DigestCache(bad)
    assert hash_path(f, cache)[1].hashed_files == 1


def test_describe_dataset_kinds(tmp_path: Path, digits) -> None:
    images, labels = digits
    td = TensorDataset(images[:10].float(), labels[:10])
    d = describe_dataset(Subset(td, [3, 1]))
    assert d.kind == "arrays" and d.features.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(d.targets, labels[[3, 1]].numpy())
    nd = describe_dataset(NormalizedDigits(images[:20], labels[:20]))  # arrays held as `images`/`labels`
    assert nd.kind == "arrays" and nd.name == "NormalizedDigits" and nd.targets.shape == (20,)
    root = _image_folder(tmp_path / "imgs", images[:6], labels[:6])
    from torchvision.datasets import ImageFolder

    fd = describe_dataset(ImageFolder(str(root)))
    assert fd.kind == "files" and fd.root == root and fd.paths == [root]
    sub = describe_dataset(Subset(ImageFolder(str(root)), [0, 2]))
    assert sub.kind == "files" and len(sub.paths) == 2

    class CifarLike(torch.utils.data.Dataset):  # torchvision CIFAR layout: ndarray `data`, list `targets`, `root`
        def __init__(self) -> None:
            self.root = str(tmp_path)
            self.data = np.zeros((5, 4, 4, 3), dtype=np.uint8)
            self.targets = [0, 1, 2, 1, 0]

        def __len__(self) -> int:
            return len(self.targets)

    cifar = describe_dataset(CifarLike())
    assert cifar.kind == "arrays" and cifar.targets.tolist() == [0, 1, 2, 1, 0] and cifar.root == tmp_path

    class Opaque(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return i

    assert describe_dataset(Opaque()).kind == "unknown"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sources": {"train": "s3://x"}}, r"`sources` has unknown context\(s\) \['train'\]; allowed: \['training'"),
        ({"names": ["a"]}, r"`names` must be a mapping from context to string.*got list"),
        ({"contexts": ["fit"]}, r"`contexts` must be a non-empty subset of \['training', 'validation', 'testing'\], got \['fit'\]"),
        ({"contexts": []}, r"`contexts` must be a non-empty subset"),
        ({"chunk_size_mb": 0}, r"`chunk_size_mb` must be a positive number of MiB, got 0"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DatasetLineageCallback(**kwargs)


# ------------------------------------------------------------------------------------------------
# a real fit
# ------------------------------------------------------------------------------------------------
def _image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"class_{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(d / f"{i:04d}.png")
    return root


class FolderDigits(pl.LightningDataModule):
    """Training data from PNG files (ImageFolder), validation/test data from in-memory tensors."""

    def __init__(self, root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        from torchvision.datasets import ImageFolder
        from torchvision import transforms as T

        # float images in [0, 1] with the transforms every supported torchvision has (v2.ToImage: 0.16)
        tf = T.Compose([T.Grayscale(), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])
        self.train_set = ImageFolder(str(root), transform=tf)
        self.val_set = TensorDataset(images[:32].float() / 255.0, labels[:32])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=16)


def _inputs(tracking_uri: str, run_id: str) -> dict[str, object]:
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    out = {}
    for di in run.inputs.dataset_inputs:
        ctx = next(t.value for t in di.tags if t.key == "mlflow.data.context")
        out[ctx] = di.dataset
    return out


def _trainer(logger: MLflowCVLogger, cb: DatasetLineageCallback) -> pl.Trainer:
    return pl.Trainer(
        logger=logger, callbacks=[cb], max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )


def test_fit_logs_inputs_digests_and_uses_the_cache(tmp_path: Path, tracking_uri: str, digits) -> None:
    images, labels = digits
    root = _image_folder(tmp_path / "digits_png", images[:24], labels[:24] % 3)
    cache = tmp_path / "cache.json"
    dm = FolderDigits(root, images, labels)
    source = "https://alice:pw-S3cret@data.example.com/digits/v1.tar"

    logger = MLflowCVLogger(experiment_name="lineage", tracking_uri=tracking_uri, flush_interval_s=0.5)
    cb = DatasetLineageCallback(cache_path=cache, sources={"validation": source}, names={"validation": "digits-val"})
    trainer = _trainer(logger, cb)
    trainer.fit(DigitsClassifier(), datamodule=dm)
    trainer.test(DigitsClassifier(), datamodule=dm, verbose=False)

    expected, _ = hash_path(root)
    run = mlflow.MlflowClient(tracking_uri).get_run(logger.run_id)
    assert run.data.params["training_dataset_sha256"] == expected
    assert cb.last_stats["training"].hashed_files == 24
    inputs = _inputs(tracking_uri, logger.run_id)
    assert set(inputs) == {"training", "validation", "testing"}
    train = inputs["training"]
    assert train.name == "digits_png" and train.digest == expected[:32]
    assert json.loads(train.source)["uri"] == str(root.resolve()) and train.source_type == "local"
    val = inputs["validation"]
    want = mlflow.data.from_numpy(dm.val_set.tensors[0].numpy(), targets=dm.val_set.tensors[1].numpy())
    assert val.name == "digits-val" and val.digest == want.digest and val.source_type == "http"
    assert "pw-S3cret" not in val.source and "data.example.com/digits/v1.tar" in val.source
    assert json.loads(val.profile)["features_shape"] == [32, 1, 8, 8]

    # a second run on the unchanged files reads nothing again; the digest is the same
    logger2 = MLflowCVLogger(experiment_name="lineage", tracking_uri=tracking_uri, flush_interval_s=0.5)
    cb2 = DatasetLineageCallback(cache_path=cache, contexts=["training"])
    _trainer(logger2, cb2).fit(DigitsClassifier(), datamodule=dm)
    assert cb2.last_stats["training"].hashed_files == 0 and cb2.last_stats["training"].cached_files == 24
    run2 = mlflow.MlflowClient(tracking_uri).get_run(logger2.run_id)
    assert run2.data.params["training_dataset_sha256"] == expected
    assert set(_inputs(tracking_uri, logger2.run_id)) == {"training"}


def test_state_dict_round_trip() -> None:
    cb = DatasetLineageCallback(cache_path=None)
    cb.logged = {"training": {"run_id": "r1", "sha256": "ab"}}
    other = DatasetLineageCallback(cache_path=None)
    other.load_state_dict(cb.state_dict())
    assert other.logged == cb.logged


def test_without_mlflow_logger_raises(digits) -> None:
    images, labels = digits
    dl = DataLoader(TensorDataset(images[:16].float() / 255, labels[:16]), batch_size=8)
    trainer = pl.Trainer(logger=False, callbacks=[DatasetLineageCallback(cache_path=None)], max_epochs=1,
                         limit_train_batches=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"DatasetLineageCallback needs an MLflowCVLogger.*found: none"):
        trainer.fit(DigitsClassifier(), train_dataloaders=dl)
