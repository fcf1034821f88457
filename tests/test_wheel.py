"""The wheel works where users install it: built from the sdist (``python -m build``, as ``make dist``), installed
into a virtual environment outside the checkout, it runs the console script and the demo, imports with
``py.typed``, and holds every module of the package and no tests.

The environment's dependencies (torch alone is ~6 GB with its CUDA libraries; about 2 minutes to install here)
are cached under ``~/.cache/lightning_mlflow_cv/wheel-venvs/<key>``, keyed by the wheel's own dependency list
(``Requires-Dist``), the extras installed, the torch pin and the Python version; the wheel itself is reinstalled
into it on every run (``--no-deps --force-reinstall``) and ``pip check`` verifies that what the wheel requires is
what the environment holds. ``LMC_WHEEL_TEST_FRESH=1`` builds a new environment from scratch instead.
"""

from __future__ import annotations

import ast
import email.parser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
PKG = "lightning_mlflow_cv"
#: As the Makefile's TORCH_PIN: these releases lie on this machine's disk; a looser resolve could pull a new build.
TORCH_PIN = os.environ.get("TORCH_PIN", "torch==2.14.1 torchvision==0.29.1").split()
EXTRAS = "demo"  # scikit-learn, for `lightning-mlflow-cv demo`
CACHE = Path(os.environ.get("LMC_WHEEL_VENV_CACHE", Path.home() / ".cache" / "lightning_mlflow_cv" / "wheel-venvs"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel built as `make dist` builds them (the wheel from the sdist), in a temp dir."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=REPO)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (whl,) = dist.glob("*.whl")
    return whl


def _metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def _imported_package_modules(source: Path) -> set[str]:
    """The ``lightning_mlflow_cv...`` modules that ``source`` imports (anywhere in it, inside functions too)."""
    tree = ast.parse(source.read_text())
    rel = source.relative_to(REPO).with_suffix("")
    package = rel.parent.parts if rel.name != "__init__" else rel.parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PKG}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] == PKG:
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return found


def test_the_wheel_holds_the_package_its_imports_and_no_tests(wheel: Path, dist: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    top = {n.split("/")[0] for n in names}
    assert top == {PKG, f"{PKG}-{_metadata(wheel)['Version']}.dist-info"}, top
    assert f"{PKG}/py.typed" in names
    assert not [n for n in names if "/tests/" in f"/{n}" or Path(n).name.startswith(("test_", "conftest"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the license file is not in the wheel"
    shipped = {n[: -len(".py")].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    sources = sorted((REPO / PKG).rglob("*.py"))
    in_tree = {str(p.relative_to(REPO).with_suffix("")).replace("/", ".").removesuffix(".__init__") for p in sources}
    assert in_tree <= shipped, f"modules of the source tree missing from the wheel: {sorted(in_tree - shipped)}"
    imported = set().union(*(_imported_package_modules(p) for p in sources))
    # `from pkg.mod import Name` adds pkg.mod.Name: keep the names that are modules or packages
    missing = sorted(m for m in imported if m not in shipped and m.rsplit(".", 1)[0] not in shipped)
    assert not missing, f"modules the package imports that the wheel lacks: {missing}"
    meta = _metadata(wheel)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["Version"] == project["version"]
    assert meta["License-Expression"] == "Apache-2.0"
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.name == f"{PKG}-{project['version']}.tar.gz"


def _venv_key(whl: Path) -> str:
    requires = sorted(_metadata(whl).get_all("Requires-Dist") or [])
    text = "\n".join([*requires, f"extras={EXTRAS}", *TORCH_PIN, sys.version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def venv(wheel: Path) -> Path:
    """A virtual environment outside the checkout with the wheel (and its `[demo]` extra) installed."""
    fresh = os.environ.get("LMC_WHEEL_TEST_FRESH") == "1"
    env_dir = CACHE / f"py{sys.version_info.major}{sys.version_info.minor}-{_venv_key(wheel)}"
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    ready = env_dir / ".lmc-deps-installed"
    t0 = time.monotonic()
    if fresh or not ready.is_file():
        for stale in CACHE.glob(f"py{sys.version_info.major}{sys.version_info.minor}-*"):  # ~6 GB each
            shutil.rmtree(stale, ignore_errors=True)
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        # sys._base_executable: the interpreter behind the venv this test runs in, not the venv itself
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(env_dir)], cwd=env_dir.parent)
        pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run([*pip, f"{wheel}[{EXTRAS}]", *TORCH_PIN], cwd=env_dir.parent, env=pip_env, timeout=1500)
        ready.write_text(f"{wheel.name}\n")
        how = "built fresh"
    else:
        how = "cached dependencies"
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], cwd=env_dir.parent, env=pip_env)
    _run([*pip, "check"], cwd=env_dir.parent, env=pip_env)
    print(f"wheel venv {env_dir} ({how}): {time.monotonic() - t0:.0f} s")
    return env_dir


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell in a directory outside the checkout: no PYTHONPATH, no tracking URI, own spool dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["LIGHTNING_MLFLOW_CV_SPOOL_DIR"] = str(tmp_path / "spool")
    env["LIGHTNING_MLFLOW_CV_AUTOSYNC"] = "0"
    return env


def test_the_installed_wheel_imports_with_py_typed_and_its_public_names(venv: Path, tmp_path: Path, user_env):
    code = f"""
import importlib, pathlib, {PKG}
from {PKG} import callbacks, hpo, tasks
root = pathlib.Path({PKG}.__file__).parent
assert (root / "py.typed").is_file(), "py.typed is missing"
for name in {PKG}.__all__:
    getattr({PKG}, name)  # each lazily imported public name resolves
for name in callbacks.__all__ + tasks.__all__:
    getattr(callbacks if name in callbacks.__all__ else tasks, name)
print("ROOT=" + str(root))
print("VERSION=" + {PKG}.__version__)
"""
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=user_env)
    root = Path(re.search(r"^ROOT=(.*)$", out, re.M).group(1))
    version = re.search(r"^VERSION=(.*)$", out, re.M).group(1)
    assert root.is_relative_to(venv), f"imported from {root}, not from the installed wheel"
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_installed_console_script_and_demo_run_outside_the_checkout(venv: Path, tmp_path: Path, user_env):
    exe = str(venv / "bin" / "lightning-mlflow-cv")
    helptext = _run([exe, "--help"], cwd=tmp_path, env=user_env)
    for sub in ("fit", "demo", "sync", "promote"):
        assert sub in helptext
    # two epochs instead of the default eight, as tests/test_demo.py: the job, not the accuracy, is under test here
    out = _run([exe, "demo", "--max-epochs", "2"], cwd=tmp_path, env=user_env, timeout=1200)
    assert (tmp_path / "mlflow.db").is_file(), out[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in out, out[-3000:]
    assert "promoted to @champion" in out or "not promoted:" in out, out[-3000:]
