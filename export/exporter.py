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
from export.gguf_carry import CarriedOps, weights_record
from export.gguf_checkpoint import GGUFCheckpoint, open_gguf
from export.graph import GraphBuilder, WeightsFile
from export.ops import PortableOps
from export.progress import current, for_terminal, reporting
from export.source import Source, resolve
from export.staging import staged_directory
from export.variants import (
    QUANTIZED,
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
    precision: str | None = "fp16",
    output: Path | str | None = None,
    revision: str | None = None,
    force: bool = False,
    settings: Settings | None = None,
    target: str = "portable",
    options: GraphOptions | None = None,
    gguf_file: str | None = None,
) -> Path:
    """Export MODEL (hub id, local checkpoint dir, .gguf file or built-in name; a hub repo's
    GGUF file named by `gguf_file`) and return the artifact directory. `target` is portable,
    cpu, cuda, coreml or auto (this machine's device); see export/variants.py. `precision`
    None is the default for the source and target (`default_precision`). A valid artifact of
    the same source, revision and variant is reused unless `force`; one of another variant is
    replaced. An `output` given explicitly that holds another model's artifact is an
    ArtifactError unless `force` (a mistyped path must not overwrite an export silently)."""
    settings = settings or load_settings()
    target = resolve_target(target)
    if precision is not None:  # before any download
        check(precision, target, options or GraphOptions())
    source = resolve(model, revision, settings, gguf_file)
    if precision is None:
        precision = default_precision(source, target, settings.device)
    variant = Variant(precision, target, options or GraphOptions())
    check(variant.precision, variant.target, variant.options)
    explicit = output is not None
    if output is None:
        suffix = "" if variant.target == "portable" else f"-{variant.target}"
        output = Path(settings.artifacts) / f"{source.model_name}-{precision}{suffix}"
    output = Path(output)
    if not force and reusable(output, source, variant):
        return output
    check_replaceable(output)
    if explicit and not force:
        check_same_model(output, source)
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


def check_same_model(output: Path, source: Source) -> None:
    """An artifact already in `output` is of the model being exported (another precision or
    graph may replace it), or absent or unreadable (it is rebuilt)."""
    try:
        held = load_manifest(output).source if (output / MANIFEST).is_file() else None
    except ArtifactError:
        return
    if held is not None and held != source.name:
        raise ArtifactError(
            f"{output} holds an export of {held}, not {source.name}: pass --force to replace "
            "it, or choose another output"
        )


def check_replaceable(output: Path) -> None:
    """Replace only an earlier artifact or an empty directory, never a user's other files."""
    if output.is_file() or (
        output.is_dir() and not (output / MANIFEST).is_file() and any(output.iterdir())
    ):
        raise ArtifactError(f"{output} exists and is not a fermi artifact; choose another output")


def default_precision(source: Source, target: str, device: str = "auto") -> str:
    """The target device's float precision (fp32 on CPU, fp16 on CUDA and CoreML; for the
    portable target, that of `device`, this machine's as FERMI_DEVICE picks it); for a quantized
    GGUF on the cpu/cuda targets, int4/int8 with its blocks carried over (export/gguf_carry.py)."""
    from fermi.engine import PRECISION, pick_device

    if source.gguf_file is not None and target in ("cpu", "cuda"):
        from export.gguf_carry import default_precision as gguf_precision

        with open_gguf(source.gguf_file) as checkpoint:
            quantized = gguf_precision(checkpoint)
        if quantized:
            return quantized
    if target not in PRECISION:  # portable: the device it will run on
        target = device if device in PRECISION else pick_device(device)
    return PRECISION[target]


def open_checkpoint(source: Source) -> Checkpoint | GGUFCheckpoint:
    if source.gguf_file is not None:
        return open_gguf(source.gguf_file)
    return Checkpoint(source.directory)


def inspect_checkpoint(source: Source) -> tuple[Architecture, ModelConfig]:
    """Fail before writing anything when the checkpoint cannot be exported."""
    if source.gguf_file is not None:
        from export.gguf_tokenizer import converter

        converter()  # the `gguf` extra is installed
        with open_gguf(source.gguf_file) as checkpoint:
            config = checkpoint.config
        return find_architecture(config), model_config(config)
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
    with open_checkpoint(source) as checkpoint:
        ops = write_graph(checkpoint, architecture, config, variant, directory)
        if source.gguf_file is not None:
            write_gguf_files(checkpoint, directory)
            weights = weights_record(checkpoint, ops)
        else:
            copy_checkpoint_files(source.directory, directory)
            weights = {}
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
        weights=weights,
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
        if isinstance(checkpoint, GGUFCheckpoint) and variant.precision in QUANTIZED:
            ops = CarriedOps(builder, config, QUANTIZED[variant.precision], variant.options)
        else:
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


def write_gguf_files(checkpoint: GGUFCheckpoint, directory: Path) -> None:
    """config.json from the GGUF metadata, the tokenizer files from its vocabulary."""
    from export.gguf_tokenizer import write_tokenizer_files

    (directory / "config.json").write_text(json.dumps(checkpoint.config, indent=2) + "\n")
    write_tokenizer_files(checkpoint, directory)


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
