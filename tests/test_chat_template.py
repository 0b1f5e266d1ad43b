"""Chat template loading and rendering, and the thinking switch's precedence."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from fermi.chat_template import (
    ChatTemplate,
    opens_think_block,
    parse_thinking,
    resolve_thinking,
)
from fermi.errors import ArtifactError, InvalidRequest
from fermi.requests import Message
from fermi.settings import Settings

# A template written for this test in the shape of Qwen3's (no tools): ChatML turns, the reasoning
# of assistant turns before the last user query dropped, and an empty think block when
# enable_thinking is false.
QWEN3_LIKE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
    {%- if not ns.found and message.role == 'user' %}
        {%- set ns.found = true %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "2+2?"),
    Message("assistant", "4", reasoning_content="Add them."),
    Message("user", "3+3?"),
]


def write_dir(tmp_path, config: dict, jinja: str | None = None):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


def test_render_thinking_on(tmp_path):
    template = ChatTemplate.from_dir(write_dir(tmp_path, {"chat_template": QWEN3_LIKE}))
    assert template.render(CONVERSATION, enable_thinking=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"  # reasoning before the last query is dropped
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_thinking_off_adds_empty_think_block(tmp_path):
    template = ChatTemplate.from_dir(write_dir(tmp_path, {"chat_template": QWEN3_LIKE}))
    prompt = template.render(CONVERSATION[-1:], enable_thinking=False)
    assert (
        prompt == "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert not opens_think_block(prompt)


def test_reasoning_after_last_query_is_kept(tmp_path):
    template = ChatTemplate.from_dir(write_dir(tmp_path, {"chat_template": QWEN3_LIKE}))
    messages = [*CONVERSATION, Message("assistant", "6", reasoning_content="\nDouble 3.\n")]
    assert template.render(messages, enable_thinking=True, add_generation_prompt=False).endswith(
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nDouble 3.\n</think>\n\n6<|im_end|>\n"
    )


def test_jinja_file_wins_and_list_form_uses_default(tmp_path):
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    assert ChatTemplate.from_dir(write_dir(tmp_path, {"chat_template": listed})).render(
        [], True
    ) == ("DEFAULT")
    write_dir(tmp_path, {"chat_template": listed}, jinja="FROM FILE")
    assert ChatTemplate.from_dir(tmp_path).render([], True) == "FROM FILE"


def test_missing_or_bad_template_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError):
        ChatTemplate.from_dir(write_dir(tmp_path, {}))
    with pytest.raises(ArtifactError):
        ChatTemplate.from_dir(
            write_dir(tmp_path, {"chat_template": [{"name": "x", "template": "y"}]})
        )
    with pytest.raises(ArtifactError):
        ChatTemplate("{% if %}")


def test_bos_eos_tokens_and_helpers(tmp_path):
    config = {
        "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|"
        "{{ {'a': [1]} | tojson(indent=2) }}|{{ strftime_now('%Y') }}",
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "<|im_end|>",
    }
    template = ChatTemplate.from_dir(write_dir(tmp_path, config))
    assert (template.bos_token, template.eos_token) == ("<s>", "<|im_end|>")
    rendered = template.render([Message("user", "héllo <b> 你好")], enable_thinking=True)
    assert rendered == (
        '<s>|<|im_end|>|[{"role": "user", "content": "héllo <b> 你好"}]|'
        + '{\n  "a": [\n    1\n  ]\n}|'
        + str(datetime.now().year)
    )


def test_enable_thinking_and_reasoning_content_are_passed():
    template = ChatTemplate(
        "{{ enable_thinking }}{% for m in messages %}|{{ m | tojson }}{% endfor %}"
    )
    messages = [Message("user", "q"), Message("assistant", "a", reasoning_content="r")]
    assert template.render(messages, enable_thinking=False) == (
        'False|{"role": "user", "content": "q"}'
        '|{"role": "assistant", "content": "a", "reasoning_content": "r"}'
    )


def test_raise_exception_becomes_invalid_request():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('bad role') }}{% endif %}"
    )
    with pytest.raises(InvalidRequest, match="bad role") as info:
        template.render([Message("assistant", "x")], enable_thinking=True)
    assert info.value.param == "messages"


def test_sandbox_blocks_unsafe_attributes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest):
        template.render([], enable_thinking=True)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>assistant\n", False),
    ],
)
def test_opens_think_block(prompt, expected):
    assert opens_think_block(prompt) is expected


# --- thinking switch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("on", "on"), ("TRUE", "on"), ("1", "on"), ("yes", "on"), (True, "on"), (1, "on"),
        ("off", "off"), ("false", "off"), ("0", "off"), (" No ", "off"), (False, "off"), (0, "off"),
        ("auto", "auto"), ("Auto", "auto"),
    ],
)  # fmt: skip
def test_parse_thinking(value, expected):
    assert parse_thinking(value) == expected


@pytest.mark.parametrize("value", ["maybe", "", None, 2, 1.0, ["on"]])
def test_parse_thinking_rejects(value):
    with pytest.raises(InvalidRequest) as info:
        parse_thinking(value)
    assert info.value.param == "thinking"


@pytest.mark.parametrize(
    "requested, settings, model_supports, expected",
    [
        # absent request: the configured default, else off
        (None, Settings(), True, False),
        (None, Settings(default_thinking="on"), True, True),
        (None, Settings(default_thinking="auto"), True, True),
        (None, Settings(default_thinking="auto"), False, False),
        (None, Settings(default_thinking="off"), True, False),
        # explicit request wins over the default
        ("off", Settings(default_thinking="on"), True, False),
        ("on", Settings(default_thinking="off"), True, True),
        ("auto", Settings(), True, True),
        # disable_think forces off
        ("on", Settings(disable_think=True), True, False),
        (None, Settings(default_thinking="on", disable_think=True), True, False),
        # support: the manifest's
        ("on", Settings(), False, False),
        ("auto", Settings(), False, False),
        # support: settings beat the manifest
        ("on", Settings(supports_thinking=False), True, False),
        ("auto", Settings(supports_thinking=True), False, True),
        ("off", Settings(supports_thinking=True), True, False),
    ],
)
def test_resolve_thinking(requested, settings, model_supports, expected):
    assert resolve_thinking(requested, settings, model_supports) is expected


def test_thinking_support_never_comes_from_the_model_name():
    """The name decides nothing: a thinking-capable name with a manifest that says no is off."""
    import inspect

    assert "model_id" not in inspect.signature(resolve_thinking).parameters
    assert resolve_thinking("on", Settings(model="deepseek-ai/DeepSeek-R1"), False) is False


def test_resolve_thinking_from_environment(tmp_path, monkeypatch):
    from fermi.settings import load_settings

    monkeypatch.chdir(tmp_path)  # no stray fermi.toml

    env = {"FERMI_DEFAULT_THINKING": "on", "FERMI_SUPPORTS_THINKING": "false"}
    assert resolve_thinking(None, load_settings(env), True) is False
    env = {"FERMI_DEFAULT_THINKING": "auto", "FERMI_SUPPORTS_THINKING": "1"}
    assert resolve_thinking(None, load_settings(env), False) is True
    env = {"FERMI_DEFAULT_THINKING": "on", "FERMI_DISABLE_THINK": "yes"}
    assert resolve_thinking("on", load_settings(env), True) is False


def test_qwen3_real_template_renders_thinking_switch(qwen3_tokenizer_dir):
    template = ChatTemplate.from_dir(qwen3_tokenizer_dir)
    messages = [Message(role="user", content="Hi")]
    off = template.render(messages, enable_thinking=False)
    on = template.render(messages, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
