#!/usr/bin/env bash
# Compatibility leg (`make test-compat`): the package at the floor pyproject.toml admits (torch 2.0, torchvision 0.15,
# Lightning 2.2, torchmetrics 1.3.1, MLflow 2.4, onnx 1.15, onnxruntime 1.17, matplotlib 3.7, jsonargparse 4.27), the
# MLflow 2.22 client, and the MLflow 3 client of the main venv against a real MLflow 2.22 server. Each gets its own
# virtual environment, cached under $LMC_COMPAT_CACHE keyed by a hash of its slow pins (torch, MLflow) and Python
# (first build ~2-5 min each on a quiet machine, more on a loaded one; then reused, with changed test requirements
# installed incrementally). The package is imported from this checkout (PYTHONPATH), so a cached venv never holds a
# stale copy of it. Under CI (CI=true, as .ci/run sets) a skip fails unless the test needs a newer release than the
# floor's (tests/conftest.py: needs_newer); -ra lists those skips with the version and the reason.
set -euo pipefail
set -f  # requirement strings hold [extras] and <, > : no globbing
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MAIN_PY=${MAIN_PY:-.venv/bin/python}
CACHE=${LMC_COMPAT_CACHE:-$HOME/.cache/lightning_mlflow_cv/compat-venvs}
TORCH_PIN=${TORCH_PIN-torch==2.14.1 torchvision==0.29.1}
# the test tools and what the chosen tests import besides the core dependencies
TOOLS="pyyaml>=6 scikit-learn>=1.3 pycocotools>=2.0.7 psutil>=5.9 psycopg2-binary>=2.9 pytest>=8 pytest-timeout>=2.3
optuna>=3.5 optuna-integration>=4.0 captum>=0.7"
# the MLflow 2.22 client with the newest frameworks (pyproject's core dependencies); MLflow 2.x needs sqlalchemy<2.1
MLFLOW_222="mlflow==2.22.* sqlalchemy<2.1 $TORCH_PIN"
NEWEST="lightning>=2.2 torchmetrics>=1.3.1 onnx>=1.15 onnxruntime>=1.17 onnxscript>=0.1 matplotlib>=3.7
jsonargparse[signatures]>=4.27 $TOOLS"
# The floor: the lowest release of each core dependency pyproject.toml admits (README, "Versions"), plus the pins
# installing them today needs (MLflow 2.4: sqlalchemy<2.1, setuptools<81, pandas<2.2; torch 2.0: numpy<2). torch
# 2.0.1 is PyPI's CUDA build (the only one there). torchmetrics 1.3.0 is yanked on PyPI: 1.3.1 is the floor.
FLOOR="torch==2.0.1 torchvision==0.15.2 lightning==2.2.0 torchmetrics==1.3.1 mlflow==2.4.* sqlalchemy<2.1 setuptools<81
pandas<2.2 numpy<2"
FLOOR_REST="onnx==1.15.0 onnxruntime==1.17.0 matplotlib==3.7.5 jsonargparse[signatures]==4.27.0 $TOOLS"
# The MLflow 2.x clients through outages (the MLflow 3 client runs them in `make test`): server stopped mid-fit and
# restarted, unreachable for the whole fit then `sync`, a spool left behind delivered by the next logger, SIGKILL
# then resume.
OUTAGES="tests/test_logger_server.py::test_server_stopped_mid_fit_then_restarted_every_point_arrives
tests/test_logger_server.py::test_unreachable_for_the_whole_fit_then_sync_gives_the_same_run
tests/test_autosync.py::test_fit_ended_while_server_down_is_delivered_by_the_next_logger
tests/reliability/test_faults.py::test_sigkill_mid_fit_then_resume_continues_the_run_and_replays_the_spool"
# The floor's slow tests, beside every fast one: the outages, resume after SIGKILL (above), one DDP fit, the registry
# path (SQLite, and an MLflow 2.22 server without the logged-model API).
COMPAT_SERVER_TEST=tests/test_compat.py::test_register_promote_load_and_evaluate_without_logged_models
FLOOR_SLOW="$OUTAGES tests/test_ddp.py::test_ddp_creates_exactly_one_run_with_the_same_id_on_both_ranks
tests/callbacks/test_model_registry.py::test_register_serve_champion_matches_module"
# the MLflow 2.22 client: the fast logger tests and test_compat, and the outages
FAST_222="tests/test_logger.py tests/test_compat.py"
# this MLflow 3 client against the MLflow 2.22 server: the registry/evaluate test, and `sync` of an offline fit
SERVER_3="$COMPAT_SERVER_TEST tests/test_logger_server.py::test_unreachable_for_the_whole_fit_then_sync_gives_the_same_run"

venv() {  # venv NAME SLOW-PINS OTHER-REQUIREMENTS -> prints the venv's directory
    # The directory is keyed by the slow pins (torch alone is ~4 GB to install, MLflow brings many packages) and
    # Python; the other requirements are installed into it incrementally when they change.
    local name=$1 base=$2 other=$3
    local reqs="$base $other"
    local key want
    key=$(printf '%s %s' "$base" "$("$PYTHON" --version 2>&1)" | cksum | cut -d' ' -f1)
    want=$(printf '%s' "$reqs" | cksum | cut -d' ' -f1)
    local dir="$CACHE/$name-$key"
    local t0=$SECONDS
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"
        mkdir -p "$CACHE"
        "$PYTHON" -m venv "$dir" >&2
    elif [ "$(cat "$dir/.complete")" = "$want" ]; then
        echo "$dir"
        return
    fi
    # shellcheck disable=SC2086
    if ! "$dir/bin/pip" install -q $reqs > "$dir.pip.log" 2>&1; then
        tail -n 40 "$dir.pip.log" >&2
        echo "compat: installing into $dir failed (log: $dir.pip.log)" >&2
        return 1
    fi
    echo "$want" > "$dir/.complete"
    echo "compat: $dir ready in $((SECONDS - t0)) s" >&2
    echo "$dir"
}

t0=$SECONDS
venv mlflow222 "$MLFLOW_222" "$NEWEST" > /dev/null &  # both at once: the downloads and unpacking overlap
venv floor "$FLOOR" "$FLOOR_REST" > /dev/null &
wait
V222=$(venv mlflow222 "$MLFLOW_222" "$NEWEST")  # built now: just the path (fails here if a build failed)
VFLOOR=$(venv floor "$FLOOR" "$FLOOR_REST")
versions() {
    "$1" -c 'import importlib.metadata as m; print(", ".join(f"{d} {m.version(d)}" for d in
        ("torch", "torchvision", "lightning", "torchmetrics", "mlflow", "onnx", "onnxruntime")))' 2>/dev/null
}
echo "compat: venvs ready in $((SECONDS - t0)) s"
echo "compat: MLflow 2.22 leg: $(versions "$V222/bin/python")"
echo "compat: floor leg: $(versions "$VFLOOR/bin/python")"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST="-q -ra -p no:cacheprovider"
LOGS=$(mktemp -d)
status=0
run() {  # run LABEL PYTHON PYTEST-ARGS...
    local label=$1 py=$2; shift 2
    local t=$SECONDS
    echo "compat: == $label =="
    # shellcheck disable=SC2086
    "$py" -m pytest $PYTEST "$@" || status=1
    echo "compat: $label took $((SECONDS - t)) s"
}
FAST_M="not slow and not server and not ddp and not gpu"
# The two fast runs are independent and mostly single-threaded: side by side on two cores (outputs kept apart).
# Ray's sweep (tests/test_hpo_ray.py, all slow) runs in `make test`; its module needs ray to be collected.
(
    # shellcheck disable=SC2086
    run "floor, fast tests" "$VFLOOR/bin/python" tests -m "$FAST_M" --ignore=tests/test_hpo_ray.py
    exit $status
) > "$LOGS/floor-fast.log" 2>&1 &
floor_fast=$!
# shellcheck disable=SC2086
run "MLflow 2.22 client, fast tests" "$V222/bin/python" $FAST_222 -m "$FAST_M"
wait $floor_fast || status=1
cat "$LOGS/floor-fast.log"
# the tests below start servers and time outages: one at a time
# shellcheck disable=SC2086
run "floor, slow tests (outages, resume, DDP, registry)" "$VFLOOR/bin/python" $FLOOR_SLOW
LMC_TEST_SERVER_MLFLOW="$V222/bin/mlflow" run "floor client against an MLflow 2.22 server" "$VFLOOR/bin/python" \
    "$COMPAT_SERVER_TEST"
# shellcheck disable=SC2086
run "MLflow 2.22 client through outages" "$V222/bin/python" $OUTAGES
run "MLflow 2.22 client against its MLflow 2.22 server" "$V222/bin/python" "$COMPAT_SERVER_TEST"
# shellcheck disable=SC2086
LMC_TEST_SERVER_MLFLOW="$V222/bin/mlflow" run "MLflow 3 client against an MLflow 2.22 server" "$MAIN_PY" $SERVER_3
rm -rf "$LOGS"
echo "compat: leg took $((SECONDS - t0)) s"
exit $status
