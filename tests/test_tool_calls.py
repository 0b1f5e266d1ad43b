"""The Hermes tool-call parser: streamed pieces join to the final arguments for every way the
block is chunked, names come first, and a block that is not a call is given back as text."""

from __future__ import annotations

import json

import pytest

from fermi.tool_calls import HermesToolCalls
from tests.test_text_stream import chunkings

BLOCKS = [
    '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n',
    '{"name":"f","arguments":{}}',
    '\n{"name": "f", "arguments": {"s": "a } b", "n": {"m": [1, {"x": "}"}]}}}\n',
    '{"name": "na\\"me", "arguments": {"q": "\\u00e9"}}',
]


def run(parser: HermesToolCalls, chunks: list[str]):
    pieces = [p for chunk in chunks for p in parser.feed(chunk)]
    tail, plain = parser.end()
    return pieces + tail, plain


@pytest.mark.parametrize("block", BLOCKS)
def test_streamed_arguments_join_to_the_final_arguments(block):
    expected = json.loads(block)
    for chunks in chunkings(block, random_count=20):
        parser = HermesToolCalls()
        pieces, plain = run(parser, chunks)
        assert plain is None
        assert pieces[0].id.startswith("call_") and pieces[0].name == expected["name"]
        assert all(p.id is None and p.name is None for p in pieces[1:])
        arguments = "".join(p.arguments for p in pieces)
        assert arguments == parser.calls[0].arguments
        assert json.loads(arguments) == expected["arguments"]


def test_successive_blocks_get_successive_indexes_and_ids():
    parser = HermesToolCalls()
    first, _ = run(parser, [BLOCKS[0]])
    second, _ = run(parser, [BLOCKS[1]])
    assert {p.index for p in first} == {0} and {p.index for p in second} == {1}
    assert parser.calls[0].id != parser.calls[1].id
    assert parser.calls[1].as_openai() == {
        "id": parser.calls[1].id,
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }


def test_a_block_in_another_key_order_is_parsed_whole():
    parser = HermesToolCalls()
    pieces, plain = run(parser, ['{"arguments": {"a": 1}, "name": "f"}'])
    assert plain is None
    assert [(p.name, p.arguments) for p in pieces] == [("f", '{"a": 1}')]


@pytest.mark.parametrize("block", ["not json", '{"no": "name"}', "[1, 2]"])
def test_a_block_that_is_not_a_call_comes_back_as_text(block):
    parser = HermesToolCalls()
    pieces, plain = run(parser, [block])
    assert pieces == [] and plain == f"<tool_call>{block}</tool_call>"
    assert parser.calls == []


@pytest.mark.parametrize("text", ['\n{"name": "', '\n{"na', "not json"])
def test_a_block_cut_short_before_its_name_is_dropped_never_text(text):
    parser = HermesToolCalls()
    parser.feed(text)
    assert parser.end(closed=False) == ([], None) and parser.calls == []


@pytest.mark.parametrize(
    "text, arguments",
    [('\n{"name": "f", "argum', ""), ('\n{"name": "f", "arguments": {"a": "x', '{"a": "x')],
)
def test_a_block_cut_short_after_its_name_is_a_call_with_partial_arguments(text, arguments):
    parser = HermesToolCalls()
    streamed = parser.feed(text)
    pieces, plain = parser.end(closed=False)
    assert plain is None
    assert "".join(p.arguments for p in streamed + pieces) == arguments
    assert [(c.name, c.arguments) for c in parser.calls] == [("f", arguments)]
