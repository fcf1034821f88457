"""ModelRegistryCallback end to end: real digits fits, a real SQLite registry, the served pyfunc model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow import MlflowClient
from mlflow.pyfunc.scoring_server import predictions_to_json
from mlflow.types.schema import DataType
from torch.utils.data import DataLoader, TensorDataset

from conftest import refused_port

from lightning_mlflow_cv import MLflowCVLogger
from lightning_mlflow_cv._compat import mlflow_api as _compat
from lightning_mlflow_cv._compat import frameworks as _compat_frameworks
from lightning_mlflow_cv._shipping import packaging as _packaging
from lightning_mlflow_cv._shipping import pyfunc as _pyfunc
from lightning_mlflow_cv._shipping.model_card import model_card_markdown
from lightning_mlflow_cv.callbacks.cv_metrics import CVMetricsCallback
from lightning_mlflow_cv.callbacks.model_registry import ModelRegistryCallback
from lightning_mlflow_cv.demos.digits import DIGITS_MEAN, DIGITS_STD, DigitsClassifier, DigitsDataModule, load_digits_tensors
from lightning_mlflow_cv.evaluation import evaluate

SHA = "a" * 64
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry_cb') / 'store.db'}"


@pytest.fixture
def uri(store, monkeypatch) -> str:
    """The module's SQLite store, also as MLflow's tracking URI (what `models:/` loading uses)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    yield store
    mlflow.set_tracking_uri(None)


class LogAtEnd(Callback):
    """Logs a lineage param at fit start and chosen metrics when training ends (before the registry reads)."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def on_fit_start(self, trainer, pl_module):
        trainer.logger.log_params_dict({"training_dataset_sha256": SHA, "dataset_name": "sklearn-digits"})

    def on_train_end(self, trainer, pl_module):
        trainer.logger.log_metrics(self.metrics, step=trainer.global_step)


def _fit(uri, registry, metrics=None, steps=2, epochs=1, checkpoint=False, logger=None):
    pl.seed_everything(0)
    logger = logger or MLflowCVLogger(experiment_name="registry", tracking_uri=uri, flush_interval_s=0.5)
    cbs = [LogAtEnd(metrics or {}), registry]
    if checkpoint:
        cbs.append(ModelCheckpoint(monitor="val/acc", mode="max", dirpath="ckpt"))
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=steps, limit_val_batches=2, logger=logger, callbacks=cbs,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=".",
        enable_checkpointing=checkpoint, log_every_n_steps=1,
    )
    dm = DigitsDataModule(batch_size=32, augment=False)
    model = DigitsClassifier()
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm, logger


@pytest.mark.slow
def test_register_serve_champion_matches_module(uri):
    reg = ModelRegistryCallback(
        "digits-e2e",
        gates={"val/acc": ">=0.2"},
        compare_metric="val/acc",
        model_card={"intended_use": "Demo of 8x8 digits.", "limitations": "Grayscale 8x8 only.", "Owner": "team-cv"},
        class_names=DIGIT_NAMES,
    )
    trainer, _, dm, logger = _fit(uri, reg, steps=8, epochs=2, checkpoint=True)
    assert reg.decision is not None and reg.decision.promoted, reg.decision
    assert reg.version == "1"

    # served with no user code, raw uint8 NHWC in, probabilities out, equal to the module's own predictions
    served = mlflow.pyfunc.load_model("models:/digits-e2e@champion")
    images = dm.val_set.images[:16]  # uint8 (N, 1, 8, 8)
    raw = images.permute(0, 2, 3, 1).numpy()  # NHWC
    table = served.predict(raw)
    # one probability column per class name: in the served output, the output schema and what a server answers
    assert list(table.columns) == DIGIT_NAMES and set(table.dtypes) == {np.dtype(np.float32)}
    outputs = served.metadata.get_output_schema()
    assert outputs.input_names() == DIGIT_NAMES and outputs.input_types() == [DataType.float] * 10
    answer = io.StringIO()
    predictions_to_json(table, answer)  # what `mlflow models serve` sends back
    assert set(json.loads(answer.getvalue())["predictions"][0]) == set(DIGIT_NAMES)
    probs = table.to_numpy()
    best = DigitsClassifier()
    best.load_state_dict(torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"])
    best.eval()
    mean, std = torch.tensor(DIGITS_MEAN).view(1, -1, 1, 1), torch.tensor(DIGITS_STD).view(1, -1, 1, 1)
    expected = best((images.float() / 255 - mean) / std).softmax(-1).detach().numpy()
    assert probs.shape == (16, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert (probs.argmax(1) == expected.argmax(1)).all()
    # any size: a 16x16 upscale is resized back to 8x8 before the network
    big = np.repeat(np.repeat(raw, 2, axis=1), 2, axis=2)
    assert served.predict(big).shape == (16, 10)
    with pytest.raises(Exception, match="uint8"):
        served.predict(raw.astype(np.float32))  # the signature takes raw uint8 images

    # signature and input example are raw uint8 images; nothing pickled inside the model
    inputs = served.metadata.get_input_schema().inputs[0]
    assert inputs.type == np.dtype("uint8") and inputs.shape == (-1, -1, -1, 1)
    client = MlflowClient(uri)
    mv = client.get_model_version("digits-e2e", "1")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/digits-e2e/1"))
    files = {p.name: p for p in local.rglob("*") if p.is_file()}
    # pt2 where torch has torch.export (2.2), else ONNX (one warning); MLflow < 2.13 keeps them in its data_path
    network = "network.pt2" if _compat_frameworks.has_torch_export() else "network.onnx"
    assert {network, "preprocess.json", "MODEL_CARD.md", "lmc_pyfunc.py", "input_example.json"} <= set(files)
    assert not [n for n in files if n.endswith((".pkl", ".pickle"))]
    assert json.loads(files["preprocess.json"].read_text())["layout"] == "NHWC"
    assert served.metadata.metadata["class_names"] == DIGIT_NAMES  # in the MLmodel file

    # registry records: aliases, decision tags, description = decision + model card
    assert set(mv.aliases) == {"challenger", "champion"}
    logged_models = _compat.has_logged_model_api()  # MLflow 3; a 2.x client registers the run artifact
    if logged_models:
        assert mv.source == f"models:/{reg.model_id}" and mv.run_id == logger.run_id  # linked to the LoggedModel
    else:
        assert mv.source == f"runs:/{logger.run_id}/model" and reg.model_id is None and mv.tags["lmc.model_source"]
    assert mv.tags["decision"] == "promoted" and mv.tags["gate.val/acc"].startswith("pass")
    assert "## Promotion decision" in mv.description and "# Model card: digits-e2e" in mv.description
    for text in ("Demo of 8x8 digits.", "Grayscale 8x8 only.", f"`training_dataset_sha256`: `{SHA}`", "## Owner",
                 "| `val/acc` |", "torch: ", "mlflow: ", "Training: cpu"):
        assert text in mv.description, text
    run = client.get_run(logger.run_id)
    assert run.data.tags["registry.status"] == "registered" and run.data.tags["registry.version"] == "1"
    assert "MODEL_CARD.md" in [f.path for f in client.list_artifacts(logger.run_id)]
    assert len(client.get_metric_history(logger.run_id, "val/acc")) == 2
    if logged_models:
        assert reg.model_id in [o.model_id for o in run.outputs.model_outputs]
        # the LoggedModel lists the run's final metrics (the model page's "Metrics"), the run's history unchanged
        model_metrics = {m.key: m for m in client.get_logged_model(reg.model_id).metrics or []}
        assert "val/acc" in model_metrics, sorted(model_metrics)
        assert model_metrics["val/acc"].value == run.data.metrics["val/acc"]
        assert not [k for k in model_metrics if k.startswith("system/")]
        # the LoggedModel links back to its version, as mlflow.register_model leaves it (the UI's "Registered")
        linked = json.loads(client.get_logged_model(reg.model_id).tags["mlflow.modelVersions"])
        assert [(e["name"], str(e["version"])) for e in linked] == [("digits-e2e", "1")]
    # the run page's description: the gate/compare metrics and the promotion outcome
    note = run.data.tags["mlflow.note.content"]
    assert "| `val/acc` |" in note and "promoted to @champion (models:/digits-e2e/1)" in note

    # the model carries its own code: it serves where lightning_mlflow_cv cannot be imported
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'lightning_mlflow_cv': raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mlflow, numpy as np\n"
        "p = mlflow.pyfunc.load_model('models:/digits-e2e@champion').predict(np.load('raw.npy'))\n"
        "np.save('out.npy', p)\n"
    )
    np.save("raw.npy", raw)
    subprocess.run([sys.executable, "-c", blocker], check=True, capture_output=True, timeout=120)
    np.testing.assert_allclose(np.load("out.npy"), probs, atol=1e-6)

    # after trainer.test the test metrics join the LoggedModel's metrics too
    trainer.test(ckpt_path="best", datamodule=dm, verbose=False)
    if logged_models:
        assert "test/acc" in {m.key for m in client.get_logged_model(reg.model_id).metrics or []}

    # evaluate: the champion over the test split, in MLflow's evaluation view
    metrics = evaluate("models:/digits-e2e@champion", dm.test_dataloader())
    assert 0.0 <= metrics["accuracy_score"] <= 1.0 and 0.0 <= metrics["roc_auc_macro"] <= 1.0
    assert {"precision_score", "recall_score", "f1_score"} <= set(metrics)
    assert "eval/predictions.json" in [f.path for f in client.list_artifacts(logger.run_id, "eval")]


def test_champion_challenger_and_missing_gate_through_fits(uri):
    def reg(**kw):
        return ModelRegistryCallback("digits-cc", compare_metric="quality", min_improvement=0.01, **kw)

    client = MlflowClient(uri)
    champion = lambda: str(client.get_model_version_by_alias("digits-cc", "champion").version)  # noqa: E731
    first = reg(gates={"quality": ">=0.5"})
    _fit(uri, first, {"quality": 0.90})
    assert first.decision.promoted and champion() == "1"

    worse = reg(gates={"quality": ">=0.5"})
    _fit(uri, worse, {"quality": 0.80})
    assert not worse.decision.promoted and champion() == "1"
    v2 = client.get_model_version("digits-cc", "2")
    assert v2.aliases == ["challenger"] and v2.tags["decision"] == "rejected"
    assert v2.tags["compare.champion"] == "0.9" and v2.tags["decision.previous_champion"] == "1"

    missing = reg(gates={"quality": ">=0.5", "latency/torch/p95_ms": "<=50"})  # no latency callback: metric missing
    _fit(uri, missing, {"quality": 0.99})
    assert not missing.decision.promoted and champion() == "1"
    assert client.get_model_version("digits-cc", "3").tags["gate.latency/torch/p95_ms"].startswith("missing")

    better = reg(gates={"quality": ">=0.5"}, use_stages=True)
    _fit(uri, better, {"quality": 0.95})
    assert better.decision.promoted and champion() == "4"
    assert "champion" not in client.get_model_version("digits-cc", "1").aliases
    assert client.get_model_version("digits-cc", "4").current_stage == "Production"


def test_onnx_network_inside_the_pyfunc(uri):
    reg = ModelRegistryCallback("digits-onnx", network_format="onnx", preprocess={"mean": DIGITS_MEAN, "std": DIGITS_STD})
    _, model, dm, _ = _fit(uri, reg)
    assert reg.decision.promoted  # no gates, no champion yet
    served = mlflow.pyfunc.load_model("models:/digits-onnx@champion")
    images = dm.val_set.images[:4]
    expected = model.cpu().eval()((images.float() / 255 - DIGITS_MEAN[0]) / DIGITS_STD[0]).softmax(-1).detach().numpy()
    np.testing.assert_allclose(served.predict(images.permute(0, 2, 3, 1).numpy()), expected, atol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts("models:/digits-onnx@champion"))
    # models from code keep it under artifacts/, MLflow < 2.13's loader_module under its data_path
    assert [p.relative_to(local).parts[-1] for p in local.rglob("network.*")] == ["network.onnx"]
    assert "onnxruntime==" in (local / "requirements.txt").read_text()


def test_tracking_failure_keeps_model_on_disk_and_fit_finishes(tmp_path):
    with refused_port() as port:
        logger = MLflowCVLogger(
            experiment_name="down", tracking_uri=f"http://127.0.0.1:{port}", request_timeout_s=0.5, finalize_timeout_s=1
        )
        reg = ModelRegistryCallback("digits-down")
        with pytest.warns(RuntimeWarning, match=r"registering 'digits-down' failed .* The saved model is kept in"):
            trainer, *_ = _fit(None, reg, logger=logger)
    assert trainer.state.finished and reg.version is None
    assert reg.kept_model_dir is not None and Path(reg.kept_model_dir).is_relative_to(tmp_path)
    # what is kept is a complete MLflow model: it serves without any store
    served = mlflow.pyfunc.load_model(str(reg.kept_model_dir / "model"))
    images, _ = load_digits_tensors()
    assert served.predict(images[:3].permute(0, 2, 3, 1).numpy()).shape == (3, 10)


def test_needs_normalisation_before_training(uri):
    x = torch.randn(8, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    logger = MLflowCVLogger(experiment_name="nonorm", tracking_uri=uri)
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[ModelRegistryCallback("m")], enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"ModelRegistryCallback: no normalisation known: pass preprocess="):
        trainer.fit(DigitsClassifier(), train_dataloaders=loader)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"registered_model_name": ""}, r"`registered_model_name` must be a non-empty string"),
        ({"registered_model_name": "a/b"}, r"cannot contain '/' or ':' .* got 'a/b'"),
        ({"postprocess": "argmax"}, r"`postprocess` must be one of \('softmax', 'sigmoid', 'masks', 'boxes', 'instances', 'anomaly', 'depth', 'none'\), got 'argmax'"),
        ({"alias": "champion"}, r"`alias` and `champion_alias` must differ"),
        ({"alias": "a b"}, r"`alias` must be an alias of letters, digits"),
        ({"gates": {"val/acc": "0.9"}}, r"`gates`: gate for 'val/acc': cannot parse '0.9'"),
        ({"compare_mode": "higher"}, r"`compare_mode` must be 'max' or 'min', got 'higher'"),
        ({"min_improvement": -0.1}, r"`min_improvement` must be a number >= 0, got -0.1"),
        ({"model_card": "demo"}, r"`model_card` must map section names to text"),
        ({"network_format": "pickle"}, r"`network_format` must be 'pt2' or 'onnx', got 'pickle'"),
        ({"preprocess": {"mean": [0.5]}}, r"needs both 'mean' and 'std'"),
        ({"preprocess": {"mean": 0.5, "std": 0}}, r"`preprocess\['std'\]` must be > 0"),
        ({"preprocess": {"layout": "HWC"}}, r"`preprocess\['layout'\]` must be one of \('NHWC', 'NCHW'\), got 'HWC'"),
        ({"preprocess": {"size": (8,)}}, r"`preprocess\['size'\]` must be \(H, W\)"),
        ({"preprocess": {"scale": 1}}, r"unknown keys \['scale'\]"),
        ({"class_names": ["cat", "cat"]}, r"`class_names` must be a list of distinct names, one per class id, got \['cat', 'cat'\]"),
        ({"class_names": "cat,dog"}, r"`class_names` must be a list of distinct names, one per class id, got 'cat,dog'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = {"registered_model_name": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        ModelRegistryCallback(**kwargs)


# ------------------------------------------------------------------------------------------------
# pure parts: the model card and the pyfunc's pre/post-processing
# ------------------------------------------------------------------------------------------------
def test_model_card_markdown():
    text = model_card_markdown(
        "m", run_id="r1", weights="final weights", intended_use=None, limitations="small",
        metrics={"val/acc": 0.5}, params={"training_dataset_sha256": SHA, "lr": "0.1"}, tags={"hardware": "cpu"},
        datasets=[("digits", "d1g3st", "training")], versions={"torch": "2"},
    )
    assert "_Not stated. Pass `model_card={'intended_use': '...'}`" in text
    assert "dataset `digits` (training), digest `d1g3st`" in text and f"`training_dataset_sha256`: `{SHA}`" in text
    assert "lr" not in text and "| `val/acc` | 0.5 |" in text and "- torch: 2" in text


def test_preprocess_layouts_and_resize():
    raw = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    a = _pyfunc.preprocess(raw, [0, 0, 0], [1, 1, 1], None, "NHWC", 3)
    b = _pyfunc.preprocess(raw.transpose(0, 3, 1, 2), [0, 0, 0], [1, 1, 1], None, "NCHW", 3)
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b) and float(a.max()) == pytest.approx(95 / 255)
    gray = _pyfunc.preprocess(np.full((1, 6, 6), 255, np.uint8), [0.5], [0.5], [3, 3], "NHWC", 1)
    assert gray.shape == (1, 1, 3, 3) and torch.allclose(gray, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"expected 3 channel\(s\) in layout NHWC"):
        _pyfunc.preprocess(raw[..., :1], [0] * 3, [1] * 3, None, "NHWC", 3)
    with pytest.raises(ValueError, match="expected a batch of images"):
        _pyfunc.preprocess(np.zeros(5, np.uint8), [0], [1], None, "NHWC", 1)


def test_postprocess_masks_and_boxes_with_nms():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 5
    masks = _pyfunc.postprocess(logits, "masks")
    assert masks.dtype == np.int64 and masks.tolist() == [[[2, 0], [0, 0]]]
    # two overlapping boxes of class 1 (NMS keeps the higher score), one of class 0, one below threshold
    out = torch.tensor([[
        [0, 0, 10, 10, -9, 3.0],
        [1, 1, 10, 10, -9, 2.0],
        [0, 0, 10, 10, 1.0, -9],
        [20, 20, 30, 30, -9, -9],
    ]])
    (det,) = _pyfunc.postprocess(out, "boxes", {"score_threshold": 0.05, "iou_threshold": 0.5})
    assert det["labels"].tolist() == [1, 0]
    np.testing.assert_allclose(det["scores"], torch.tensor([3.0, 1.0]).sigmoid().numpy(), rtol=1e-6)
    assert det["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10]]
    probs = _pyfunc.postprocess(torch.tensor([[0.0, 0.0]]), "softmax", {"class_names": ["cat", "dog"]})
    assert probs.to_dict("records") == [{"cat": 0.5, "dog": 0.5}]
    assert _pyfunc.postprocess(torch.tensor([[0.0]]), "sigmoid").to_dict("records") == [{"0": 0.5}]  # ids unnamed


def test_class_names_must_fit_the_network_classes():
    table = _pyfunc.postprocess(torch.zeros(2, 3), "softmax", {"class_names": ["a", "b"]})
    assert list(table.columns) == ["0", "1", "2"]  # names that do not fit are not used to label the columns
    with pytest.raises(ValueError, match=r"`class_names` has 2 names \(\['a', 'b'\]...\) but the network outputs 3 classes"):
        _packaging.check_class_names({"postprocess": "softmax", "class_names": ["a", "b"]}, table)
    with pytest.raises(ValueError, match=r"`class_names` must be distinct .* got \['a', 'a', 'b'\]"):
        _packaging.check_class_names({"postprocess": "softmax", "class_names": ["a", "a", "b"]}, table)
    _packaging.check_class_names({"postprocess": "softmax", "class_names": ["a", "b", "c"]}, table)


def test_class_names_default_to_the_metrics_callback_names():
    """Named once on CVMetricsCallback (as a YAML config does), the served columns use the same names."""
    metrics = CVMetricsCallback(task="classification", num_classes=3, class_names=["cat", "dog", "bird"])
    trainer = pl.Trainer(callbacks=[metrics], logger=False, enable_progress_bar=False)
    assert ModelRegistryCallback("m")._class_names(trainer) == ["cat", "dog", "bird"]
    assert ModelRegistryCallback("m", class_names=["x", "y", "z"])._class_names(trainer) == ["x", "y", "z"]
    assert ModelRegistryCallback("m")._class_names(pl.Trainer(logger=False)) is None
