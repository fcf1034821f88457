# Two commands matter: `make demo` (the main job) and `make test` (the suite; .ci/run calls it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# On these machines torch 2.14.1 / torchvision 0.29.1 install from local files; a looser resolve could pull
# a multi-GB build. Override with `make TORCH_PIN= demo` to let pip choose.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install demo lint docs test test-fast test-compat bench bench-growth bench-quick gpu-check wheel dist clean browser-deps browser-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test,captum,optuna,docs,release]' $(TORCH_PIN)
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-mlflow-cv demo

lint: $(STAMP)  ## ruff and mypy (pyproject's [tool.ruff], [tool.mypy]), the docstring examples and the docs site; `make test` runs it first
	$(VENV)/bin/ruff check lightning_mlflow_cv
	$(VENV)/bin/ruff format --check lightning_mlflow_cv
	$(PY) -m mypy
	$(PY) -m pytest -q --doctest-modules lightning_mlflow_cv
	$(MAKE) --no-print-directory docs

# NO_MKDOCS_2_WARNING: Material 9.7+ prints a banner about MkDocs 2.0 on every build (pyproject pins mkdocs<2)
docs: $(STAMP)  ## the MkDocs site into site/ with --strict: a broken link or anchor, a missing reference or a docstring that does not render fails
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

test: $(STAMP) lint
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not server and not ddp" $(PYTEST_ARGS)

test-compat: $(STAMP)  ## the framework floor (torch 2.0, Lightning 2.2, MLflow 2.4, ...), the MLflow 2.22 client and an MLflow 2.22 server (cached venvs; see .ci/compat.sh)
	PYTHON=$(PYTHON) MAIN_PY=$(PY) TORCH_PIN="$(TORCH_PIN)" bash .ci/compat.sh

bench: $(STAMP)  ## logging overhead + realistic CV fit + store CPU + writer start, then how the cost grows (bench-growth); writes benchmarks/README*.md
	$(PY) benchmarks/logging_overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/cv_fit_overhead.py $(CV_BENCH_ARGS)
	$(PY) benchmarks/store_cpu.py
	$(PY) benchmarks/writer_start.py
	$(MAKE) --no-print-directory bench-growth

bench-growth: $(STAMP)  ## per-step vs fixed cost, K fits against one team server, 5M-point fits (see benchmarks/README.md for durations)
	$(PY) benchmarks/cost_growth.py
	$(PY) benchmarks/team_server.py
	$(PY) benchmarks/long_fit.py

bench-quick: $(STAMP)  ## smoke version, prints only
	$(PY) benchmarks/logging_overhead.py --quick --no-readme $(BENCH_ARGS)
	$(PY) benchmarks/cv_fit_overhead.py --quick --no-readme $(CV_BENCH_ARGS)
	$(PY) benchmarks/cost_growth.py --quick --no-readme
	$(PY) benchmarks/team_server.py --quick --no-readme
	$(PY) benchmarks/long_fit.py --quick --no-readme

gpu-check: $(STAMP)  ## the prepared GPU check (< 8 min on one GPU); a dry run that says what it skips without CUDA
	$(PY) benchmarks/gpu_check.py $(GPU_ARGS)

browser-deps: $(STAMP)  ## Debian's Chromium for the browser check (playwright comes with the test extra)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

browser-check: browser-deps  ## demo + `mlflow ui` + headless Chromium; screenshots into docs/screenshots
	$(PY) tests/browser_check.py --out docs/screenshots

wheel: $(STAMP)
	$(PIP) wheel --no-deps -w dist .

dist: $(STAMP)  ## sdist + wheel into dist/ (python -m build), checked with twine; tests/test_wheel.py installs the wheel in a fresh venv
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

clean:
	rm -rf $(VENV) dist build site *.egg-info mlflow.db checkpoints
