"""Starting and stopping the processes the demo's tests drive; everything on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DEMO_DIR = Path(__file__).resolve().parents[1]
REPO = DEMO_DIR.parent
APP = DEMO_DIR / "gradio_app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll until `url` answers 200; fail early (with the log) if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} never came up: exit {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, 503 while loading, reset: not yet
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer 200 within {timeout_s:.0f}s\n{log.read_text()[-3000:]}")


@contextmanager
def running(cmd: list[str], url: str, log: Path, timeout_s: float, env: dict[str, str]):
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_for_url(url, proc, timeout_s, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERMI_", "GRADIO_"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", **extra)
    return env


@contextmanager
def demo_app(api_base: str, artifacts: Path, name: str) -> Iterator[str]:
    """The demo pointed at `api_base`; yields the page's URL."""
    port = free_port()
    cmd = [sys.executable, str(APP), "--api-base", api_base, "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with running(cmd, url, artifacts / f"demo-app-{name}.log", 120, child_env()):
        yield url
