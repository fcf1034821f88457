"""Gates, champion/challenger promotion and the promote command, on a real SQLite registry."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv.cli import promote_main
from lightning_mlflow_cv.promotion import (
    Gate,
    compare,
    evaluate_gates,
    parse_gate,
    parse_gate_expr,
    parse_gates,
    promote,
    with_decision,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One real SQLite store for the module (creating one costs seconds); each test has its own model name."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'store.db'}"


@pytest.fixture
def tracking_uri(store) -> str:
    return store


@pytest.fixture
def name(request) -> str:
    return "m-" + request.node.name.replace("[", "-").replace("]", "")


# ------------------------------------------------------------------------------------------------
# pure gate logic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "op", "threshold"),
    [(">=0.85", ">=", 0.85), ("<= 50", "<=", 50.0), (">1e-3", ">", 1e-3), ("<.5", "<", 0.5), ("==1", "==", 1.0), ("!=-2", "!=", -2.0)],
)
def test_parse_gate(spec, op, threshold):
    g = parse_gate("val/acc", spec)
    assert (g.metric, g.op, g.threshold) == ("val/acc", op, threshold)


@pytest.mark.parametrize("spec", ["0.85", "=>0.85", ">= abc", "", "≥0.9", None, True, ">=0.8 and <=0.9"])
def test_parse_gate_rejects_unparseable(spec):
    with pytest.raises(ValueError, match=r"gate for 'val/acc': cannot parse .* e\.g\. "):
        parse_gate("val/acc", spec)


def test_parse_gates_mapping_and_errors():
    assert parse_gates(None) == []
    assert parse_gates({"a": ">=1", "b": "<2"}) == [Gate("a", ">=", 1.0), Gate("b", "<", 2.0)]
    assert parse_gates([Gate("a", ">=", 1.0)]) == [Gate("a", ">=", 1.0)]  # parsed gates (the callback's, the CLI's)
    with pytest.raises(ValueError, match="gates must be a mapping of metric name"):
        parse_gates([">=1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric name must be a non-empty string"):
        parse_gates({"": ">=1"})


def test_parse_gate_expr():
    assert parse_gate_expr("val/acc>=0.9") == Gate("val/acc", ">=", 0.9)
    assert parse_gate_expr(" latency/torch/p95_ms <= 50 ") == Gate("latency/torch/p95_ms", "<=", 50.0)
    with pytest.raises(ValueError, match=r"cannot parse 'val/acc~0\.9'.*--gate 'val/acc>=0\.9'"):
        parse_gate_expr("val/acc~0.9")


def test_evaluate_gates_pass_fail_missing():
    results = evaluate_gates(
        parse_gates({"val/acc": ">=0.9", "latency/torch/p95_ms": "<=50", "val/f1": ">=0.5", "val/nan": ">=0"}),
        {"val/acc": 0.93, "latency/torch/p95_ms": 70.0, "val/nan": math.nan},
    )
    by = {r.metric: r for r in results}
    assert by["val/acc"].passed and by["val/acc"].reason.startswith("pass: 0.93 >= 0.9")
    assert not by["latency/torch/p95_ms"].passed and by["latency/torch/p95_ms"].reason.startswith("fail: 70 <= 50")
    assert not by["val/f1"].passed and by["val/f1"].value is None
    assert "missing: metric 'val/f1' was not logged" in by["val/f1"].reason
    assert not by["val/nan"].passed  # NaN never passes


def test_compare_rule():
    assert compare(0.93, 0.90, "max", 0.01)[0]
    assert not compare(0.905, 0.90, "max", 0.01)[0]
    assert compare(10.0, 12.0, "min", 1.0)[0]
    assert not compare(11.5, 12.0, "min", 1.0)[0]
    assert not compare(None, 0.9)[0]
    assert compare(0.5, None)[0]


# ------------------------------------------------------------------------------------------------
# promote on a real registry
# ------------------------------------------------------------------------------------------------
def _version(client: MlflowClient, name: str, metrics: dict[str, float]) -> tuple[str, str]:
    """A run with ``metrics`` and a registered version of name from it: (version, run id)."""
    exp = client.get_experiment_by_name("reg") or client.get_experiment(client.create_experiment("reg"))
    run = client.create_run(exp.experiment_id)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version), run.info.run_id


def _champion(client: MlflowClient, name: str) -> str | None:
    """The champion's version, None only when the alias is not set (a store error fails the test)."""
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except mlflow.exceptions.MlflowException as err:
        if "alias champion not found" in str(err):
            return None
        raise


def test_promote_champion_challenger(name, tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.90, "latency/torch/p95_ms": 5.0})
    kw = dict(gates={"val/acc": ">=0.85", "latency/torch/p95_ms": "<=50"}, compare_metric="val/acc", min_improvement=0.01,
              tracking_uri=tracking_uri)
    d1 = promote(name, v1, **kw)
    assert d1.promoted and d1.previous_champion is None and "no champion yet" in d1.reason
    assert _champion(client, name) == v1

    # a worse challenger does not replace the champion; the decision is recorded on it
    v2, _ = _version(client, name, {"val/acc": 0.88, "latency/torch/p95_ms": 5.0})
    d2 = promote(name, v2, **kw)
    assert not d2.promoted and d2.gates_passed
    assert "does not improve enough" in d2.reason
    assert _champion(client, name) == v1
    mv2 = client.get_model_version(name, v2)
    assert mv2.tags["decision"] == "rejected"
    assert mv2.tags["decision.previous_champion"] == v1
    assert mv2.tags["compare.candidate"] == "0.88" and mv2.tags["compare.champion"] == "0.9"
    assert mv2.tags["gate.val/acc"].startswith("pass")
    assert "NOT PROMOTED" in mv2.description and "| `val/acc >= 0.85` | 0.88 | pass |" in mv2.description

    # improving by less than min_improvement is not enough; by more, it is
    v3, _ = _version(client, name, {"val/acc": 0.905, "latency/torch/p95_ms": 5.0})
    assert not promote(name, v3, **kw).promoted
    v4, run4 = _version(client, name, {"val/acc": 0.95, "latency/torch/p95_ms": 5.0})
    d4 = promote(name, run4, **kw)  # candidate named by its run id
    assert d4.promoted and d4.version == v4 and d4.previous_champion == v1
    assert _champion(client, name) == v4
    assert "champion" not in client.get_model_version(name, v1).aliases  # exactly one champion
    assert client.get_model_version(name, v4).tags["decision"] == "promoted"


def test_promote_gate_fail_and_missing_metric(name, tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.80})
    d = promote(name, v1, gates={"val/acc": ">=0.85", "latency/torch/p95_ms": "<=50"}, tracking_uri=tracking_uri)
    assert not d.promoted and _champion(client, name) is None
    assert "val/acc (fail: 0.8 >= 0.85)" in d.reason
    assert "latency/torch/p95_ms (missing: metric 'latency/torch/p95_ms' was not logged" in d.reason
    tags = client.get_model_version(name, v1).tags
    assert tags["gate.latency/torch/p95_ms"].startswith("missing")
    assert tags["decision.gates_passed"] == "false"


def test_promote_description_keeps_prefix_and_replaces_old_decision(name, tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.80})
    promote(name, v1, gates={"val/acc": ">=0.85"}, tracking_uri=tracking_uri, description_prefix="# Model card")
    promote(name, v1, gates={"val/acc": ">=0.5"}, tracking_uri=tracking_uri)
    desc = client.get_model_version(name, v1).description
    assert desc.count("## Promotion decision") == 1 and "**PROMOTED**" in desc and desc.rstrip().endswith("# Model card")
    # the registry's Description column shows the verdict first, no raw marker (issue 16)
    assert with_decision(None, promote(name, v1, tracking_uri=tracking_uri)).startswith("**PROMOTED** to `@champion`")
    assert desc.startswith("**PROMOTED**") and "<!--" not in desc.split("\n", 1)[0]


def test_promote_errors(name, tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.9})
    with pytest.raises(ValueError, match="has no version 99"):
        promote(name, "99", tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="has no version from run 'deadbeef'"):
        promote(name, "deadbeef", tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="`compare_mode` must be 'max' or 'min', got 'up'"):
        promote(name, v1, compare_mode="up", tracking_uri=tracking_uri)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`min_improvement` must be a number >= 0, got -1"):
        promote(name, v1, min_improvement=-1, tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="cannot parse 'high'"):
        promote(name, v1, gates={"val/acc": "high"}, tracking_uri=tracking_uri)


def test_no_champion_means_the_alias_is_not_set(name, tracking_uri):
    from lightning_mlflow_cv.promotion import _alias_version

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.9})
    assert _alias_version(client, name, "champion") is None  # the model exists, the alias does not
    d = promote(name, v1, compare_metric="val/acc", tracking_uri=tracking_uri)
    assert d.promoted and d.previous_champion is None and d.comparison == "no champion yet"


@pytest.mark.server
@pytest.mark.slow
def test_a_store_error_reading_the_champion_is_raised_not_taken_for_no_champion(name, mlflow_server, monkeypatch):
    """A failing alias lookup (here a real `mlflow server` behind a proxy answering 500 for it) must not read as
    "no champion yet": that would move the alias to a worse candidate."""
    from faults import FaultProxy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the 500 is final; no minutes of retries
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    v1, _ = _version(client, name, {"val/acc": 0.95})
    v2, _ = _version(client, name, {"val/acc": 0.80})
    assert promote(name, v1, compare_metric="val/acc", tracking_uri=mlflow_server.uri).promoted
    with FaultProxy(mlflow_server.uri) as proxy:
        proxy.error_if = lambda method, path: "/registered-models/alias" in path and method == "GET"
        with pytest.raises(mlflow.exceptions.MlflowException, match="500 error responses"):
            promote(name, v2, compare_metric="val/acc", tracking_uri=proxy.uri)
        assert proxy.hits["error"] >= 1
    assert _champion(client, name) == v1  # the worse candidate did not take the alias
    assert "decision" not in client.get_model_version(name, v2).tags


def test_promote_with_legacy_stages(name, tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.90})
    v2, _ = _version(client, name, {"val/acc": 0.95})
    promote(name, v1, compare_metric="val/acc", tracking_uri=tracking_uri, use_stages=True)
    promote(name, v2, compare_metric="val/acc", tracking_uri=tracking_uri, use_stages=True)
    assert client.get_model_version(name, v2).current_stage == "Production"
    assert client.get_model_version(name, v1).current_stage == "Archived"
    assert _champion(client, name) == v2


def test_promote_cli_exit_codes(name, tracking_uri, capsys):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.90})
    v2, _ = _version(client, name, {"val/acc": 0.80})
    base = ["--model-name", name, "--tracking-uri", tracking_uri, "--compare-metric", "val/acc"]
    assert promote_main([*base, "--candidate", v1, "--gate", "val/acc>=0.85"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] is True and out["version"] == v1
    assert promote_main([*base, "--candidate", v2, "--gate", "val/acc>=0.5"]) == 1  # worse than champion
    assert json.loads(capsys.readouterr().out)["promoted"] is False
    assert promote_main([*base, "--candidate", "42"]) == 2
    assert "has no version 42" in capsys.readouterr().err
    assert promote_main([*base, "--candidate", v2, "--gate", "val/acc=>0.5"]) == 2
    assert "cannot parse 'val/acc=>0.5'" in capsys.readouterr().err
    assert promote_main(["--candidate", v2]) == 2  # argparse: --model-name is required
    assert _champion(client, name) == v1


def test_promote_console_script(name, tracking_uri, capsys):
    from lightning_mlflow_cv.cli import main

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    v1, _ = _version(client, name, {"val/acc": 0.7})
    rc = main(["promote", "-m", name, "-c", v1, "-g", "val/acc>=0.9", "--tracking-uri", tracking_uri])
    assert rc == 1
    assert json.loads(capsys.readouterr().out)["reason"].startswith("failed gates: val/acc")
