"""The documentation cannot drift from the code: every Python block of the docs pages and the README runs, the
API reference names every public name, and the screenshots the pages show are the ones `make browser-check`
writes.

Each page's ```python blocks run in order in one namespace, in the test's own working directory (so the default
``sqlite:///mlflow.db`` store and every file a block writes stay in tmp_path), with every ``Trainer`` cut to a
few batches and at most two epochs. A block that cannot run here is preceded by ``<!-- skip: reason -->``.
"""

from __future__ import annotations

import ast
import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted([*DOCS.rglob("*.md"), REPO / "README.md"])

FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def code_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of each top-level ```python block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") != "python":
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        if skip is not None and not skip.group("reason"):
            raise AssertionError(
                f"{page}: a skip marker without a reason before line {text.count(chr(10), 0, m.start()) + 1}"
            )
        out.append((text.count("\n", 0, m.start()) + 2, m.group("body"), skip.group("reason") if skip else None))
    return out


RUNNABLE = [p for p in PAGES if any(skip is None for _, _, skip in code_blocks(p))]


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated SQLite tracking store, copied into each page's working directory as ``mlflow.db`` (the
    default store a block gets), so each page does not pay MLflow's schema migrations."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tiny_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``Trainer`` (whatever the import, the LightningCLI's included) runs a few batches, at most two epochs,
    on the CPU, quietly; everything else a block asks for is kept."""
    import functools

    import lightning.pytorch as pl

    init = pl.Trainer.__init__

    @functools.wraps(init)  # keeps the signature LightningCLI reads the Trainer's arguments from
    def tiny_init(self, *args, **kwargs):
        kwargs["max_epochs"] = min(kwargs.get("max_epochs") or 1, 2)
        kwargs.update(
            limit_train_batches=6,
            limit_val_batches=3,
            limit_test_batches=3,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        init(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", tiny_init)


def test_every_page_with_code_is_found_and_skips_are_few():
    """The extraction finds the blocks (a broken fence pattern would silently run nothing)."""
    blocks = {p: code_blocks(p) for p in PAGES}
    ran = sum(skip is None for b in blocks.values() for _, _, skip in b)
    skipped = [f"{_rel(p)}:{line}" for p, b in blocks.items() for line, _, skip in b if skip is not None]
    assert ran >= 20, f"only {ran} runnable python blocks found"
    assert len(skipped) <= 5, f"too many skipped blocks: {skipped}"
    for p, b in blocks.items():
        for line, code, _ in b:
            ast.parse(code, filename=f"{_rel(p)}:{line}")  # even a skipped block is valid Python


@pytest.mark.parametrize("page", RUNNABLE, ids=_rel)
def test_the_python_blocks_of_a_page_run(
    page: Path, store_template: Path, tiny_trainer: None, tmp_path: Path, monkeypatch
):
    import warnings

    from lightning_mlflow_cv.demos.digits import DigitsClassifier, DigitsDataModule

    monkeypatch.setenv("LIGHTNING_MLFLOW_CV_AUTOSYNC", "0")
    shutil.copy(store_template, tmp_path / "mlflow.db")
    # what a page may use without defining it: a model and its data, as the README's and the logger's examples do
    namespace: dict = {"__name__": "docs_example", "model": DigitsClassifier(), "dm": DigitsDataModule()}
    t0 = time.monotonic()
    for line, code, skip in code_blocks(page):
        if skip is not None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, f"{_rel(page)}:{line}", "exec"), namespace)
            except Exception as err:  # noqa: BLE001 - say which block failed
                raise AssertionError(f"the python block at {_rel(page)}:{line} failed: {err!r}") from err
    # every logger a page made has delivered its data (a block that leaves a run open would show up here)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert time.monotonic() - t0 < 60, f"{_rel(page)}'s blocks are too slow for the docs test"


def _reference_targets() -> set[str]:
    targets = set()
    for page in (DOCS / "reference").glob("*.md"):
        text = page.read_text()
        for m in re.finditer(r"^::: (\S+)", text, re.M):
            targets.add(m.group(1))
        for m in re.finditer(r"^::: (\S+)\n(?:[ ]{4}.*\n)*?[ ]{6}members:\n((?:[ ]{8}- \S+\n)+)", text, re.M):
            targets |= {f"{m.group(1)}.{name}" for name in re.findall(r"- (\S+)", m.group(2))}
    return targets


def test_the_api_reference_documents_every_public_name():
    import lightning_mlflow_cv
    from lightning_mlflow_cv import callbacks, hpo, tasks

    targets = _reference_targets()
    documented = {t.rsplit(".", 1)[-1] for t in targets}
    public = {n for n in lightning_mlflow_cv.__all__ if n != "__version__"} | set(callbacks.__all__)
    public |= {"optuna_sweep", "ray_sweep", "trial_logger"} & set(dir(hpo))
    missing = sorted(public - documented)
    assert not missing, f"public names without an API reference entry: {missing}"
    missing_tasks = sorted(f"lightning_mlflow_cv.tasks.{n}" for n in tasks.__all__)
    missing_tasks = [t for t in missing_tasks if t not in targets]
    assert not missing_tasks, f"tasks names without an API reference entry: {missing_tasks}"


def _browser_check_screenshots() -> set[str]:
    src = (REPO / "tests" / "browser_check.py").read_text()
    return set(re.findall(r'out / "([\w.-]+\.png)"', src))


def test_the_docs_show_the_screenshots_the_browser_check_writes():
    """`make browser-check` writes docs/screenshots; the pages show those files and only those, so a picture
    cannot go stale without the check that regenerates it."""
    written = _browser_check_screenshots()
    assert written, "tests/browser_check.py names no screenshots"
    shown = set()
    for page in [*DOCS.rglob("*.md"), REPO / "README.md"]:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            assert "screenshots/" in target, f"{_rel(page)} shows an image that no check writes: {target}"
            path = (page.parent / target).resolve()
            assert path.parent == DOCS / "screenshots", f"{_rel(page)}: {target} is not under docs/screenshots"
            assert path.is_file(), f"{_rel(page)}: {target} does not exist"
            shown.add(path.name)
    assert shown <= written, f"shown but not written by the browser check: {sorted(shown - written)}"
    assert written <= shown, f"written by the browser check but shown on no page: {sorted(written - shown)}"
    on_disk = {p.name for p in (DOCS / "screenshots").glob("*.png")}
    assert on_disk == written, (
        f"docs/screenshots differs from what the browser check writes: {sorted(on_disk ^ written)}"
    )
