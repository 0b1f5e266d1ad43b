"""Constrained decoding on Qwen3's real vocabulary: whatever a random model draws under the
mask is valid (JSON against its schema, a forced tool call, a regex), the grammar waits for the
reasoning to end, and a grammar llguidance cannot take is a 400 naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from fermi.constraints import (
    Constraint,
    GrammarCompiler,
    close_objects,
    rebase_refs,
    request_grammar,
)
from fermi.errors import InvalidRequest
from fermi.requests import GenerationRequest, Message, OutputFormat
from fermi.sampling import ResolvedSampling, Sampler
from fermi.tool_calls import HermesToolCalls

VOCAB = 151936  # Qwen3's logits width (the tokenizer holds 151669 tokens)
EOS = [151645, 151643]
THINK = (151667, 151668)  # <think>, </think>
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "unit", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, EOS)


def random_logits(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0, 3, VOCAB).astype(np.float32)


def draw(compiler, request, seed: int, state="grammar", limit=300) -> list[int]:
    """Sample from random logits under the request's constraint until an end token."""
    terms = [compiler.tag_term(t) for t in ("<tool_call>", "</tool_call>")]
    spec = request_grammar(request, terms)
    constraint = Constraint(compiler.matcher(spec), VOCAB, state, THINK)
    sampler = Sampler(ResolvedSampling(1.0, 1.0, 0, 0.0), seed, constraint=constraint)
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    while len(tokens) < limit:
        token = sampler.sample(random_logits(rng))
        if token in EOS:
            return tokens
        tokens.append(token)
    raise AssertionError(f"no end after {limit} tokens")


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_answers_validate(compiler, tokenizer, seed):
    request = GenerationRequest([], output_format=OutputFormat("json_schema", SCHEMA))
    text = tokenizer.decode(draw(compiler, request, seed))
    jsonschema.validate(json.loads(text), close_objects(SCHEMA))


def test_json_object_answers_are_objects(compiler, tokenizer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    request = GenerationRequest([], output_format=OutputFormat("json_schema", schema))
    assert set(json.loads(tokenizer.decode(draw(compiler, request, 0)))) == {"ok"}


def test_regex_answers_match(compiler, tokenizer):
    pattern = r"(yes|no), [0-9]{3}"
    request = GenerationRequest([], output_format=OutputFormat("regex", pattern))
    assert re.fullmatch(pattern, tokenizer.decode(draw(compiler, request, 1)))


def test_lark_answers_follow_the_grammar(compiler, tokenizer):
    grammar = 'start: "Answer: " ("A" | "B" | "C")'
    request = GenerationRequest([], output_format=OutputFormat("lark", grammar))
    assert tokenizer.decode(draw(compiler, request, 2)) in ("Answer: A", "Answer: B", "Answer: C")


def parse_calls(tokenizer, tokens: list[int]) -> list[dict]:
    """The drawn text, split on the tags and parsed as the runtime does."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)
    assert re.fullmatch(r"(<tool_call>.*?</tool_call>\n?)+", text, re.S), text
    parser = HermesToolCalls()
    for block in blocks:
        parser.feed(block)
        assert parser.end()[1] is None
    return [c.as_openai()["function"] for c in parser.calls]


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_calls_validate_against_their_function(compiler, tokenizer, seed):
    request = GenerationRequest([], tools=TOOLS, tool_choice="required")
    calls = parse_calls(tokenizer, draw(compiler, request, seed))
    assert calls
    for call in calls:
        arguments = json.loads(call["arguments"])
        if call["name"] == "get_weather":
            jsonschema.validate(arguments, close_objects(SCHEMA))
        else:
            assert call["name"] == "now" and arguments == {}


OBJECT = {"type": "object", "properties": {"x": {"type": "integer"}}}
NULLABLE = [
    {"type": ["object", "null"], "properties": {"x": {"type": "integer"}}},
    {"anyOf": [OBJECT, {"type": "null"}]},
    {"oneOf": [{"type": "null"}, OBJECT]},
]


@pytest.mark.parametrize("schema", NULLABLE, ids=["type list", "anyOf", "oneOf"])
@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_parameters_that_allow_null_still_give_an_object(compiler, tokenizer, tool_choice, schema):
    """Parameters that also allow null (pydantic's Optional model): a call's arguments are a
    JSON object, never `null`, which a client's `**json.loads(arguments)` would crash on."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    request = GenerationRequest([], tools=tools, tool_choice=tool_choice)
    terms = [compiler.tag_term(t) for t in ("<tool_call>", "</tool_call>")]

    def accepted(text: str) -> bool:
        matcher = compiler.matcher(request_grammar(request, terms))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return matcher.try_consume_tokens(ids) == len(ids) and not matcher.is_error()

    assert accepted('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert not accepted('<tool_call>\n{"name": "f", "arguments": null}\n</tool_call>')


def test_tool_parameters_with_defs_and_refs_keep_their_meaning(compiler, tokenizer):
    """Refs resolve from the parameters' root, not the call grammar's that embeds them."""
    schema = {
        "type": "object",
        "properties": {
            "place": {"$ref": "#/$defs/Place"},
            "tag": {"const": {"$ref": "#/data"}},  # data, not a reference
        },
        "required": ["place", "tag"],
        "$defs": {"Place": {"enum": ["Paris", "Rome"]}},
    }
    tools = [{"type": "function", "function": {"name": "visit", "parameters": schema}}]
    request = GenerationRequest([], tools=tools, tool_choice="visit", parallel_tool_calls=False)
    for seed in range(2):
        [call] = parse_calls(tokenizer, draw(compiler, request, seed))
        arguments = json.loads(call["arguments"])
        assert arguments["place"] in ("Paris", "Rome") and arguments["tag"] == {"$ref": "#/data"}
    recursive = {"type": "array", "items": {"$ref": "#"}}
    assert rebase_refs(recursive, "#/p") == {"type": "array", "items": {"$ref": "#/p"}}


def test_a_named_function_is_the_one_called_once_without_parallel_calls(compiler, tokenizer):
    request = GenerationRequest(
        [], tools=TOOLS, tool_choice="get_weather", parallel_tool_calls=False
    )
    for seed in range(3):
        calls = parse_calls(tokenizer, draw(compiler, request, seed))
        assert [c["name"] for c in calls] == ["get_weather"]


def test_the_grammar_waits_for_the_reasoning_to_end(compiler):
    request = GenerationRequest([], output_format=OutputFormat("regex", "ok"))
    spec = request_grammar(request, None)
    constraint = Constraint(compiler.matcher(spec), VOCAB, "start", THINK)
    logits = np.zeros(VOCAB, dtype=np.float32)
    allowed = np.isfinite(constraint.mask(logits))
    assert allowed[THINK[0]] and allowed.sum() < 10  # "ok"'s tokens and <think>
    constraint.accept(THINK[0])
    assert constraint.state == "reasoning"
    assert np.isfinite(constraint.mask(logits)).all()  # reasoning is free text
    constraint.accept(1234)
    constraint.accept(THINK[1])
    assert constraint.state == "grammar"
    assert not np.isfinite(constraint.mask(logits))[THINK[0]]


def test_bad_grammars_are_400s_naming_the_field(compiler):
    cases = [
        (OutputFormat("json_schema", {"$ref": "#/nope"}, "response_format.json_schema.schema"),
         "response_format.json_schema.schema"),
        (OutputFormat("regex", "[a-", "response_format.grammar"), "response_format.grammar"),
        (OutputFormat("lark", "start: missing_rule", "text.format.grammar"),
         "text.format.grammar"),
    ]  # fmt: skip
    for output, param in cases:
        with pytest.raises(InvalidRequest) as err:
            compiler.matcher(request_grammar(GenerationRequest([], output_format=output), None))
        assert err.value.param == param, output


def test_an_unknown_schema_keyword_is_a_400(compiler):
    output = OutputFormat(
        "json_schema", {"not": {"type": "string"}}, "response_format.json_schema.schema"
    )
    with pytest.raises(InvalidRequest, match="not") as err:
        compiler.matcher(request_grammar(GenerationRequest([], output_format=output), None))
    assert err.value.param == "response_format.json_schema.schema"


def test_forcing_a_call_needs_a_tool_call_format():
    request = GenerationRequest([Message("user", "x")], tools=TOOLS, tool_choice="required")
    with pytest.raises(InvalidRequest) as err:
        request_grammar(request, None)
    assert err.value.param == "tool_choice"


def test_close_objects_keeps_explicit_additional_properties():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {}}},
        "additionalProperties": True,
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is True
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]  # the input is not changed


def test_under_auto_the_calls_grammar_starts_at_the_models_own_tag(compiler, tokenizer):
    open_id = compiler.single_token("<tool_call>")
    request = GenerationRequest([], tools=TOOLS, tool_choice="auto")
    terms = [compiler.tag_term(t) for t in ("<tool_call>", "</tool_call>")]
    constraint = Constraint(
        compiler.matcher(request_grammar(request, terms)), VOCAB, "start", THINK, open_id
    )
    logits = np.zeros(VOCAB, dtype=np.float32)
    assert np.isfinite(constraint.mask(logits)).all()  # free text first
    for token in tokenizer.encode("Let me check.\n", add_special_tokens=False).ids:
        constraint.accept(token)
    assert constraint.state == "lazy" and np.isfinite(constraint.mask(logits)).all()
    constraint.accept(open_id)
    assert constraint.state == "grammar"
    allowed = np.flatnonzero(np.isfinite(constraint.mask(logits)))
    assert [tokenizer.decode([int(t)]) for t in allowed] == ["\n"]


def biased_draw(compiler, tokenizer, bias: dict[int, float], temperature: float) -> str:
    """An answer to SCHEMA (whose strings, numbers and arrays are bounded) drawn under a
    logit_bias, decoded."""
    spec = request_grammar(
        GenerationRequest([], output_format=OutputFormat("json_schema", SCHEMA)), []
    )
    constraint = Constraint(compiler.matcher(spec), VOCAB, "grammar", THINK)
    resolved = ResolvedSampling(temperature, 0.9, 0, 0.0, logit_bias=bias)
    sampler = Sampler(resolved, 1, constraint=constraint)
    rng = np.random.default_rng(1)
    tokens = []
    while len(tokens) < 300 and (token := sampler.sample(random_logits(rng))) not in EOS:
        tokens.append(token)
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_forced_token_the_format_does_not_allow_leaves_the_output_valid(
    compiler, tokenizer, temperature
):
    """logit_bias +100 forces a token; where the response format allows none of the forced
    tokens (here <|im_start|>, which JSON never allows), the format wins and the bias only adds
    (this was a 500 at temperature > 0, and the first allowed id at temperature 0)."""
    text = biased_draw(compiler, tokenizer, {151644: 100}, temperature)
    jsonschema.validate(json.loads(text), close_objects(SCHEMA))
    assert text == biased_draw(compiler, tokenizer, {}, temperature)  # the bias changed nothing


def test_a_bias_that_bans_every_allowed_token_is_a_400_on_logit_bias(compiler, tokenizer):
    """A JSON object must start with "{" (or white space): banning every such token leaves the
    format nothing to write."""
    starts = [
        i for i in range(len(tokenizer.get_vocab()))
        if (piece := tokenizer.decode([i])).strip() == "" or piece.lstrip().startswith("{")
    ]  # fmt: skip
    with pytest.raises(InvalidRequest) as err:
        biased_draw(compiler, tokenizer, dict.fromkeys(starts, -100), 1.0)
    assert err.value.param == "logit_bias"


def test_a_bias_that_bans_every_token_is_a_400_on_logit_bias():
    sampler = Sampler(ResolvedSampling(1.0, 0.9, 0, 0.0, logit_bias=dict.fromkeys(range(8), -100)))
    with pytest.raises(InvalidRequest) as err:
        sampler.sample(np.zeros(8, np.float32))
    assert err.value.param == "logit_bias"
