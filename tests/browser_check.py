"""What a user sees in the MLflow UI after the demo, checked in headless Chromium (Playwright).

Starts ``mlflow ui`` on a store the demo filled (``--store``; without it the demo runs first into a temporary
directory), opens the run page, its Model metrics tab (the image cards), its System metrics tab, the logged
model's page and the registered model, asserts what a user must see there, and writes screenshots.

The image card: the grid loads at the card's default step (0, the first epoch); MLflow 3.17 lists every run param
above a card's image, so the check reports where the image sits with that default, then switches the card's
"Show run parameters" off (what the README tells users) and asserts the whole grid lies inside the card's
visible box (``image_card_params.png`` before, ``image_card.png`` after).

    python tests/browser_check.py --out docs/screenshots                 # runs the demo first (~1-3 min)
    python tests/browser_check.py --store /path/to/dir-with-mlflow.db     # a store the demo already filled

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and ``playwright`` from PyPI (``make browser-deps``);
Playwright drives ``/usr/bin/chromium`` (it downloads no browser). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: Flags for a headless Chromium on a machine with a closed network (no Google lookups at start).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(workdir: Path) -> None:
    """The demo into ``workdir/mlflow.db`` (2 epochs), as ``make demo`` runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "lightning_mlflow_cv.cli", "demo", "--max-epochs", "2"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the demo failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout)


class MlflowUI:
    """``mlflow ui`` on ``workdir/mlflow.db`` (run in ``workdir``, so relative artifact paths resolve)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mlflow-ui.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowUI:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe), "ui", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow ui exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow ui did not answer /health within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


#: An image card on the run page's Model metrics tab, and the prediction grid's <img> in it.
CARD = "[data-testid=experiment-view-compare-runs-card]"
GRID = "img[src*='get-artifact'][src*='predictions']"

#: Where the val/predictions card's grid image lies against the part of the card a user sees without scrolling
#: inside it: the nearest ancestor of the <img> that clips (overflow other than visible), within the card.
_IMAGE_IN_CARD_JS = """() => {
  const title = document.querySelector("h4[title='val/predictions']");
  const card = title && title.closest("[data-testid=experiment-view-compare-runs-card]");
  const img = card && [...card.querySelectorAll("img[src*='get-artifact']")].find(i => i.complete && i.naturalWidth > 0);
  if (!img) return {found: false};
  let clip = img.parentElement;
  while (clip && clip !== card && getComputedStyle(clip).overflowY === 'visible') clip = clip.parentElement;
  const i = img.getBoundingClientRect(), c = clip.getBoundingClientRect();
  return {found: true, inside: i.height > 50 && i.top >= c.top - 1 && i.bottom <= c.bottom + 1
            && i.left >= c.left - 1 && i.right <= c.right + 1,
          img_top: Math.round(i.top - c.top), img_height: Math.round(i.height), visible_height: Math.round(c.height)};
}"""


def _wait_for_grid(page: Any, timeout_ms: int) -> bool:
    try:
        page.wait_for_function(
            f"() => [...document.querySelectorAll(\"{GRID}\")].some(i => i.complete && i.naturalWidth > 0)",
            timeout=timeout_ms,
        )
        return True
    except Exception:  # noqa: BLE001 - the caller reports it
        return False


def _image_in_card(page: Any) -> dict[str, Any]:
    return dict(page.evaluate(_IMAGE_IN_CARD_JS))


def _ids(workdir: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("digits-demo")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    model_id = run.outputs.model_outputs[0].model_id
    version = str(client.get_model_version_by_alias("digits-cnn", "champion").version)
    return {"exp": exp.experiment_id, "run": run.info.run_id, "model": model_id, "version": version}


def check(workdir: Path, out: Path, timeout_ms: int = 60_000) -> list[str]:
    """Open the pages, assert what a user must see, screenshot them. Returns the failed checks."""
    from playwright.sync_api import sync_playwright

    ids = _ids(workdir)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)

    with MlflowUI(workdir) as ui, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(timeout_ms)
        run_url = f"{ui.url}/#/experiments/{ids['exp']}/runs/{ids['run']}"

        def visit(url: str, ready_text: str) -> str:
            page.goto(url)
            try:
                page.get_by_text(ready_text, exact=False).first.wait_for(timeout=timeout_ms)
            except Exception:  # noqa: BLE001 - reported by the checks below
                pass
            page.wait_for_timeout(1500)
            return page.inner_text("body")

        # 1. the run page: description with the headline and the promotion outcome
        text = visit(run_url, "Digits demo")
        expect("Digits demo" in text and "promoted to @champion" in text, "run page shows the description with the outcome")
        page.screenshot(path=str(out / "run_page.png"))

        def search_charts(query: str) -> None:
            box = page.get_by_placeholder("Search metric charts")
            box.wait_for(timeout=timeout_ms)
            box.fill(query)
            page.wait_for_timeout(3000)

        # 2. the image card (Model metrics tab, filtered to the prediction grid): the grid image loads at the card's
        # default step (0: the card's config starts at step 0, and grids are logged at step = epoch)
        visit(f"{run_url}/model-metrics", "val/acc")
        search_charts("val/predictions")
        card = page.locator(CARD).filter(has=page.locator("h4[title='val/predictions']")).first
        try:  # the UI renders a card's image only once the card is in view (other image cards come first)
            card.scroll_into_view_if_needed(timeout=timeout_ms)
        except Exception:  # noqa: BLE001 - the wait below reports it
            pass
        loaded = _wait_for_grid(page, timeout_ms)
        if not loaded and os.environ.get("BROWSER_CHECK_DEBUG"):
            print(page.evaluate("() => [...document.querySelectorAll('img')].map(i => [i.src.slice(-160), i.complete, i.naturalWidth])"))
        expect(loaded, "the prediction grid image loads in its image card")
        step = page.evaluate(f"() => [...document.querySelectorAll(\"{GRID}\")].map(i => decodeURIComponent(i.src))")
        expect(any("+step+0+" in src for src in step), f"the card shows the grid logged at its default step 0: {step}")
        default_box = _image_in_card(page)
        print(f"info  with the card's default 'Show run parameters' on: {default_box}", flush=True)
        page.screenshot(path=str(out / "image_card_params.png"))
        # the card's own setting (pencil menu > Configure > Run details > Show run parameters): with it off the grid
        # lies inside the card's visible box, no scrolling inside the card (README: "Image cards")
        try:
            card.locator("[data-testid=experiment-view-compare-runs-card-menu]").click()
            page.get_by_role("menuitem", name="Configure").click()
            page.locator("[data-component-id='mlflow.charts.image_grid_configure.show_run_params']").first.click()
            page.get_by_role("button", name="Save changes").click()
            page.wait_for_timeout(1500)
            card.scroll_into_view_if_needed(timeout=timeout_ms)
            _wait_for_grid(page, timeout_ms)
        except Exception as err:  # noqa: BLE001 - reported below
            print(f"could not switch off 'Show run parameters': {err}", flush=True)
        box = _image_in_card(page)
        expect(box.get("inside") is True, f"with 'Show run parameters' off the grid lies inside the card's visible box: {box}")
        page.screenshot(path=str(out / "image_card.png"))

        # 3. system metrics (System metrics tab; its section sits below the image sections, which it lists too)
        page.set_viewport_size({"width": 1440, "height": 2400})  # charts render once in view
        text = visit(f"{run_url}/system-metrics", "cpu_utilization_percentage")
        expect("cpu_utilization_percentage" in text, "System metrics tab shows system/cpu_utilization_percentage")
        try:
            page.get_by_text("cpu_utilization_percentage").first.scroll_into_view_if_needed()
            page.wait_for_timeout(2000)
        except Exception:  # noqa: BLE001 - the screenshot is still taken
            pass
        page.screenshot(path=str(out / "system_metrics.png"))
        page.set_viewport_size({"width": 1440, "height": 1000})

        # 4. the logged model: registered, with its version
        text = visit(f"{ui.url}/#/experiments/{ids['exp']}/models/{ids['model']}", "Registered")
        expect("Not registered" not in text and "digits-cnn" in text, "model page links its registered version")
        expect(f"v{ids['version']}" in text or f"Version {ids['version']}" in text, "model page names the version")
        page.screenshot(path=str(out / "logged_model.png"))

        # 5. the registered model: @champion, and no raw marker in the Description column
        text = visit(f"{ui.url}/#/models/digits-cnn", "champion")
        expect("champion" in text, "registered model shows the @champion alias")
        expect("<!--" not in text and "lightning-mlflow-cv:decision" not in text, "no raw decision marker")
        page.screenshot(path=str(out / "registered_model.png"))
        browser.close()
    (out / "ids.json").write_text(json.dumps(ids, indent=2))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="directory holding mlflow.db (default: run the demo)")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)", file=sys.stderr)
        return 2
    tmp = None
    workdir = args.store
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="lmc-browser-"))
        workdir = tmp
        run_demo(workdir)
    try:
        failures = check(workdir.resolve(), args.out.resolve())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
