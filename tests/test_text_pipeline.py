"""The runtime's text pipeline on Qwen3's real tokenizer, fed scripted token ids: stop strings
apply to the answer only, output that no think block was allowed into is never split, and tool
calls leave the answer as their own events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from fermi.detokenizer import StreamingDetokenizer
from fermi.requests import TextDelta, ToolCallDelta
from fermi.runtime import Runtime, TextPipeline
from fermi.sampling import SampledToken
from fermi.settings import Settings
from fermi.text_stream import OutputChannels, channel_table
from fermi.tool_calls import HermesToolCalls

THINK = ("<think>", "</think>")
TOOL = ("<tool_call>", "</tool_call>")


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))


def run(tokenizer, text: str, initial: str, stops=(), tools: bool = False):
    table = channel_table(THINK, TOOL if tools else None)
    pipeline = TextPipeline(
        StreamingDetokenizer(tokenizer),
        list(stops),
        OutputChannels(table, initial),
        HermesToolCalls() if tools else None,
    )
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    events, fed = [], 0
    for token in ids:
        new, stopped = pipeline.add(SampledToken(token))
        events += new
        fed += 1
        if stopped:
            break
    events += pipeline.finish()
    return pipeline, events, fed, len(ids)


def texts(events, kind: str) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == kind)


def test_a_stop_string_inside_the_reasoning_does_not_stop(tokenizer):
    """The issue's case: the prompt opened <think>, the reasoning contains the stop string."""
    _, events, fed, total = run(
        tokenizer, "X marks the spot.\n</think>\n\nThe answer is X, not Y.", "reasoning", ["X"]
    )
    assert texts(events, "reasoning") == "X marks the spot."
    assert texts(events, "answer") == "The answer is "
    assert fed < total  # it stopped at the answer's X


def test_a_literal_think_block_stays_in_the_answer_when_none_was_allowed(tokenizer):
    snippet = "<think>\nan XML element\n</think>\n\nas asked."
    _, events, _, _ = run(tokenizer, snippet, "answer")
    assert texts(events, "answer") == snippet
    assert texts(events, "reasoning") == ""


def test_thinking_on_still_splits_a_block_the_model_opens(tokenizer):
    _, events, _, _ = run(tokenizer, "<think>\nhm\n</think>\n\nHi", "start")
    assert (texts(events, "reasoning"), texts(events, "answer")) == ("hm", "Hi")


def test_tool_calls_are_events_of_their_own(tokenizer):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    pipeline, events, _, _ = run(
        tokenizer, f"Checking.\n{call}\n{call}", "answer", stops=["}"], tools=True
    )
    assert texts(events, "answer") == "Checking."  # no tag text, no stop inside the call
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [d.index for d in deltas if d.id] == [0, 1]
    for index in (0, 1):
        arguments = "".join(d.arguments for d in deltas if d.index == index)
        assert json.loads(arguments) == {"city": "Paris"}
    message = pipeline.as_message()
    assert message.content == "Checking."
    assert [c["function"]["name"] for c in message.tool_calls] == ["get_weather"] * 2


def test_without_tools_the_tags_are_answer_text(tokenizer):
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    _, events, _, _ = run(tokenizer, call, "answer", tools=False)
    assert texts(events, "answer") == call


def test_first_channel_follows_the_prompt_and_the_thinking_switch(tiny_artifact):
    runtime = Runtime(Settings(), Path(tiny_artifact), "cpu")
    assert runtime.reasoning_tags == list(THINK) and runtime.tool_call_tags == list(TOOL)
    assert runtime._first_channel("<|im_start|>assistant\n<think>\n", True) == "reasoning"
    assert runtime._first_channel("<|im_start|>assistant\n", True) == "start"
    off = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert runtime._first_channel(off, False) == "answer"
    runtime.reasoning_tags = None  # a model that cannot think
    assert runtime._first_channel("<|im_start|>assistant\n", True) == "answer"
