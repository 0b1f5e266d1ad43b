"""The serving path never imports torch or transformers (they are export/dev extras only)."""

import subprocess
import sys

CHECK = """
import sys
import fermi.cli, fermi.runtime, fermi.chat
import fermi.openai_server.server, fermi.grpc_server.server
import export.exporter
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(",".join(heavy))
"""


def test_serving_path_does_not_import_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_is_instant_enough_to_not_load_onnxruntime():
    check = "import sys, fermi.cli; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_serving_without_ray_does_not_import_it():
    """Ray is the `ray` extra's: the single-process servers, the CLI and the Ray package's
    Ray-free parts (routing keys, the ASGI bridge, the front) never import it."""
    check = (
        "import sys, fermi.cli, fermi.openai_server.server, fermi.grpc_server.server\n"
        "import fermi.ray_serve, fermi.ray_serve.routing, fermi.ray_serve.bridge\n"
        "import fermi.ray_serve.front, fermi.ray_serve.scale\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
