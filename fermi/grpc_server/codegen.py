"""Regenerate the committed Python stubs from proto/fermi.proto:

    python -m fermi.grpc_server.codegen

Needs grpcio-tools (a dev dependency); serving only needs the committed fermi_pb2*.py. The proto
is compiled under the virtual path fermi/grpc_server/fermi.proto so that the generated
fermi_pb2_grpc.py imports `from fermi.grpc_server import fermi_pb2` (no post-editing).
tests/test_grpc_codegen.py fails when the committed stubs no longer match the proto."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "fermi.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
VIRTUAL_DIR = "fermi/grpc_server"
OUTPUTS = ("fermi_pb2.py", "fermi_pb2.pyi", "fermi_pb2_grpc.py")


def protoc(*args: str) -> None:
    from grpc_tools import protoc as _protoc

    include = str(Path(_protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    code = _protoc.main(["protoc", f"-I{VIRTUAL_DIR}={PROTO.parent}", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {PROTO}")


def generate(out_root: Path) -> Path:
    """Write the stubs under out_root/fermi/grpc_server/ and return that directory."""
    out_root.mkdir(parents=True, exist_ok=True)
    protoc(
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{VIRTUAL_DIR}/{PROTO.name}",
    )
    return out_root / VIRTUAL_DIR


def descriptor_set(out_file: Path) -> bytes:
    """The proto compiled to a serialized FileDescriptorSet (no source info)."""
    protoc(f"--descriptor_set_out={out_file}", f"{VIRTUAL_DIR}/{PROTO.name}")
    return out_file.read_bytes()


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        for name in OUTPUTS:
            (PACKAGE_DIR / name).write_bytes((generated / name).read_bytes())
            print(f"wrote {PACKAGE_DIR / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
