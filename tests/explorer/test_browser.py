"""The Explorer in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

A small notebook that builds an Explorer on tiny-mae (small sets, a 2-epoch budget, a private
token cache) is opened in JupyterLab and run; then the "view" dropdown is changed in the page
and the rendered map must change (screenshot comparison); a PNG is dropped on the upload widget and
shown in the evidence view (the figure must change again, with no error); and choosing linear probing on
[CLS] right after a per-query view (two quick choices) must show the error line and no table.
Every step waits on the state the page reports (the status line's ``data-redraws``,
``data-selection`` and ``data-error``), never on time; ``scripts/explorer_stress.py`` runs this
test many times beside CPU-burning processes. Screenshots are kept in
``figures/explorer/`` as test artefacts.

Skipped where Playwright or Chromium (Debian package ``chromium``, ``make test`` installs it
where apt is available) is missing. ``python tests/test_explorer_browser.py`` runs the same
steps on the standard full-size sets and writes ``docs/explorer.png``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "figures" / "explorer"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
SERVER_START_TIMEOUT = 120  # s: JupyterLab takes 10-20 s to start on a busy 2-core CPU
RUN_TIMEOUT = 240_000  # ms: kernel start, imports, token extraction and a probe training

SMALL_SETS = """from epviz.data import ClutteredFashionMNIST
sets = {"train": ClutteredFashionMNIST("train", 200, seed=0), "val": ClutteredFashionMNIST("train", 50, seed=1),
        "test": ClutteredFashionMNIST("test", 60, seed=0)}
explorer = epviz.Explorer(["tiny-mae"], ["ep", "cls"], setting=epviz.Setting.fast(), sets=sets, fit_options={"epochs": 2}, localization_images=30)"""
STANDARD_SETS = """explorer = epviz.Explorer(["tiny-mae", "tiny-random"], ["ep", "cls", "mhca"], setting=epviz.Setting.full(),
                          selection={"query": 6, "position": 4})"""


def explorer_notebook(path: Path, setup: str) -> Path:
    """Write a notebook that shows an Explorer built by `setup`."""
    import nbformat

    cells = [nbformat.v4.new_code_cell("import epviz\n" + setup), nbformat.v4.new_code_cell("explorer")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {SERVER_START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the server down through its API (it stops its kernels), then end its process group."""
    with contextlib.suppress(OSError):
        request = urllib.request.Request(f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def jupyter_lab(folder: Path, cache: Path) -> Iterator[tuple[str, str]]:
    """A JupyterLab server on 127.0.0.1 serving `folder`, with a token; yields (base url, token)."""
    port, token = _free_port(), secrets.token_hex(16)
    state = folder / ".jupyter"
    env = dict(
        os.environ,
        EPVIZ_CACHE=str(cache),
        EPVIZ_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        JUPYTER_CONFIG_DIR=str(state / "config"),
        JUPYTER_RUNTIME_DIR=str(state / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(state / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
    )
    news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')  # no news pop-up over the page
    log = folder / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={folder}",
        "--ServerApp.port_retries=0",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        "--ServerApp.terminals_enabled=False",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{base}/api/status?token={token}", proc, log)
        yield base, token
    finally:
        _stop(proc, base, token)


def _image_array(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


_SHOWN = """([after, want]) => {
    const el = document.querySelector('.epviz-explorer-state');
    if (!el || Number(el.dataset.redraws) <= after) return false;
    const shown = JSON.parse(el.dataset.selection);
    return Object.entries(want).every(([key, value]) => shown[key] === value);
}"""


def _redraws(page) -> int:
    """How many redraws the Explorer on the page has completed (0 before the first)."""
    return int(page.locator(".epviz-explorer-state").get_attribute("data-redraws") or 0)


def _wait_shown(page, after: int, **want) -> None:
    """Wait until a redraw newer than `after` shows a selection with the `want` values."""
    page.wait_for_function(_SHOWN, arg=[after, want], timeout=RUN_TIMEOUT)


def _keep(src: Path, dest: Path) -> Path:
    from epviz.atomic import atomic_write

    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def _upload_and_show_evidence(page, figure, upload: Path, shot: Path) -> Path:
    """Drop `upload` on the upload widget, wait until it is shown, switch to the evidence view and wait again."""
    from playwright.sync_api import expect

    drawn = _redraws(page)
    with page.expect_file_chooser(timeout=RUN_TIMEOUT) as chooser:  # the button opens a file dialog, as for a user
        page.locator("button.epviz-explorer-upload").click()
    chooser.value.set_files(str(upload))
    _wait_shown(page, drawn, image=upload.name)
    expect(page.locator(".epviz-explorer-labels")).to_contain_text(f"your image {upload.name}", timeout=RUN_TIMEOUT)
    src, drawn = figure.get_attribute("src"), _redraws(page)
    page.locator(".epviz-explorer-view select").select_option("evidence")
    _wait_shown(page, drawn, view="evidence", image=upload.name)
    page.wait_for_function("old => document.querySelector('img.epviz-explorer-figure').src !== old", arg=src, timeout=RUN_TIMEOUT)
    state = page.locator(".epviz-explorer-state")
    assert not state.get_attribute("data-error"), state.get_attribute("data-error")
    page.wait_for_timeout(500)
    figure.screenshot(path=shot)
    return shot


def drive_explorer(
    base: str, token: str, notebook: str, shots: Path, check_error: bool = True, upload: Path | None = None
) -> dict[str, Path]:
    """Open and run the notebook in headless Chromium, change the view, screenshot each step.

    Returns:
        The screenshots: ``page``, ``before``, ``after`` (the figure element), with `upload` (a PNG)
        ``evidence`` (that image dropped on the upload widget, shown in the evidence view) and, with
        `check_error`, ``error`` (the Explorer after choosing cls with a per-query view).
    """
    from playwright.sync_api import expect, sync_playwright

    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{notebook}?token={token}", timeout=120_000)
            page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
            expect(page.locator(".jp-StatusBar-Widget", has_text="Idle").first).to_be_visible(timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            figure = page.locator("img.epviz-explorer-figure")
            _wait_shown(page, 0)
            figure.wait_for(state="visible", timeout=RUN_TIMEOUT)
            expect(page.locator(".epviz-explorer-labels")).to_contain_text("predicted", timeout=RUN_TIMEOUT)
            figure.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            figure.screenshot(path=shots / "before.png")
            out["before"] = shots / "before.png"
            page.locator(".epviz-explorer").screenshot(path=shots / "page.png")
            out["page"] = shots / "page.png"
            src, drawn = figure.get_attribute("src"), _redraws(page)
            page.locator(".epviz-explorer-view select").select_option("all queries")
            _wait_shown(page, drawn, view="all queries")
            page.wait_for_function(
                "old => document.querySelector('img.epviz-explorer-figure').src !== old", arg=src, timeout=RUN_TIMEOUT
            )
            page.wait_for_timeout(500)
            figure.screenshot(path=shots / "after.png")
            out["after"] = shots / "after.png"
            if upload is not None:
                out["evidence"] = _upload_and_show_evidence(page, figure, upload, shots / "evidence.png")
            if check_error:
                drawn = _redraws(page)
                page.locator(".epviz-explorer-view select").select_option("one query")
                page.locator(".epviz-explorer-probe select").select_option("cls")  # the second choice, at once
                _wait_shown(page, drawn, view="one query", probe="cls")
                state = page.locator(".epviz-explorer-state")
                assert "no attention predictors" in (state.get_attribute("data-error") or ""), state.get_attribute("data-error")
                expect(page.locator(".epviz-explorer-error")).to_contain_text("no attention predictors", timeout=RUN_TIMEOUT)
                expect(page.locator(".epviz-explorer-table")).to_have_text("", timeout=RUN_TIMEOUT)
                expect(page.locator(".epviz-explorer-labels")).to_contain_text("predicted", timeout=RUN_TIMEOUT)
                page.locator(".epviz-explorer").screenshot(path=shots / "error.png")
                out["error"] = shots / "error.png"
        finally:
            browser.close()
    return out


def _require_browser() -> None:
    pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install playwright (dev extras)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium is missing: install the Debian package chromium (make test does where apt is available)")


def _canvas_png(path: Path) -> Path:
    """A test canvas written as an ordinary PNG file: what a user drops on the upload widget."""
    from PIL import Image

    from epviz.data import ClutteredFashionMNIST

    pixels = ClutteredFashionMNIST("test", 1, seed=7)[0][0]  # (3, H, W) in [0, 1]
    Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def test_explorer_in_jupyterlab(tmp_path):
    _require_browser()
    explorer_notebook(tmp_path / "explorer.ipynb", SMALL_SETS)
    shots = tmp_path / "shots"
    shots.mkdir()
    upload = _canvas_png(tmp_path / "my canvas.png")
    with jupyter_lab(tmp_path, tmp_path / "cache") as (base, token):
        taken = drive_explorer(base, token, "explorer.ipynb", shots, upload=upload)
    for name, path in taken.items():
        _keep(path, ARTEFACTS / f"browser_{name}.png")
    before, after = _image_array(taken["before"]), _image_array(taken["after"])
    assert before.shape == after.shape and min(before.shape[:2]) > 200
    assert before.std() > 10, "the figure is not blank"
    changed = np.abs(before - after).max(-1) > 30
    assert changed.mean() > 0.01, f"changing the view changed only {changed.mean():.2%} of the figure's pixels"
    evidence = _image_array(taken["evidence"])
    assert evidence.std() > 10, "the evidence figure is not blank"
    redrawn = np.abs(evidence[: after.shape[0], : after.shape[1]] - after[: evidence.shape[0], : evidence.shape[1]]).max(-1) > 30
    assert redrawn.mean() > 0.01, f"your image in the evidence view changed only {redrawn.mean():.2%} of the figure's pixels"


def main() -> None:
    """Screenshot the Explorer on the standard full-size sets into docs/explorer.png."""
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"Chromium is missing ({CHROMIUM}): install the Debian package chromium")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        explorer_notebook(folder / "explorer.ipynb", STANDARD_SETS)
        cache = Path(os.environ.get("EPVIZ_CACHE", Path.home() / ".cache" / "epviz" / "tokens"))
        with jupyter_lab(folder, cache) as (base, token):
            taken = drive_explorer(base, token, "explorer.ipynb", folder, check_error=False)
        print("wrote", _keep(taken["page"], ROOT / "docs" / "explorer.png"))


if __name__ == "__main__":
    main()
