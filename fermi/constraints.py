"""Constrained decoding: grammars from a request, token masks from llguidance.

A request's answer format (OpenAI `response_format`, the Responses API's `text.format`, fermi's
regex / Lark extension) or its forced tool call (`tool_choice` "required" or a named function)
becomes one llguidance grammar. Per generation a `Constraint` gives the sampler a mask of the
tokens the grammar allows next and consumes the token drawn (llguidance: the Low-level Guidance
library, https://github.com/guidance-ai/llguidance; grammar syntax in its docs/syntax.md).

With thinking on, the grammar applies only after the reasoning: the reasoning is free text, the
answer after the end tag follows the grammar. This works at the token level, so it needs the
reasoning tags to be single tokens (they are in every model family fermi knows).
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from tokenizers import Tokenizer

from fermi.errors import InvalidRequest
from fermi.requests import GenerationRequest, OutputFormat

# Compact JSON as json.dumps writes it: no free whitespace, which a weak model would fill forever.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A tool's parameters come from code the caller may not control (OpenAPI specs, MCP servers),
# which uses formats and keywords llguidance does not implement (`"format": "password"`,
# `"int64"`, `"binary"` on strings): it ignores those and constrains the rest, as OpenAI and vLLM
# accept such tools. A response format stays strict: an unsupported keyword there is a 400.
TOOL_STYLE = {**JSON_STYLE, "lenient": True}
NEG_INF = np.float32(-np.inf)


def close_objects(schema: object) -> object:
    """A copy of a JSON schema where objects that list `properties` and say nothing about
    `additionalProperties` allow no others (as OpenAI's strict mode and xgrammar's strict_mode
    read them), so a constrained answer ends after the listed properties."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: close_objects(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict, style: dict = JSON_STYLE) -> str:
    """A Lark grammar for JSON text that `schema` accepts, with objects closed (close_objects)
    and written in `style` (llguidance's JSON compile options)."""
    styled = copy.deepcopy(close_objects(schema))
    return llguidance.LLMatcher.grammar_from_json_schema(styled, defaults=style)


def check_tool_parameters(name: str, parameters: dict, param: str) -> None:
    """A function tool's `parameters` (named `param` in the request) must be a JSON schema of
    an object, since a call's arguments are a JSON object, and one the grammar compiler takes,
    whether or not this request's tool_choice makes it compile the tools' grammar. Raises
    InvalidRequest naming `param`, with the compiler's complaint in one line."""
    kind = parameters.get("type", "object")
    if "object" not in (kind if isinstance(kind, list) else [kind]):
        raise InvalidRequest(
            f"{param}: the parameters of function {name!r} must be a JSON schema of type "
            f"object, got type {kind!r}",
            param=param,
        )
    error = _compile_error(json_schema_grammar(parameters, TOOL_STYLE), None)
    if error:
        raise InvalidRequest(
            f"{param}: invalid JSON schema for function {name!r}: {error}", param=param
        )


def _compile_error(grammar: str, tokenizer: llguidance.LLTokenizer | None) -> str | None:
    """llguidance's complaint about a grammar, in one line (its first; a regex error's cause
    follows it on a later `error:` line), or None when it takes the grammar."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if not error.strip() or error.startswith("WARNING"):
        return None
    return _one_line(error)


def _one_line(error: str) -> str:
    """The first line of a compiler message (the rest is a dump of the grammar or the regex
    with a caret), with the cause of a regex error (`regex parse error:` ... `error: unclosed
    group`) appended."""
    lines = [line.strip() for line in error.strip().splitlines()]
    first = lines[0]
    cause = next((line for line in lines[1:] if line.startswith("error:")), None)
    if first.endswith(":") and cause:
        first = f"{first} {cause.removeprefix('error:').strip()}"
    return first


def format_grammar(output: OutputFormat) -> str:
    """The llguidance grammar of an answer format (not yet checked against a tokenizer)."""
    if output.kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if output.kind == "json_schema":
        return json_schema_grammar(output.value)  # type: ignore[arg-type]
    if output.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(output.value)  # type: ignore[arg-type]
    return llguidance.LLMatcher.grammar_from_lark(output.value)  # type: ignore[arg-type]


# Keywords whose values are data, not schemas: a "$ref" inside them is not a reference.
DATA_KEYWORDS = ("const", "enum", "default", "examples")


def rebase_refs(schema: object, base: str) -> object:
    """A copy of a JSON schema to embed at `base` (a JSON pointer fragment, "#/...") of a larger
    one: its local references ("#", "#/$defs/X", ...) are resolved from the document's root, so
    they are moved under `base`."""
    if isinstance(schema, list):
        return [rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: value if key in DATA_KEYWORDS else rebase_refs(value, base)
        for key, value in schema.items()
    }
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


def object_only(parameters: dict) -> dict:
    """A tool's parameters without the branches that allow no object, since a call's
    arguments are a JSON object: `"type": ["object", "null"]` becomes `"object"`, and the
    `{"type": "null"}` branches of a top-level anyOf / oneOf (pydantic's Optional model) go."""
    out = dict(parameters)
    if isinstance(out.get("type"), list):
        out["type"] = "object"
    for key in ("anyOf", "oneOf"):
        branches = out.get(key)
        if isinstance(branches, list):
            kept = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            out[key] = kept or branches
    return out


def _tool_schema(tool: dict) -> dict:
    """A Hermes call to `tool`: its name and its arguments, which follow its parameters (whose
    references now resolve where they are embedded)."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    arguments = rebase_refs(close_objects(object_only(parameters)), "#/properties/arguments")
    return {
        "x-guidance": TOOL_STYLE,
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_call_grammar(tools: list[dict], parallel: bool, open_tag: str, close_tag: str) -> str:
    """Lark: one or more (parallel) Hermes blocks `<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>`, one alternative per tool. The tags are given as Lark terms (a
    special token `<[id]>` or a quoted string)."""
    names = [f"f{i}" for i in range(len(tools))]
    rules = [
        "start: call" + (' ("\\n" call)*' if parallel else ""),
        f'call: {open_tag} "\\n" ({" | ".join(names)}) "\\n" {close_tag}',
    ]
    for name, tool in zip(names, tools, strict=True):
        rules.append(f"{name}: %json{json.dumps(_tool_schema(tool))}")
    return llguidance.LLMatcher.grammar_from_lark("\n".join(rules))


@dataclass(frozen=True)
class GrammarSpec:
    """A compiled-ready grammar and the request field its errors name."""

    grammar: str
    param: str


def request_grammar(request: GenerationRequest, tool_tags: list[str] | None) -> GrammarSpec | None:
    """The grammar a request asks for, if any: a forced tool call wins over an answer format.
    `tool_tags` are the model's tool-call tags as Lark terms (GrammarCompiler.tag_term).
    Under tool_choice auto this is the grammar of the calls, for a lazy Constraint."""
    choice = request.tool_choice
    if request.tools and choice != "none" and (choice != "auto" or not request.output_format):
        tools = request.tools
        if choice not in ("auto", "required"):
            tools = [t for t in tools if t["function"]["name"] == choice]
        if not tool_tags:
            raise InvalidRequest(
                "this model has no tool-call format, so tool_choice cannot force a call",
                param="tool_choice",
            )
        return GrammarSpec(
            tool_call_grammar(tools, request.parallel_tool_calls, *tool_tags), "tools"
        )
    if request.output_format is not None:
        output = request.output_format
        try:
            return GrammarSpec(format_grammar(output), output.param)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"{output.param}: {e}", param=output.param) from None
    return None


def constraint_for(
    request: GenerationRequest,
    compiler: GrammarCompiler,
    tool_tags: list[str] | None,
    reasoning_tags: list[str] | None,
    state: str,
) -> Constraint | None:
    """The request's grammar as a Constraint for one generation, or None when it asks for none.

    `tool_tags`: the model's tool-call tags when this request's calls are parsed, else None.
    `reasoning_tags`: the model's reasoning tags when the output may reason, else None.
    `state`: the Constraint's first state ("grammar", "start" or "reasoning"). Under
    tool_choice auto the calls' grammar applies lazily, from the model's own start tag on (when
    that is one token). Raises InvalidRequest naming the field when the grammar is unusable.
    """
    lazy = bool(request.tools and tool_tags) and request.tool_choice == "auto"
    lazy = lazy and not request.output_format
    if not (request.output_format or (request.tools and tool_tags)):
        return None
    trigger = compiler.single_token(tool_tags[0]) if lazy else None
    if lazy and trigger is None:
        return None  # the calls are parsed, not constrained
    terms = [compiler.tag_term(t) for t in tool_tags] if tool_tags else None
    spec = request_grammar(request, terms)
    if spec is None:
        return None
    reasoning = None
    if reasoning_tags:
        ids = [compiler.single_token(t) for t in reasoning_tags]
        if None in ids:
            raise InvalidRequest(
                "constrained output needs thinking off on this model (its reasoning tags are "
                "not single tokens)",
                param="thinking",
            )
        reasoning = (ids[0], ids[1])
    return Constraint(compiler.matcher(spec), compiler.vocab_size, state, reasoning, trigger)


class GrammarCompiler:
    """The model's llguidance tokenizer (built once, lazily: about 1 s for a 151k vocabulary)
    and the checks that turn a bad grammar into InvalidRequest."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(
                    self._tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids
                )
            return self._ll

    def tag_term(self, tag: str) -> str:
        """A tag as a Lark term: `<[id]>` when it is one special token (llguidance keeps those
        apart from text), else the quoted text."""
        ids = self._tokenizer.encode(tag, add_special_tokens=False).ids
        if len(ids) == 1 and self.ll_tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(tag)

    def single_token(self, tag: str) -> int | None:
        ids = self._tokenizer.encode(tag, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 else None

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher; InvalidRequest(spec.param), in one line, when llguidance cannot take
        the grammar."""
        error = _compile_error(spec.grammar, self.ll_tokenizer)
        if error:
            raise InvalidRequest(f"{spec.param}: {error}", param=spec.param)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, spec.grammar, log_level=0)
        if matcher.is_error():
            error = _one_line(matcher.get_error())
            raise InvalidRequest(f"{spec.param}: {error}", param=spec.param)
        return matcher


class Constraint:
    """The sampler's hook: `allowed_ids(vocab)` before a draw, `accept(token)` after it.

    States: "start" (the output may open a reasoning block: the reasoning start token is allowed
    beside the grammar's tokens), "reasoning" (free until the end token), "grammar" (masked),
    "lazy" (free until the `trigger` token, e.g. `<tool_call>` under tool_choice auto, which the
    grammar then consumes and follows from), "done" (the matcher failed; nothing is masked any
    more). After the reasoning the constraint goes to `after_reasoning` ("grammar" or "lazy").
    """

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        vocab_size: int,
        state: str = "grammar",
        reasoning_tokens: tuple[int, int] | None = None,
        trigger: int | None = None,
    ):
        self.matcher = matcher
        self.reasoning_tokens = reasoning_tokens
        self.trigger = trigger
        self.after_reasoning = "lazy" if trigger is not None else "grammar"
        self.state = self.after_reasoning if state == "grammar" else state
        self._bits = allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar allows next."""
        fill_next_token_bitmask(self.matcher, self._bits)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self._vocab].astype(bool)

    def allowed_ids(self, vocab: int) -> np.ndarray | None:
        """The (n,) token ids (< vocab) allowed next, or None when the output is free."""
        free = self.state in ("reasoning", "lazy", "done")
        if free or (self.state == "start" and self.trigger is not None):
            return None
        allowed = self.allowed()
        if self.state == "start" and self.reasoning_tokens is not None:
            allowed[self.reasoning_tokens[0]] = True
        return np.flatnonzero(allowed[:vocab])

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """(vocab,) logits -> a copy with disallowed tokens at -inf (the input when free)."""
        ids = self.allowed_ids(logits.size)
        if ids is None:
            return logits
        out = np.full_like(logits, NEG_INF)
        out[ids] = logits[ids]
        return out

    def accept(self, token: int) -> None:
        """Record the drawn token (in the grammar state the matcher consumes it)."""
        if self.state == "start":
            if self.reasoning_tokens is not None and token == self.reasoning_tokens[0]:
                self.state = "reasoning"
                return
            self.state = self.after_reasoning
        if self.state == "reasoning":
            if self.reasoning_tokens is not None and token == self.reasoning_tokens[1]:
                self.state = self.after_reasoning
            return
        if self.state == "lazy":
            if token != self.trigger:
                return
            self.state = "grammar"
        if self.state == "grammar" and not self.matcher.consume_token(token):
            self.state = "done"
