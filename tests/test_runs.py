"""Run plumbing (`_facts.runs`) and the package layout: an import graph without cycles that keeps its declared layers,
get-or-create experiment under concurrency, store URIs."""

from __future__ import annotations

import ast
import multiprocessing as mp
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_mlflow_cv._facts.runs import get_or_create_experiment, normalize_uri, same_store

PKG = Path(__file__).resolve().parents[1] / "lightning_mlflow_cv"
#: The modules that create or join runs (issue 13: they imported each other in a cycle).
RUN_PLUMBING = {
    "lightning_mlflow_cv._facts.runs",
    "lightning_mlflow_cv.callbacks._context",
    "lightning_mlflow_cv._facts.trainer_frames",
    "lightning_mlflow_cv.logger",
    "lightning_mlflow_cv.pipeline",
    "lightning_mlflow_cv.hpo",
    "lightning_mlflow_cv._sweeps.ray_sweep",
    "lightning_mlflow_cv._sweeps.tracking",
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Package-internal imports of every module (``if TYPE_CHECKING:`` blocks excluded; with ``module_level_only``,
    imports inside functions too, as they run only when called)."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def visit(node: ast.AST, mod: str = mod, base: str = base) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    src = child.module or ""
                    if child.level:
                        b = base
                        for _ in range(child.level - 1):
                            b = b.rpartition(".")[0]
                        src = f"{b}.{src}" if child.module else b
                    targets = [f"{src}.{a.name}" for a in child.names]
                for t in targets:
                    hit = known(t)
                    if hit is not None and hit != mod:
                        graph[mod].add(hit)
                visit(child)

        visit(ast.parse(path.read_text()))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph(module_level_only=True)
    assert "lightning_mlflow_cv.logger" in graph and len(graph) > 30
    assert cycles(graph) == []


def test_no_import_cycle_runs_through_the_run_plumbing_even_inside_functions():
    """Counting imports inside functions too (what the design reads as "imports each other"), no cycle passes
    through the modules that create or join runs; `_runs` imports nothing from the package."""
    graph = import_graph(module_level_only=False)
    assert graph["lightning_mlflow_cv._facts.runs"] == set()
    assert "lightning_mlflow_cv._facts.runs" in graph["lightning_mlflow_cv.logger"]
    assert "lightning_mlflow_cv._facts.runs" in graph["lightning_mlflow_cv.pipeline"]
    assert [c for c in cycles(graph) if c & RUN_PLUMBING] == []


def test_no_import_cycle_anywhere_even_inside_functions():
    """Counting imports inside functions too, no two modules of the package import each other, even through others
    (issue 29: journal -> autosync -> delivery -> compat -> delivery, and drawing -> tasks -> drawing, were such)."""
    assert cycles(import_graph(module_level_only=False)) == []


#: The root of the package: the public entry points and nothing else (issue 29). A new module goes into the part
#: it belongs to; one more here is a decision, taken by editing this list.
ROOT = {
    "__init__", "logger", "cli", "cli_lightning", "hpo", "pipeline", "promotion", "evaluation", "environment",
    "hyperparameters", "spool_sync", "callbacks", "tasks", "metrics", "demos",
}  # fmt: skip
#: The layers below the entry points, and the parts each may import (and, through them, what those may import).
#: A part is a subpackage, or a root module named here; everything else (the logger, callbacks/, the CLI, the
#: sweeps' and pipelines' public modules, demos/) is an entry point, which may import any part, and which no part
#: imports. So a lower layer never imports a higher one, not even inside a function.
LAYERS: dict[str, set[str]] = {
    "_draw": set(),  # pixels and panels: pure drawing
    "tasks": {"_draw"},  # one module per CV task: its conventions, metrics and panel
    "_facts": {"tasks"},  # redaction, key rules, run plumbing, system sampling (a `task` tag is checked by name)
    "_compat": {"_facts"},  # MLflow and framework version differences
    "metrics": {"_compat"},
    "environment": {"_facts", "_compat"},
    "hyperparameters": {"_facts"},
    "_delivery": {"_compat", "_facts"},  # journal, locks, deliverer, writers, autosync, HTTP helpers
    "_shipping": {"_compat", "_facts", "environment"},  # export, packaging, pyfunc, logged model, model card
    "_sweeps": {"_facts"},  # the parent/child tracking of a sweep, the Ray sweep
    "_logger": {"_delivery", "_facts", "_compat", "environment"},  # the logger's parts: resume, run start, writers
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _below(part: str) -> set[str]:
    out: set[str] = set()
    todo = list(LAYERS[part])
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(LAYERS[p])
    return out


def test_the_root_holds_the_entry_points_and_every_private_subpackage_is_a_declared_layer():
    modules = {p.stem for p in PKG.glob("*.py")}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert modules - ROOT == set(), "a new module at the root: put it into its part, or add it to ROOT deliberately"
    assert len(modules - {"__init__"}) <= 12
    private = {p for p in packages if p.startswith("_")}
    assert private <= set(LAYERS), f"a private subpackage without a layer: {sorted(private - set(LAYERS))}"
    assert packages - private <= ROOT
    assert all(p in _below(q) or p == q for q in LAYERS for p in LAYERS[q])
    assert all(q not in _below(q) for q in LAYERS), "the declared layers run in a circle"


def test_a_lower_layer_never_imports_a_higher_one_even_inside_functions():
    graph = import_graph(module_level_only=False)
    wrong = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if _part(mod) in LAYERS and _part(dep) != _part(mod) and _part(dep) not in _below(_part(mod))
    )
    assert wrong == []


def _race(uri: str, names: list[str], barrier, out) -> None:
    client = MlflowClient(uri)
    ids = []
    for name in names:
        barrier.wait(timeout=30)
        ids.append(get_or_create_experiment(client, name))
    out.put(ids)


@pytest.mark.slow
def test_two_processes_creating_the_same_experiment_get_the_same_id(tracking_uri):
    """Two processes look the experiment up at the same moment (a barrier before each name), find nothing, and both
    create it: the loser of the race gets the winner's id instead of an error. Several names, so the race happens."""
    MlflowClient(tracking_uri).search_experiments()  # the store's schema exists; the race is on the experiments
    names = [f"race-{i}" for i in range(4)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tracking_uri, names, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[0] == results[1]
    client = MlflowClient(tracking_uri)
    assert [client.get_experiment_by_name(n).experiment_id for n in names] == results[0]


def test_get_or_create_reuses_an_experiment_and_refuses_a_deleted_one(tracking_uri):
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, "exp")
    assert get_or_create_experiment(client, "exp") == exp_id
    client.delete_experiment(exp_id)
    with pytest.raises(ValueError, match=r"experiment .exp. \(id \d+\) is deleted.*Fix: restore it"):
        get_or_create_experiment(client, "exp")


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("sqlite:///store.db", "sqlite:///{cwd}/store.db", True),
        ("sqlite:///./x/../store.db", "sqlite:///{cwd}/store.db", True),
        ("sqlite:///store.db", "sqlite:///{cwd}/other.db", False),
        ("./mlruns", "file://{cwd}/mlruns", True),
        ("file:./mlruns", "file://{cwd}/mlruns", True),
        ("HTTP://user:secret@Tracking.Example:5000/", "http://tracking.example:5000", True),
        ("http://tracking.example:5000", "http://tracking.example:5001", False),
        ("postgresql+psycopg2://u:p@db:5432/mlflow", "postgresql://db:5432/mlflow", True),
        ("postgresql://db:5432/mlflow", "postgresql://db:5432/other", False),
    ],
)
def test_same_store_compares_normalized_uris(tmp_path, a, b, same):
    cwd = Path.cwd()
    assert cwd == tmp_path  # conftest runs every test in its tmp_path
    assert same_store(a.format(cwd=cwd), b.format(cwd=cwd)) is same
    assert normalize_uri(b.format(cwd=cwd)) == normalize_uri(normalize_uri(b.format(cwd=cwd)))
