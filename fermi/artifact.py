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
    # Model-family tags (None: unknown, inferred from the chat template when loaded).
    reasoning_tags: list[str] | None = None  # [start, end], e.g. ["<think>", "</think>"]
    tool_call_tags: list[str] | None = None  # e.g. ["<tool_call>", "</tool_call>"]
    tool_call_format: str | None = None  # "hermes": {"name": ..., "arguments": ...} inside the tags
    # More family knowledge (fermi/family.py); a manifest without these gets them inferred.
    detokenizer: str | None = None  # "byte_level" | "sentencepiece" (tokenizer.json's decoder)
    # The family's advised sampling defaults by mode: {"thinking": {...}, "non_thinking": {...}}
    sampling_advice: dict | None = None
    # Where default sampling values come from: "generation_config" | "family_advice" | "neutral"
    sampling_defaults: str | None = None
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
            if not isinstance(data, dict):
                raise TypeError("expected a JSON object")
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            if not FAMILY_FIELDS <= data.keys():
                data = {**_inferred_family(directory, data), **data}
            manifest = cls(**data)
            _check_fields(manifest)
            return manifest
        except (ValueError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{path} is not a valid manifest: {e}") from None


FAMILY_FIELDS = {
    "detokenizer",
    "reasoning_tags",
    "tool_call_tags",
    "tool_call_format",
    "sampling_advice",
    "sampling_defaults",
}


def _inferred_family(directory: Path, data: dict) -> dict:
    """Family fields for a manifest written before they existed: inferred from the artifact's
    tokenizer, chat template and generation config, the advice from the architecture spec."""
    from export.architectures import REGISTRY
    from fermi.family import family_fields

    arch = REGISTRY.get(data.get("architecture", ""))
    advice = arch.sampling_advice if arch else None
    return family_fields(directory, bool(data.get("supports_thinking")), advice)


INT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "context_length")
STR_LIST_FIELDS = ("inputs", "outputs")


def _check_fields(m: Manifest) -> None:
    """Types and ranges of the fields the engine relies on; raises TypeError or ValueError."""
    for name in INT_FIELDS:
        value = getattr(m, name)
        if type(value) is not int or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in STR_LIST_FIELDS:
        value = getattr(m, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of names")
    if not isinstance(m.eos_token_ids, list) or not all(type(i) is int for i in m.eos_token_ids):
        raise ValueError("eos_token_ids must be a list of integers")
    if not isinstance(m.files, dict):
        raise ValueError("files must map names to {sha256, bytes}")
    for name, entry in m.files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or type(entry.get("bytes")) is not int
            or ".." in Path(name).parts
            or Path(name).is_absolute()
        ):
            raise ValueError(f"files[{name!r}] must be {{sha256, bytes}} inside the artifact")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read by hashlib.file_digest (zero-copy buffers, no GIL held)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
