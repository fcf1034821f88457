#!/usr/bin/env bash
# Compatibility leg (`make test-compat`): the package with MLflow 2.22 and 2.4 as the client, and the MLflow 3
# client of the main venv against a real MLflow 2.22 server. Each MLflow gets its own virtual environment, cached
# under $LMC_COMPAT_CACHE keyed by a hash of MLflow's pins, torch and Python (first build ~5 min each on a quiet
# machine, ~19 min on a loaded one; then reused, with changed test requirements installed incrementally).
# The package is imported from this checkout (PYTHONPATH), so a cached venv never holds a stale copy of it.
set -euo pipefail
set -f  # requirement strings hold [extras] and <, > : no globbing
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MAIN_PY=${MAIN_PY:-.venv/bin/python}
CACHE=${LMC_COMPAT_CACHE:-$HOME/.cache/lightning_mlflow_cv/compat-venvs}
TORCH_PIN=${TORCH_PIN-torch==2.14.1 torchvision==0.29.1}
# what the chosen tests import (pyproject's core dependencies and the test tools), without MLflow
COMMON="lightning>=2.2 torchmetrics>=1.3 onnx>=1.15 onnxruntime>=1.17 onnxscript>=0.1 matplotlib>=3.7 pyyaml>=6
jsonargparse[signatures]>=4.27 scikit-learn>=1.3 pycocotools>=2.0.7 pytest>=8 pytest-timeout>=2.3"
# the pins old MLflow releases need today (README, "MLflow versions")
MLFLOW_222="mlflow==2.22.* sqlalchemy<2.1"
MLFLOW_24="mlflow==2.4.* sqlalchemy<2.1 setuptools<81"
# Lean on purpose (the whole CI stays well inside its limit): the fast logger tests (images, artifacts, spool,
# status) and test_compat under both old clients; datasets, the registry, `promote` and `pipeline_run` under the
# oldest; and the end-to-end registry + evaluate test (tests/test_compat.py) against an MLflow 2.22 server.
FAST_222="tests/test_logger.py tests/test_compat.py"
FAST_24="tests/test_logger.py tests/test_compat.py tests/callbacks/test_dataset_lineage.py tests/test_promotion.py
tests/test_pipeline.py"
COMPAT_SERVER_TEST=tests/test_compat.py::test_register_promote_load_and_evaluate_without_logged_models
# this MLflow 3 client against the MLflow 2.22 server: the registry/evaluate test, and `sync` of an offline fit
SERVER_3="$COMPAT_SERVER_TEST tests/test_logger_server.py::test_unreachable_for_the_whole_fit_then_sync_gives_the_same_run"

venv() {  # venv NAME MLFLOW-REQUIREMENTS... -> prints the venv's directory
    # The directory is keyed by MLflow's pins, torch and Python (the slow part: torch alone is ~4 GB to
    # install); the other requirements are installed into it incrementally when they change.
    local name=$1; shift
    local base="$* $TORCH_PIN"
    local reqs="$base $COMMON"
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
venv mlflow222 $MLFLOW_222 > /dev/null &  # both at once: the downloads and unpacking overlap
venv mlflow24 $MLFLOW_24 > /dev/null &
wait
V222=$(venv mlflow222 $MLFLOW_222)  # built now: just the path (fails here if a build failed)
V24=$(venv mlflow24 $MLFLOW_24)
echo "compat: venvs ready in $((SECONDS - t0)) s ($("$V222/bin/python" -c 'import mlflow; print(mlflow.__version__)'), $("$V24/bin/python" -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null))"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST="-q -ra -p no:cacheprovider"
status=0
run() {  # run LABEL PYTHON PYTEST-ARGS...
    local label=$1 py=$2; shift 2
    local t=$SECONDS
    echo "compat: == $label =="
    # shellcheck disable=SC2086
    "$py" -m pytest $PYTEST "$@" || status=1
    echo "compat: $label took $((SECONDS - t)) s"
}
FAST_M="not slow and not server and not ddp"
# shellcheck disable=SC2086
run "MLflow 2.22 client, fast tests" "$V222/bin/python" $FAST_222 -m "$FAST_M"
run "MLflow 2.22 client against its MLflow 2.22 server" "$V222/bin/python" "$COMPAT_SERVER_TEST"
# shellcheck disable=SC2086
run "MLflow 2.4 client, fast tests" "$V24/bin/python" $FAST_24 -m "$FAST_M"
LMC_TEST_SERVER_MLFLOW="$V222/bin/mlflow" run "MLflow 2.4 client against an MLflow 2.22 server" "$V24/bin/python" \
    "$COMPAT_SERVER_TEST"
# shellcheck disable=SC2086
LMC_TEST_SERVER_MLFLOW="$V222/bin/mlflow" run "MLflow 3 client against an MLflow 2.22 server" "$MAIN_PY" $SERVER_3
echo "compat: leg took $((SECONDS - t0)) s"
exit $status
