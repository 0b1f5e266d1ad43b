"""Structured output and reasoning handling on a real instruct model, SmolLM2-135M-Instruct
(the `smollm2_artifact` fixture: an fp32 cpu-target artifact), through a live
`fermi serve openai` on 127.0.0.1 and the openai client, greedy.

SmolLM2's chat template has no tool-call format and no reasoning tags: constrained JSON still
answers the question, a forced tool call is a clear 400, and a literal <think> element that the
model writes stays in the answer."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from fermi.openai_server.loadtest import serve

ENV = {"FERMI_API_KEY": "", "FERMI_DEFAULT_THINKING": "", "HF_HUB_OFFLINE": "1"}


class Capital(BaseModel):
    city: str = Field(max_length=30)


@pytest.fixture(scope="module")
def smol_server(smollm2_artifact):
    with serve(str(smollm2_artifact), env=ENV) as running:
        yield running


@pytest.fixture
def client(smol_server):
    return openai.OpenAI(
        base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture
def model_id(client):
    return client.models.list().data[0].id


def test_json_schema_answer_is_right(client, model_id):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 30}},
        "required": ["capital"],
    }
    completion = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        temperature=0,
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    answer = json.loads(completion.choices[0].message.content)
    assert "Paris" in answer["capital"]


def test_parse_with_a_pydantic_model_is_right(client, model_id):
    completion = client.chat.completions.parse(
        model=model_id,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        temperature=0,
        max_tokens=40,
        response_format=Capital,
    )
    assert "Paris" in completion.choices[0].message.parsed.city


def test_a_literal_think_element_stays_in_the_answer(client, model_id):
    completion = client.chat.completions.create(
        model=model_id,
        messages=[
            {
                "role": "user",
                "content": "Write an XML snippet: a <think> element containing the word hello.",
            }
        ],
        temperature=0,
        max_tokens=60,
    )
    message = completion.choices[0].message
    extra = message.model_extra or {}
    assert "reasoning_content" not in extra and "reasoning" not in extra
    assert message.content.strip()
    assert "<think>" in message.content  # SmolLM2 writes the element, and it is not split off


def test_tools_without_tool_support_are_a_400_unless_switched_off(smol_server, model_id):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [tool],
        "tool_choice": "required",
    }
    response = httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tool_choice"
    body["tool_choice"] = "auto"  # tools the template cannot show are refused, not dropped
    response = httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools" and "chat template has no tool support" in error["message"]
    assert (
        httpx.get(smol_server.url + "/v1/models", timeout=60).json()["data"][0]["supports_tools"]
        is False
    )
    body["tool_choice"] = "none"  # tools switched off: nothing to show, nothing to parse
    body["max_tokens"] = 8
    answer = httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
