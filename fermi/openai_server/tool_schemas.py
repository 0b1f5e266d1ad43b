"""The agent fields of a request body: function tools, tool_choice, assistant tool calls, tool
results and the answer format (response_format, text.format, fermi's grammar extension), in
the chat and the Responses shapes. Each problem is an InvalidRequest naming its field."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fermi.constraints import check_tool_parameters
from fermi.errors import InvalidRequest
from fermi.requests import OutputFormat

if TYPE_CHECKING:
    from fermi.openai_server.schemas import Fields

TOOL_CHOICE_WORDS = {"auto", "none", "required"}
GRAMMAR_SYNTAXES = {"lark", "regex"}
# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SCHEMA_NAME = FUNCTION_NAME  # response_format.json_schema.name: the same rule in OpenAI's API


def _function(f: Fields, name_field: str = "name") -> dict[str, Any]:
    """A function definition in chat's shape: {"name", "description"?, "parameters"?}.
    Raises InvalidRequest naming the field, e.g. parameters that are not a JSON schema of an
    object the grammar compiler takes (constraints.check_tool_parameters)."""
    name = f.string(name_field, required=True)
    if not FUNCTION_NAME.match(name):
        raise InvalidRequest(
            f"{f.param(name_field)} must be 1-64 letters, digits, _ or -, got {name!r}",
            param=f.param(name_field),
        )
    function: dict[str, Any] = {"name": name}
    description = f.string("description")
    if description is not None:
        function["description"] = description
    parameters = f.object("parameters")
    if parameters is not None:
        check_tool_parameters(name, parameters.data, parameters.where)
        function["parameters"] = parameters.data
    strict = f.boolean("strict")
    if strict is not None:
        function["strict"] = strict
    return function


def _unique(tools: list[dict]) -> list[dict]:
    names = [t["function"]["name"] for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequest(f"tools: the function {duplicate!r} is defined twice", "tools")
    return tools


def chat_tools(f: Fields) -> list[dict]:
    """`tools`: [{"type": "function", "function": {...}}], kept in that shape (the chat
    template reads it as transformers passes it)."""
    items = f.array("tools") or []
    tools = []
    for i, raw in enumerate(items):
        item = f.__class__(raw, f"tools[{i}]")
        item.string("type", required=True, choices={"function"})
        function = item.object("function")
        if function is None:
            raise InvalidRequest(f"tools[{i}].function is required", f"tools[{i}].function")
        tools.append({"type": "function", "function": _function(function)})
    return _unique(tools)


def responses_tools(f: Fields) -> list[dict]:
    """The Responses API's flat function tools ({"type": "function", "name", "parameters"}),
    turned into chat's shape. Other tool types (web search, files, ...) are refused."""
    items = f.array("tools") or []
    tools = []
    for i, raw in enumerate(items):
        item = f.__class__(raw, f"tools[{i}]")
        kind = item.string("type", required=True)
        if kind != "function":
            raise InvalidRequest(
                f"tools[{i}].type {kind!r} is not supported; only function tools",
                param=f"tools[{i}].type",
            )
        tools.append({"type": "function", "function": _function(item)})
    return _unique(tools)


def tool_choice(f: Fields, tools: list[dict], flat: bool) -> str:
    """auto (the default), none, required, or a function's name from
    {"type": "function", "function": {"name"}} (chat) / {"type": "function", "name"} (flat)."""
    value = f.raw("tool_choice")
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value not in TOOL_CHOICE_WORDS:
            raise InvalidRequest(
                f"tool_choice must be auto, none, required or a function, got {value!r}",
                param="tool_choice",
            )
        choice = value
    else:
        g = f.object("tool_choice")
        g.string("type", required=True, choices={"function"})
        named = g if flat else g.object("function")
        if named is None:
            raise InvalidRequest("tool_choice.function is required", "tool_choice.function")
        choice = named.string("name", required=True)
    if choice not in ("auto", "none") and not tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
    if choice not in TOOL_CHOICE_WORDS and all(t["function"]["name"] != choice for t in tools):
        raise InvalidRequest(f"tool_choice: no function named {choice!r} in tools", "tool_choice")
    return choice


def assistant_tool_calls(f: Fields) -> list[dict] | None:
    """An assistant message's `tool_calls`, in OpenAI's shape (arguments a JSON string)."""
    items = f.array("tool_calls")
    if not items:
        return None
    calls = []
    for i, raw in enumerate(items):
        call = f.__class__(raw, f"{f.param('tool_calls')}[{i}]")
        call.string("type", choices={"function"})
        function = call.object("function")
        if function is None:
            raise InvalidRequest(f"{call.param('function')} is required", call.param("function"))
        arguments = function.data.get("arguments")
        if not isinstance(arguments, str | dict):
            raise InvalidRequest(
                f"{function.param('arguments')} must be a JSON string",
                function.param("arguments"),
            )
        name = function.string("name", required=True)
        calls.append(
            {
                "id": call.string("id") or f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def _grammar(g: Fields) -> OutputFormat:
    syntax = g.string("syntax") or "lark"
    if syntax not in GRAMMAR_SYNTAXES:
        raise InvalidRequest(
            f"{g.param('syntax')} must be lark or regex, got {syntax!r}", g.param("syntax")
        )
    grammar = g.string("grammar", required=True)
    return OutputFormat(syntax, grammar, g.param("grammar"))  # type: ignore[arg-type]


def _schema_format(holder: Fields) -> OutputFormat:
    """json_schema's fields: `name` (required, as OpenAI and vLLM require it: 1-64 of
    a-z, A-Z, 0-9, _ and -), `schema` (absent: any JSON object), `description`, `strict`."""
    name = holder.string("name", required=True)
    if not SCHEMA_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{holder.param('name')} must be 1-64 letters, digits, _ or -, got {name!r}",
            param=holder.param("name"),
        )
    holder.string("description")
    holder.boolean("strict")
    schema = holder.object("schema")
    if schema is None:  # no schema: any JSON object
        return OutputFormat("json_object", None, holder.where)
    return OutputFormat("json_schema", schema.data, holder.param("schema"))


def response_format(f: Fields) -> OutputFormat | None:
    """Chat's response_format: text, json_object, json_schema ({"json_schema": {"name",
    "schema", "strict"}}) or fermi's grammar ({"grammar": ..., "syntax": "lark" | "regex"})."""
    g = f.object("response_format")
    return None if g is None else _output_format(g, "response_format", flat=False)


def text_format(text: Fields | None) -> OutputFormat | None:
    """The Responses API's text.format (`text`: the request's `text` object): the same kinds,
    json_schema flat ({"type": "json_schema", "name", "schema", "strict"})."""
    g = text.object("format") if text else None
    return None if g is None else _output_format(g, "text.format", flat=True)


def _output_format(g: Fields, param: str, flat: bool) -> OutputFormat | None:
    """One format object (`param` names it in errors); `flat`: json_schema's fields sit beside
    `type` (Responses) rather than under `json_schema` (chat)."""
    kind = g.data.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object", None, param)
    if kind == "json_schema":
        holder = g if flat else g.object("json_schema")
        if holder is None:
            raise InvalidRequest(f"{param}.json_schema is required", f"{param}.json_schema")
        return _schema_format(holder)
    if kind == "grammar":
        return _grammar(g)
    raise InvalidRequest(
        f"{param}.type must be text, json_object, json_schema or grammar, got {kind!r}",
        param=param,
    )
