"""A real `openft serve` on loopback (own OPENFT_HOME) and a headless Debian
chromium driven by Playwright. Skips cleanly without either."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve.conftest import TINY, Server  # the same real-server helper the API tests use

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def console_server(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("console-home")
    models = Path(session_home) / "models"
    if models.exists():  # share the converted built-in model cache
        (home / "models").symlink_to(models, target_is_directory=True)
    s = Server(home, models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tiny_model_dir):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    # The console pre-selects the last model used; start with the tiny one so no
    # page asks the server for the built-in model (a slow first conversion).
    context.add_init_script(
        f"localStorage.getItem('openft.lastModel') || localStorage.setItem('openft.lastModel', {TINY!r})"
    )
    p = context.new_page()
    p.set_default_timeout(30_000)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.console_errors = errors
    yield p
    context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
