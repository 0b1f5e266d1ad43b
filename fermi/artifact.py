"""The artifact directory: `model.onnx` + external weights, tokenizer files, configs and the
`fermi.json` manifest that ties them together. Export writes it; the engine loads it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from fermi import __version__
from fermi.errors import ArtifactError

MANIFEST = "fermi.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    source: str  # hub id, local path or "tiny-qwen3"
    revision: str | None
    architecture: str  # e.g. "Qwen3ForCausalLM"
    precision: str  # "fp32" | "fp16" | "int8" | "int4"
    target: str  # graph variant: "portable" | "cpu" | "cuda" | "coreml"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]
    supports_thinking: bool
    inputs: list[str]
    outputs: list[str]
    kv_dtype: str  # numpy dtype name of past/present tensors
    files: dict[str, dict] = field(default_factory=dict)  # path -> {sha256, bytes}
    # How the engine feeds the graph: "concat" (past/present concatenated, all logits),
    # "shared" (one KV buffer per layer read and written in place, logits_index), "window"
    # (a fixed KV window with an additive mask). See export/ops*.py.
    io_mode: str = "concat"
    graph_options: dict = field(default_factory=dict)  # quantization block size, window ...
    session_config: dict = field(default_factory=dict)  # onnxruntime config entries to apply
    # GGUF sources: tensor -> {"gguf_type": "Q4_1", "stored": "carried"|"requantized"|"float"}
    weights: dict = field(default_factory=dict)
    fermi_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def model_name(self) -> str:
        return self.source.rstrip("/").split("/")[-1]

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a fermi artifact: {MANIFEST} is missing")
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{path} is not a valid manifest: {e}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in the artifact except the manifest itself."""
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def load_manifest(directory: Path, verify_hashes: bool = False) -> Manifest:
    """Read the manifest and check every listed file: presence and size always (cheap, catches
    truncation), sha256 only when asked, since hashing gigabytes would dominate cold start."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact {directory} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"artifact {directory} is corrupt: {name} has {size} bytes, expected "
                f"{entry['bytes']} (re-export with --force)"
            )
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"artifact {directory} is corrupt: {name} fails its sha256 check")
    return manifest
