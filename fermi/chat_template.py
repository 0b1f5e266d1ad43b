"""The model's own chat template, rendered the way Hugging Face does, and the thinking switch.

Qwen3's template is the real thinking switch: `enable_thinking=False` ends the generation prompt
with an empty `<think>\\n\\n</think>\\n\\n` block (the original fermi added a system instruction
instead, which the model may ignore). `resolve_thinking` keeps the original's precedence of request,
settings and model support.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fermi.errors import ArtifactError, InvalidRequest
from fermi.requests import Message, Thinking
from fermi.settings import Settings

THINKING_VALUES: dict[str, Thinking] = {
    **dict.fromkeys(("on", "true", "1", "yes"), "on"),
    **dict.fromkeys(("off", "false", "0", "no"), "off"),
    "auto": "auto",
}


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    """HF's tojson: unlike jinja2's, it keeps non-ASCII text and does not HTML-escape."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, source: Path) -> str:
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{source}: chat_template has no usable (default) template")
    return value


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ArtifactError(f"the chat template does not compile: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        """chat_template.jinja if present, else tokenizer_config.json's chat_template."""
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{config_path} cannot be read: {e}") from None
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            source = jinja.read_text()
        elif "chat_template" in config:
            source = _pick_template(config["chat_template"], config_path)
        else:
            raise ArtifactError(
                f"{path} has no chat_template.jinja and no chat_template in tokenizer_config.json"
            )
        bos = _token_text(config.get("bos_token"))
        return cls(source, bos_token=bos, eos_token=_token_text(config.get("eos_token")))

    def render(
        self,
        messages: list[Message],
        enable_thinking: bool,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """The prompt text, as transformers' apply_chat_template renders it: `tools` (OpenAI
        function tools) and each message's `tool_calls` / `tool_call_id` are passed to the
        template unchanged. A template's raise_exception becomes InvalidRequest("messages")."""
        dicts = []
        for m in messages:
            d = {"role": m.role, "content": m.content}
            for name in ("reasoning_content", "tool_calls", "tool_call_id"):
                if getattr(m, name) is not None:
                    d[name] = getattr(m, name)
            dicts.append(d)
        try:
            return self._template.render(
                messages=dicts,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise InvalidRequest(f"chat template: {e}", param="messages") from None


def opens_think_block(prompt: str, start_tag: str = "<think>") -> bool:
    """Whether the prompt ends inside an open reasoning block (the model continues reasoning)."""
    return prompt.rstrip().endswith(start_tag)


def infer_reasoning_tags(source: str, supports_thinking: bool) -> list[str] | None:
    """For artifacts whose manifest predates `reasoning_tags`: Qwen's tags when the model can
    think or its template knows them."""
    return ["<think>", "</think>"] if supports_thinking or "<think>" in source else None


def infer_tool_call_tags(source: str) -> tuple[list[str] | None, str | None]:
    """For artifacts whose manifest predates `tool_call_tags`: Hermes-style tags (Qwen2.5,
    Qwen3) when the chat template writes them. Returns (tags, format)."""
    if "<tool_call>" in source and "</tool_call>" in source:
        return ["<tool_call>", "</tool_call>"], "hermes"
    return None, None


def parse_thinking(value: object) -> Thinking:
    """on/true/1/yes, off/false/0/no, auto (any case) or a bool; else InvalidRequest."""
    if isinstance(value, bool):
        return "on" if value else "off"
    key = str(value).strip().lower() if isinstance(value, str | int) else None
    if key not in THINKING_VALUES:
        raise InvalidRequest(
            f"thinking must be one of on, off, auto (or true/false, 1/0, yes/no), got {value!r}",
            param="thinking",
        )
    return THINKING_VALUES[key]


# Model ids of thinking-capable families; "r1" only as a whole word (deepseek-r1, r1-distill).
_THINKING_MODEL = re.compile(r"qwen|deepseek|qwq|(?<![a-z0-9])r1(?![a-z0-9])")


def model_supports_thinking(model_id: str) -> bool:
    return bool(_THINKING_MODEL.search(model_id.lower()))


def resolve_thinking(
    requested: Thinking | None, settings: Settings, model_id: str, model_supports: bool | None
) -> bool:
    """Whether this request renders its prompt with thinking enabled.

    Absent -> settings.default_thinking, else off. settings.disable_think forces off. "on" and
    "auto" are on only when the model supports thinking: settings.supports_thinking if set, else
    the manifest's `model_supports` if known, else inferred from the model id.
    """
    if settings.disable_think:
        return False
    mode = (
        requested if requested is not None else parse_thinking(settings.default_thinking or "off")
    )
    if mode == "off":
        return False
    if settings.supports_thinking is not None:
        return settings.supports_thinking
    if model_supports is not None:
        return model_supports
    return model_supports_thinking(model_id)
