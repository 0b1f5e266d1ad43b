"""Artifacts are what their manifest says: every file against its sha256, the graph's inputs and
outputs against the manifest's names and shapes.

Hashing gigabytes of weights at every start would dominate cold start, so a successful check is
recorded per file as (size, mtime, inode) in a small JSON file in the user's cache
(`$XDG_CACHE_HOME/fermi/verified/`, default `~/.cache/fermi/verified/`), keyed by the
artifact's real path and the manifest's own digest. A load hashes only files whose size, mtime
or inode changed since they were verified (the first load after an export hashes all of them);
`fermi verify` always hashes everything."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fermi.artifact import MANIFEST, MODEL_FILE, Manifest, load_manifest
from fermi.errors import ArtifactError

log = logging.getLogger("fermi.verify")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed (hashlib.file_digest)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def record_path(directory: Path) -> Path:
    """Where the verification record of an artifact directory lives."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:32]
    return cache / "fermi" / "verified" / f"{key}.json"


def _read_record(directory: Path, manifest_digest: str) -> dict[str, list]:
    try:
        record = json.loads(record_path(directory).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("manifest_sha256") != manifest_digest:
        return {}  # the manifest changed: everything is checked again
    files = record.get("files")
    return files if isinstance(files, dict) else {}


def _write_record(directory: Path, manifest_digest: str, files: dict[str, list]) -> None:
    path = record_path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"manifest_sha256": manifest_digest, "files": files}))
        temporary.replace(path)
    except OSError as e:  # no writable cache: the next load verifies again
        log.warning("cannot record the verification of %s: %s", directory, e)


@dataclass
class Verification:
    files: int  # files listed in the manifest
    hashed: int  # of which hashed now (the others matched their recorded stamp)
    bytes_hashed: int
    seconds: float


def verify_files(directory: Path, manifest: Manifest, force: bool = False) -> Verification:
    """Check every file of the manifest against its sha256, skipping those whose (size, mtime,
    inode) match a previous successful check unless `force`. Raises ArtifactError naming the
    first file that is missing, has the wrong size or fails its sha256."""
    directory = Path(directory)
    started = time.perf_counter()
    manifest_digest = file_sha256(directory / MANIFEST)
    recorded = {} if force else _read_record(directory, manifest_digest)
    verified: dict[str, list] = {}
    hashed = bytes_hashed = 0
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact {directory} is incomplete: {name} is missing")
        stamp = _stamp(path)
        if stamp[0] != entry["bytes"]:
            raise ArtifactError(
                f"artifact {directory} is corrupt: {name} has {stamp[0]} bytes, expected "
                f"{entry['bytes']} (re-export with --force)"
            )
        if recorded.get(name) != [*stamp, entry["sha256"]]:
            if file_sha256(path) != entry["sha256"]:
                raise ArtifactError(
                    f"artifact {directory} is corrupt: {name} fails its sha256 check "
                    "(re-export with --force)"
                )
            hashed += 1
            bytes_hashed += stamp[0]
        verified[name] = [*stamp, entry["sha256"]]
    if hashed or force:
        _write_record(directory, manifest_digest, verified)
    seconds = time.perf_counter() - started
    if hashed:
        log.info("verified %d files (%.1f MB) of %s in %.1fs", hashed, bytes_hashed / 1e6,
                 directory, seconds)  # fmt: skip
    return Verification(len(manifest.files), hashed, bytes_hashed, seconds)


@dataclass(frozen=True)
class Port:
    """A graph input or output: its name and shape (ints, or strings for symbolic dims)."""

    name: str
    shape: tuple


def check_graph_io(manifest: Manifest, inputs: list[Port], outputs: list[Port]) -> None:
    """The graph's inputs and outputs are the manifest's, with one past/present pair per layer
    of (batch, num_kv_heads, positions, head_dim) and logits of vocab_size. Raises ArtifactError
    with the first difference."""
    problems = []
    names_in, names_out = [p.name for p in inputs], [p.name for p in outputs]
    if sorted(names_in) != sorted(manifest.inputs):
        problems.append(f"inputs {names_in} != manifest {manifest.inputs}")
    if sorted(names_out) != sorted(manifest.outputs):
        problems.append(f"outputs {names_out} != manifest {manifest.outputs}")
    layers = range(manifest.num_layers)
    for prefix, ports in (("past_key_values", inputs), ("present", outputs)):
        expected = {f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")}
        found = {p.name for p in ports if p.name.startswith(prefix + ".")}
        if found != expected:
            problems.append(
                f"{len(found)} {prefix} tensors, but num_layers={manifest.num_layers} "
                f"needs {len(expected)}"
            )
        for port in ports:
            if port.name in expected and len(port.shape) == 4:
                _check_dim(problems, port, 1, manifest.num_kv_heads, "num_kv_heads")
                _check_dim(problems, port, 3, manifest.head_dim, "head_dim")
    for port in outputs:
        if port.name == "logits" and port.shape:
            _check_dim(problems, port, len(port.shape) - 1, manifest.vocab_size, "vocab_size")
    if problems:
        raise ArtifactError(f"the graph does not match the manifest: {problems[0]}")


def _check_dim(problems: list[str], port: Port, axis: int, expected: int, field: str) -> None:
    value = port.shape[axis]
    if isinstance(value, int) and value != expected:
        problems.append(f"{port.name} has {value} at axis {axis}, but manifest {field}={expected}")


def graph_ports(model_path: Path) -> tuple[list[Port], list[Port]]:
    """Inputs and outputs of an ONNX graph, read without its external weights. Raises
    ArtifactError when the file is not a readable ONNX model."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: one line is enough
        raise ArtifactError(f"{model_path} is not a valid ONNX model: {_first_line(e)}") from None
    initializers = {i.name for i in model.graph.initializer}

    def ports(values) -> list[Port]:
        return [
            Port(v.name, tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim))
            for v in values
            if v.name not in initializers
        ]

    return ports(model.graph.input), ports(model.graph.output)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def verify_artifact(directory: Path) -> tuple[Manifest, Verification]:
    """What `fermi verify` checks: the manifest, every file's sha256 (always hashed), and the
    graph's inputs and outputs. Raises ArtifactError with a one-line reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory")
    manifest = load_manifest(directory)
    verification = verify_files(directory, manifest, force=True)
    check_graph_io(manifest, *graph_ports(directory / MODEL_FILE))
    return manifest, verification


def ort_ports(values) -> list[Port]:
    """onnxruntime's NodeArgs as Ports."""
    return [
        Port(v.name, tuple(d if isinstance(d, int) else str(d) for d in v.shape)) for v in values
    ]
