"""Processes and a browser for the demo's tests: `fermi serve openai` on tiny-qwen3, the demo
app, and headless Debian Chromium driven by selenium. Everything listens on and talks to
127.0.0.1 only, and every process is stopped when its fixture ends.

These tests live outside tests/ so the default `pytest` run never collects them; run them with
`nox -s demo_test` (or `pytest demo/tests` where gradio, selenium and chromium are installed)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_processes import DEMO_DIR, REPO, child_env, free_port, running

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    # Belt and braces: the page may only reach 127.0.0.1; any other host fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)

sys.path.insert(0, str(DEMO_DIR))  # `import gradio_app` in the unit tests


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def fermi_server(artifacts: Path, tmp_path_factory) -> Iterator[str]:
    """`fermi serve openai` on tiny-qwen3 (exported into a temporary dir on first use); yields
    its API base once GET /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "fermi.cli", "serve", "openai", "--model", "tiny-qwen3"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = child_env(FERMI_ARTIFACTS=str(tmp_path_factory.mktemp("fermi-artifacts")))
    log = artifacts / "demo-fermi-server.log"
    with running(cmd, f"http://127.0.0.1:{port}/health", log, 300, env):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="demo-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")  # a fresh profile every run
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()
