"""`export_model`: resolve a checkpoint, build its ONNX graph, and write the artifact directory
atomically (a temporary sibling renamed at the end), so an interrupted export never leaves
something that loads."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from export.architectures import Architecture, ModelConfig, find_architecture, model_config
from export.checkpoint import Checkpoint, read_json
from export.decoder import Decoder
from export.graph import GraphBuilder, WeightsFile
from export.ops import PortableOps
from export.progress import current, for_terminal, reporting
from export.source import Source, resolve
from export.staging import staged_directory
from export.variants import (
    GraphOptions,
    check,
    compute_dtype,
    make_ops,
    recorded_options,
    resolve_target,
)
from fermi.artifact import (
    MANIFEST,
    MODEL_FILE,
    WEIGHTS_FILE,
    Manifest,
    describe_files,
    load_manifest,
)
from fermi.errors import ArtifactError, ModelNotFound
from fermi.family import family_fields
from fermi.settings import Settings, load_settings

# Copied from the checkpoint when present; tokenizer.json and config.json are required.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Variant:
    precision: str
    target: str  # resolved: never "auto"
    options: GraphOptions

    @property
    def recorded(self) -> dict:
        return recorded_options(self.precision, self.target, self.options)


def export_model(
    model: str,
    precision: str = "fp16",
    output: Path | str | None = None,
    revision: str | None = None,
    force: bool = False,
    settings: Settings | None = None,
    target: str = "portable",
    options: GraphOptions | None = None,
) -> Path:
    """Export MODEL (hub id, local checkpoint dir or tiny-qwen3) and return the artifact
    directory. `target` is portable, cpu, cuda, coreml or auto (this machine's device); see
    export/variants.py. A valid artifact of the same source, revision and variant is reused
    unless `force`."""
    variant = Variant(precision, resolve_target(target), options or GraphOptions())
    check(variant.precision, variant.target, variant.options)
    settings = settings or load_settings()
    source = resolve(model, revision, settings)
    if output is None:
        suffix = "" if variant.target == "portable" else f"-{variant.target}"
        output = Path(settings.artifacts) / f"{source.model_name}-{precision}{suffix}"
    output = Path(output)
    if not force and reusable(output, source, variant):
        return output
    check_replaceable(output)
    architecture, config = inspect_checkpoint(source)
    with staged_directory(output) as directory, reporting(for_terminal()):
        write_artifact(source, architecture, config, variant, directory)
    return output


def reusable(output: Path, source: Source, variant: Variant) -> bool:
    if not (output / MANIFEST).is_file():
        return False
    try:
        manifest = load_manifest(output)
    except ArtifactError:
        return False
    return (
        manifest.source,
        manifest.revision,
        manifest.precision,
        manifest.target,
        manifest.graph_options,
    ) == (source.name, source.revision, variant.precision, variant.target, variant.recorded)


def check_replaceable(output: Path) -> None:
    """Replace only an earlier artifact or an empty directory, never a user's other files."""
    if output.is_file() or (
        output.is_dir() and not (output / MANIFEST).is_file() and any(output.iterdir())
    ):
        raise ArtifactError(f"{output} exists and is not a fermi artifact; choose another output")


def inspect_checkpoint(source: Source) -> tuple[Architecture, ModelConfig]:
    """Fail before writing anything when the checkpoint cannot be exported."""
    missing = [f for f in REQUIRED_FILES if not (source.directory / f).is_file()]
    if missing:
        raise ModelNotFound(
            f"{source.name} is not a complete checkpoint: it lacks {', '.join(missing)} "
            "(fermi needs the config and fast-tokenizer files)"
        )
    config = read_json(source.directory / "config.json")
    return find_architecture(config), model_config(config)


def write_artifact(
    source: Source,
    architecture: Architecture,
    config: ModelConfig,
    variant: Variant,
    directory: Path,
) -> None:
    with Checkpoint(source.directory) as checkpoint:
        ops = write_graph(checkpoint, architecture, config, variant, directory)
    copy_checkpoint_files(source.directory, directory)
    inputs, outputs = ops.io_names()
    manifest = Manifest(
        source=source.name,
        revision=source.revision,
        architecture=architecture.name,
        precision=variant.precision,
        target=variant.target,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        context_length=ops.context_length,
        eos_token_ids=eos_token_ids(directory),
        supports_thinking=(thinking := supports_thinking(directory)),
        inputs=inputs,
        outputs=outputs,
        kv_dtype=compute_dtype(variant.precision, variant.target).name,
        files=hashed_files(directory),
        io_mode=ops.io_mode,
        graph_options=variant.recorded,
        session_config=ops.session_config,
        **family_fields(directory, thinking, architecture.sampling_advice),
    )
    manifest.save(directory)


def write_graph(
    checkpoint: Checkpoint,
    architecture: Architecture,
    config: ModelConfig,
    variant: Variant,
    directory: Path,
) -> PortableOps:
    converted = current().task("converting tensors", total=len(checkpoint))
    written = current().task(f"writing {WEIGHTS_FILE}", unit="bytes")
    with WeightsFile(directory / WEIGHTS_FILE, on_write=written.advance) as weights:
        dtype = compute_dtype(variant.precision, variant.target)
        builder = GraphBuilder(checkpoint, weights, dtype, on_param=converted.advance)
        ops = make_ops(builder, config, variant.precision, variant.target, variant.options)
        Decoder(builder, ops, architecture, config).build()
    converted.done()  # a tied checkpoint leaves its lm_head unread
    written.done()
    (directory / MODEL_FILE).write_bytes(builder.model(architecture.name).SerializeToString())
    return ops


def hashed_files(directory: Path) -> dict[str, dict]:
    """describe_files (sha256 and size of every file), shown as a progress line."""
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    hashing = current().task("hashing", total=total, unit="bytes")
    files = describe_files(directory)
    hashing.done()
    return files


def copy_checkpoint_files(checkpoint: Path, directory: Path) -> None:
    for name in CHECKPOINT_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, directory / name)
    if not (directory / "generation_config.json").is_file():
        config = read_json(directory / "config.json")
        generation = {"eos_token_id": config.get("eos_token_id")}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def eos_token_ids(directory: Path) -> list[int]:
    """Stop tokens: generation_config's eos_token_id (an int or a list), else config's."""
    eos = read_json(directory / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = read_json(directory / "config.json").get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def chat_template(directory: Path) -> str:
    template = read_json(directory / "tokenizer_config.json").get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = "".join(t.get("template", "") for t in template)
    jinja = directory / "chat_template.jinja"
    return template + (jinja.read_text() if jinja.is_file() else "")


def supports_thinking(directory: Path) -> bool:
    template = chat_template(directory)
    return "enable_thinking" in template or "<think>" in template
