"""What a client can learn about the loaded model, decided once for every transport: the names it
answers to, its context length and what it can do. `/v1/models` and gRPC `ListModels` format it;
the ready line prints it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fermi.errors import InvalidRequest
from fermi.settings import Settings


@dataclass(frozen=True)
class ModelInfo:
    id: str  # the name responses report: the first --served-model-name, else the model's id
    names: tuple[str, ...]  # every name a request's `model` may use (id first)
    context_length: int  # tokens (prompt + answer), after --ctx-size
    supports_thinking: bool
    supports_tools: bool
    architecture: str  # e.g. "Qwen3ForCausalLM"
    precision: str  # fp32 | fp16 | int8 | int4
    target: str  # graph variant: cpu | cuda | coreml | portable


def own_names(source: str, model: str) -> list[str]:
    """The names a model answers to without aliases. `source` is the manifest's (hub id, absolute
    checkpoint path or tiny-qwen3), `model` what --model said (an id, a checkpoint or an artifact
    directory). A local model answers to its full path (vLLM's default served name), to the path
    as given, and to its folder's name; a hub model to its id and its last part (Qwen3-1.7B)."""
    names: list[str] = []
    for name in (source, model):
        path = Path(name).expanduser()
        candidates = [name.rstrip("/"), name.rstrip("/").rsplit("/", 1)[-1]]
        if path.exists():
            candidates.insert(1, str(path.resolve()))
        names += [c for c in candidates if c and c not in names]
    return names


def model_id(source: str) -> str:
    """The id a model reports without aliases: a hub id as is, a local path's folder name."""
    return Path(source).name if Path(source).is_absolute() else source


def capped_context(model_context: int, ctx_size: int) -> int:
    """--ctx-size caps the model's context; 0 keeps it. Raises InvalidRequest above it."""
    if not ctx_size:
        return model_context
    if ctx_size > model_context:
        raise InvalidRequest(
            f"--ctx-size {ctx_size} is larger than the model's context of {model_context} tokens",
            param="ctx_size",
        )
    return ctx_size


def supports_tools(manifest, template_source: str) -> bool:
    """Whether the chat template in use renders a `tools` list and, when the manifest records
    the model's tool-call tags, the model has them (a --chat-template override decides too)."""
    tags = getattr(manifest, "tool_call_tags", None)
    return (tags is None or bool(tags)) and "tools" in template_source


def supports_thinking(settings: Settings, manifest) -> bool:
    """FERMI_DISABLE_THINK, else FERMI_SUPPORTS_THINKING, else the manifest."""
    if settings.disable_think:
        return False
    if settings.supports_thinking is not None:
        return settings.supports_thinking
    return bool(manifest.supports_thinking)


def describe(settings: Settings, manifest, template_source: str) -> ModelInfo:
    """The ModelInfo of a loaded artifact under these settings."""
    served = settings.served_names
    own = own_names(manifest.source, settings.model)
    reported = served[0] if served else model_id(manifest.source)
    names = [reported] + [n for n in served + own if n != reported]
    return ModelInfo(
        id=reported,
        names=tuple(dict.fromkeys(names)),
        context_length=capped_context(manifest.context_length, settings.ctx_size),
        supports_thinking=supports_thinking(settings, manifest),
        supports_tools=supports_tools(manifest, template_source),
        architecture=manifest.architecture,
        precision=manifest.precision,
        target=manifest.target,
    )
