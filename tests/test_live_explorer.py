"""The live explorer in a real browser: JupyterLab serves a `make explore`-style copy of notebooks/06_explorer.ipynb
(live=True) over a smoke study, headless Chromium runs it, types a new expression, presses Run and sees the panel
change. Needs JupyterLab and Playwright's Python package (both in the dev extras, so `make test` has them) and Debian's
chromium (`.ci/run` installs it); skipped, saying which is missing, otherwise. PPCR_SCREENSHOTS=DIR keeps the
screenshots (before and after the new expression) in DIR.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e '.[browser]')")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright is not installed (pip install -e '.[browser]')")
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, smoke_study_run: Path):
    """The smoke study, the live copy of the explorer notebook in a folder of its own, and JupyterLab serving it."""
    import papermill

    root = tmp_path_factory.mktemp("live_explorer")
    run = smoke_study_run
    papermill.execute_notebook(str(REPO / "notebooks" / "06_explorer.ipynb"), str(root / "06_explorer_live.ipynb"),
                               prepare_only=True, parameters={"live": True, "profile": "smoke", "run_dir": str(run),
                                                              "output_dir": str(root)})
    port, token = _free_port(), "ppcr-test"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JUPYTER_CONFIG_DIR": str(root / "jupyter-config")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(server.stdout.read().decode(errors="replace"))
            time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}/lab/tree/06_explorer_live.ipynb?token={token}", root
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_live_explorer_segments_a_typed_expression(lab) -> None:
    url, root = lab
    shots = Path(os.environ.get("PPCR_SCREENSHOTS", root / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(timeout=120_000)  # the kernel is up
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        text = page.locator("input[placeholder='type a new expression']")
        text.wait_for(state="attached", timeout=300_000)  # the live models are loaded: the text box is enabled
        output = page.locator(".widget-output img").first
        output.wait_for(state="attached", timeout=120_000)
        before = output.get_attribute("src")
        text.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "live_explorer_before.png"))
        text.fill("the big red circle")
        page.locator("button.widget-button", has_text="Run").click()
        page.wait_for_function(
            "before => { const img = document.querySelector('.widget-output img');"
            " return img && img.getAttribute('src') !== before; }", arg=before, timeout=180_000)
        status = page.locator(".widget-html", has_text="live expression")
        status.wait_for(timeout=60_000)
        assert "the big red circle" in status.inner_text()
        page.locator(".widget-output img").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "live_explorer_after.png"))
        browser.close()
    assert (shots / "live_explorer_after.png").stat().st_size > 10_000
