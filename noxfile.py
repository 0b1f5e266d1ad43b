"""Developer tasks. torch is pinned to 2.13.0 and installed before the extras, so the reference
stack never pulls a multi-GB CUDA build of torch."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"


def install_dev(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CI runs this)."""
    install_dev(session)
    session.run("pytest", "-q", "-ra", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


# -- fermi bench ---------------------------------------------------------------------------------
# Each Python peer engine lives in its own virtualenv (their pins conflict); `fermi bench` drives
# them all from one run, starting `.nox/bench_<peer>/bin/python -m fermi.bench.worker` per
# engine. llama.cpp needs no venv: fermi.bench.llama_cpp builds it natively (cmake) into the cache.
# Typical run:  nox -s bench_transformers bench_ortgenai bench -- --quick
BENCH_PEERS = {
    "transformers": [TORCH, "transformers>=5,<6", "safetensors>=0.4", "numpy>=1.26"],
    # The model builder imports torch and transformers 5; torch goes first, pinned.
    "ortgenai": [
        TORCH,
        "transformers>=5,<6",
        "onnxruntime-genai==0.18.0",
        "onnx>=1.17",
        "onnx-ir>=0.1",
        "numpy>=1.26",
    ],
}


def install_peer(session: nox.Session, peer: str) -> None:
    for requirement in BENCH_PEERS[peer]:  # one by one, so torch is in before anything wants it
        session.install(requirement)


@nox.session
def bench_transformers(session: nox.Session) -> None:
    """Peer venv for `fermi bench`: transformers + torch eager (fp32 CPU)."""
    install_peer(session, "transformers")


@nox.session
def bench_ortgenai(session: nox.Session) -> None:
    """Peer venv for `fermi bench`: onnxruntime-genai, its model builder and generator."""
    install_peer(session, "ortgenai")


@nox.session
def bench(session: nox.Session) -> None:
    """Run `fermi bench` (pass its options after --); peers whose venv is missing are skipped."""
    session.install("-e", ".[bench]")
    session.run("fermi", "bench", *session.posargs)


# -- Gradio demo ---------------------------------------------------------------------------------
DEMO_TEST_DEPS = ("selenium>=4.20", "pytest>=8", "pytest-timeout>=2.3")
BROWSER = ("/usr/bin/chromium", "/usr/bin/chromedriver")  # Debian's; nothing is downloaded


@nox.session
def demo(session: nox.Session) -> None:
    """The Gradio chat demo, for a running `fermi serve openai` (`nox -s demo -- --help`)."""
    session.install("-r", "demo/requirements.txt")
    session.run("python", "demo/gradio_app.py", *session.posargs)


@nox.session
def demo_test(session: nox.Session) -> None:
    """The demo's browser tests: a tiny-qwen3 server, the app and headless Chromium."""
    if not all(os.path.exists(p) for p in BROWSER):
        if os.geteuid() != 0:
            session.error("needs Debian's chromium and chromium-driver: apt-get install them")
        session.run("apt-get", "update", "-q", external=True)
        session.run("apt-get", "install", "-y", "-q", "chromium", "chromium-driver", external=True)
    session.install("-e", ".[demo]", *DEMO_TEST_DEPS)
    session.run("pytest", "-q", "-ra", "demo/tests", *session.posargs)
