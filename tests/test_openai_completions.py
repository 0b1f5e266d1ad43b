"""/v1/completions, /tokenize, /detokenize, logprobs, logit_bias and n through the clients
people point at a local server: openai-python, litellm, langchain-openai and the `llm` CLI, live
on 127.0.0.1 over tiny-qwen3 (random weights: the tests check shapes, counts and the effect of
each field, never the words)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fermi.openai_server.loadtest import serve
from tests.test_openai_server import idle, metric, wait_for

MODEL = "tiny-qwen3"
USER = [{"role": "user", "content": "Hello there, how are you?"}]
ENV = {"FERMI_API_KEY": "", "FERMI_DEFAULT_THINKING": "", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with serve(str(tiny_artifact), env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def greedy_chat(client, **kw):
    kw.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=MODEL, messages=USER, temperature=0, **kw)


def joined(tokens) -> str:
    """The text of logprob entries from their bytes (a random model's tokens may split a
    character, and such a token's `token` is spelled `bytes:\\x..`). Logprobs cover every
    generated token, but an answer cut off by max_tokens inside a character ends before it, so
    an unfinished last character is left out here too."""
    text = b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", errors="replace")
    return text.rstrip("\ufffd")


def tokenize(client, text: str) -> list[int]:
    url = str(client.base_url).replace("/v1/", "/tokenize")
    return httpx.post(url, json={"content": text}).json()["tokens"]


# -- openai-python: chat -----------------------------------------------------------------------


def test_chat_logprobs(client):
    choice = greedy_chat(client, logprobs=True, top_logprobs=3).choices[0]
    content = choice.logprobs.content
    assert content and joined(content) == choice.message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy
        assert [x.logprob for x in t.top_logprobs] == sorted(
            [x.logprob for x in t.top_logprobs], reverse=True
        )
    assert greedy_chat(client).choices[0].logprobs is None


def test_chat_logprobs_streamed_with_each_chunk(client):
    whole = greedy_chat(client, logprobs=True, top_logprobs=1).choices[0].logprobs.content
    stream = greedy_chat(client, logprobs=True, top_logprobs=1, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in
                c.choices[0].logprobs.content]  # fmt: skip
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in whole
    ]


def test_chat_n_choices_streamed_by_index(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=5, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in completion.choices] == [0, 1]
    singles = [
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=5, seed=3 + i, temperature=1.0
        )
        for i in range(2)
    ]
    assert completion.usage.completion_tokens == sum(c.usage.completion_tokens for c in singles)
    assert completion.usage.prompt_tokens == singles[0].usage.prompt_tokens
    for single, choice in zip(singles, completion.choices, strict=True):
        assert single.choices[0].message.content == choice.message.content  # seed + index
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=5, n=2, seed=3, temperature=1.0, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in completion.choices}
    assert set(finishes) == {0, 1}


def test_logit_bias_bans_and_forces(client):
    first = greedy_chat(client, logprobs=True, top_logprobs=1).choices[0].logprobs.content[0]
    [first_id] = tokenize(client, bytes(first.bytes).decode())
    banned = greedy_chat(client, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].bytes != first.bytes
    forced = greedy_chat(client, logit_bias={"264": 100}, max_tokens=4, logprobs=True)
    url = str(client.base_url).replace("/v1/", "/detokenize")
    piece = httpx.post(url, json={"tokens": [264]}).json()["content"]
    content = forced.choices[0].logprobs.content
    assert len(content) == 4 and forced.choices[0].message.content == piece * 4
    assert all(bytes(t.bytes) == piece.encode() and t.logprob == 0 for t in content)


def test_seed_minus_one_and_enable_thinking(client):
    completion = greedy_chat(client, seed=-1, extra_body={"enable_thinking": False})
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_refused_fields_name_their_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, modalities=["text", "audio"])
    assert e.value.body["param"] == "modalities"
    with pytest.raises(openai.BadRequestError) as e:
        greedy_chat(client, extra_body={"guided_json": {}})
    assert e.value.body["param"] == "guided_json"
    assert greedy_chat(client, store=True, metadata={"a": "b"}, user="u", service_tier="auto")


# -- openai-python: completions and responses -------------------------------------------------


def test_completions_logprobs_and_echo(client):
    prompt = "The quick brown fox"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.logprobs is None
    prompt_ids = tokenize(client, prompt)
    assert plain.usage.completion_tokens <= 5 and plain.usage.prompt_tokens == len(prompt_ids)
    scored = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    ).choices[0]
    assert scored.text == prompt + choice.text
    lp = scored.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts it
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[: len(prompt_ids)]) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert len(lp.tokens) == len(prompt_ids) + plain.usage.completion_tokens


def test_completions_top_logprobs_hold_the_sampled_token(http):
    """As OpenAI's legacy completions and vLLM answer: each position's top_logprobs holds the
    token that was sampled (up to logprobs + 1 entries), the echoed prompt's tokens too."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.5,
            "logprobs": 1, "seed": 3, "echo": True}  # fmt: skip
    lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    rows = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))[1:]
    assert len(rows) > 10
    for token, logprob, top in rows:
        assert 1 <= len(top) <= 2 and top[token] == logprob, (token, logprob, top)
    chat = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "max_tokens": 20, "temperature": 1.5, "seed": 3,
        "logprobs": True, "top_logprobs": 1,
    }).json()["choices"][0]["logprobs"]["content"]  # fmt: skip
    assert all(len(t["top_logprobs"]) == 1 for t in chat)  # chat: the top-k only, as OpenAI


def test_completions_echo_with_max_tokens_0_scores_the_prompt_only(client, http):
    """lm-eval's loglikelihood: echo + max_tokens 0 + logprobs returns the prompt and its
    logprobs, and no new token (streamed too); max_tokens 0 without echo stays a 400."""
    prompt = "The quick brown fox"
    prompt_ids = tokenize(client, prompt)
    scored = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True
    )
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(prompt_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt_ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    longer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, logprobs=1, echo=True, temperature=0
    ).choices[0]
    assert longer.logprobs.token_logprobs[: len(prompt_ids)] == lp.token_logprobs
    chunks = [
        c.choices[0]
        for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True, stream=True
        )
        if c.choices
    ]
    assert "".join(c.text for c in chunks) == prompt
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
    assert plain.choices[0].text == prompt and plain.choices[0].logprobs is None
    refused = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_output_cut_inside_a_character_ends_before_it(client, http):
    """max_tokens stops the output after the first byte token of an emoji (forced with
    logit_bias on the tiny model's byte-level vocabulary): the text ends before the unfinished
    character instead of with U+FFFD, in completions and in streamed chat alike."""
    ids = tokenize(client, "\U0001f600")
    assert len(ids) > 1  # the emoji is split across byte tokens
    force = {"logit_bias": {str(ids[0]): 100}, "temperature": 0, "max_tokens": 1}
    body = {"model": MODEL, "prompt": "Once upon a time", **force}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length" and "\ufffd" not in choice["text"]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
        extra_body={"thinking": "off"}, **force,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[-1].finish_reason == "length"
    assert "\ufffd" not in "".join(c.delta.content or "" for c in chunks)


def test_completions_token_prompt_and_stop(client):
    ids = tokenize(client, "one two three")
    by_text = client.completions.create(model=MODEL, prompt="one two three", max_tokens=6,
                                        temperature=0)  # fmt: skip
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert client.completions.create(model=MODEL, prompt=[ids], max_tokens=6, temperature=0)
    text = by_text.choices[0].text
    if len(text) > 2:
        stop = text[1:3]
        stopped = client.completions.create(
            model=MODEL, prompt="one two three", max_tokens=6, temperature=0, stop=[stop]
        ).choices[0]
        assert stopped.finish_reason == "stop" and stop not in stopped.text


def test_completions_streaming_n_and_usage(client):
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, n=2, seed=9,
                                      temperature=1.0)  # fmt: skip
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in client.completions.create(
        model=MODEL, prompt="Once", max_tokens=6, n=2, seed=9, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, logprobs=1,
    ):  # fmt: skip
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.text:
                assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert set(finishes) == {0, 1} and usage.completion_tokens == whole.usage.completion_tokens


def test_a_batch_of_prompts_answers_each_as_if_alone(client):
    """A list of prompts (text and token ids mixed) is one request: n choices per prompt,
    numbered prompt by prompt, each equal to the same prompt sent alone; the usage sums them."""
    prompts = ["The quick brown fox", tokenize(client, "one two three"), "Once upon a time"]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, n=2)
        for p in prompts
    ]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                      n=2)  # fmt: skip
    assert [c.index for c in batch.choices] == list(range(6))
    for p, single in enumerate(alone):
        for i in range(2):
            choice, want = batch.choices[p * 2 + i], single.choices[i]
            assert (choice.text, choice.finish_reason) == (want.text, want.finish_reason)
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    texts, finishes, usage = {}, {}, None
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in batch.choices}
    assert finishes == {c.index: c.finish_reason for c in batch.choices}
    assert usage.total_tokens == batch.usage.total_tokens


def test_a_batch_of_prompts_echoes_and_scores_each_prompt(client):
    """lm-eval's loglikelihood requests in a batch: echo + logprobs + max_tokens 0 score each
    prompt as that prompt alone is scored."""
    prompts = ["The quick brown fox", "jumps over the lazy dog", "Hello"]
    alone = [
        client.completions.create(
            model=MODEL, prompt=p, max_tokens=0, echo=True, logprobs=1
        ).choices[0]
        for p in prompts
    ]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True,
                                      logprobs=1)  # fmt: skip
    for choice, want in zip(batch.choices, alone, strict=True):
        assert choice.text == want.text
        assert choice.logprobs.tokens == want.logprobs.tokens
        assert choice.logprobs.token_logprobs == pytest.approx(want.logprobs.token_logprobs)


def test_a_batch_with_a_prompt_too_long_is_refused_whole(client, http):
    """One prompt over the context: the request is a 400 and nothing of it stays queued or
    running (the next request is served at once)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["short", "word " * 5000], max_tokens=4)
    assert e.value.body["param"] == "prompt"
    metrics = http.get("/metrics").text
    assert "fermi_running 0.0" in metrics and "fermi_queue_depth 0.0" in metrics
    assert client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2).choices


@pytest.fixture(scope="module")
def small_server(tiny_artifact):
    """4 sequences at once and 4 waiting beyond the free rows."""
    env = {**ENV, "FERMI_ENGINE_POOL": "4", "FERMI_MAX_QUEUE": "4"}
    with serve(str(tiny_artifact), env=env) as running:
        yield running


def test_a_batch_is_queued_whole_or_not_at_all(small_server):
    """A batch that does not fit now is a 429 that leaves nothing queued: the next request is
    served at once (a batch refused halfway held its places for a moment, refusing it too);
    one that could never fit (9 prompts on 4 rows + 4 places) is a 400 on prompt.
    Batches sent together are each taken whole or refused whole: of six batches of three on
    4 rows + 4 queue places, at least two are taken, where interleaved they could all fail."""
    import concurrent.futures

    with httpx.Client(base_url=small_server.url, timeout=120) as http:
        never = http.post("/v1/completions", json={"prompt": ["a"] * 9, "max_tokens": 2})
        assert never.status_code == 400 and never.json()["error"]["param"] == "prompt"
        long = {"prompt": "a", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a closed iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            refused = http.post("/v1/completions", json={"prompt": ["a"] * 8, "max_tokens": 2})
            assert refused.status_code == 429, refused.text
            single = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert single.status_code == 200, single.text

        body = {"prompt": ["a", "b", "c"], "max_tokens": 8, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(6)))
    assert {a.status_code for a in answers} <= {200, 429}
    taken = [a.json() for a in answers if a.status_code == 200]
    assert len(taken) >= 2
    assert all(len(t["choices"]) == 3 for t in taken)


# -- metrics -----------------------------------------------------------------------------------


def generations(http: httpx.Client) -> dict[str, float]:
    return {
        outcome: metric(http, "fermi_generations_total", outcome=outcome)
        for outcome in ("stop", "length", "tool_calls", "cancelled", "disconnected", "error")
    }


@pytest.mark.parametrize(
    "route, fields, choices",
    [
        ("/v1/chat/completions", {"messages": USER, "n": 3}, 3),
        ("/v1/completions", {"prompt": ["Once", "upon", "a time"]}, 3),
        ("/v1/completions", {"prompt": ["Once", "upon"], "n": 3}, 6),
        ("/v1/completions", {"prompt": [[1, 2, 3], [4, 5]], "n": 2, "stream": True}, 4),
        ("/v1/responses", {"input": "Hello"}, 1),
    ],
)
def test_each_choice_is_counted_as_a_generation(http, route, fields, choices):
    """fermi_generations_total counts every generated choice once, with its own finish reason:
    n choices of a request, each prompt's choices of a /v1/completions batch."""
    wait_for(lambda: idle(http), "the engine to be idle")
    before = generations(http)
    limit = "max_output_tokens" if route == "/v1/responses" else "max_tokens"
    body = {"model": MODEL, limit: 3, "ignore_eos": True, **fields}
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    expected = {**before, "length": before["length"] + choices}
    wait_for(lambda: generations(http) == expected, f"{choices} generations to be counted", 10)


def test_each_choice_of_a_batch_whose_client_left_is_counted(http):
    wait_for(lambda: idle(http), "the engine to be idle")
    before = generations(http)
    body = {"prompt": ["Once", "upon"], "n": 2, "max_tokens": 3000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        next(data), next(data)
    expected = {**before, "disconnected": before["disconnected"] + 4}
    wait_for(lambda: generations(http) == expected, "4 disconnected generations")
    time.sleep(0.5)  # and nothing more is counted later
    assert generations(http) == expected


def test_completions_refusals(client):
    cases = [
        ({"prompt": ["a"] * 33}, "prompt"),  # more prompts than one request may hold
        ({"prompt": ["a", 5]}, "prompt"),
        ({"prompt": "def f(", "suffix": "return 1"}, "suffix"),  # no FIM tokens in tiny-qwen3
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),  # a token id outside the vocabulary
        ({"prompt": [[1, 2], [10**6]]}, "prompt"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, max_tokens=2, **body)  # type: ignore[call-overload]
        assert e.value.body["param"] == param, body


def test_responses_logprobs(client):
    response = client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=5, temperature=0,
        include=["message.output_text.logprobs"], top_logprobs=2,
    )  # fmt: skip
    part = response.output[-1].content[0]
    assert part.logprobs and joined(part.logprobs) == part.text
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)
    deltas = [
        e for e in client.responses.create(
            model=MODEL, input="Hi", max_output_tokens=5, temperature=0, stream=True,
            include=["message.output_text.logprobs"],
        ) if e.type == "response.output_text.delta"
    ]  # fmt: skip
    assert [t.token for e in deltas for t in e.logprobs] == [t.token for t in part.logprobs]


# -- tokenizer routes --------------------------------------------------------------------------


def test_tokenize_and_detokenize_in_both_shapes(http):
    llama = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()
    pieces = llama["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    vllm = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert vllm["tokens"] == [p["id"] for p in pieces]
    assert vllm["count"] == len(pieces) and vllm["max_model_len"] == 4096
    chat = http.post("/tokenize", json={"messages": USER}).json()
    assert chat["count"] > len(pieces)
    bare = http.post("/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    back = http.post("/detokenize", json={"tokens": vllm["tokens"]}).json()
    assert back == {"content": "Hello world", "prompt": "Hello world"}
    bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"content": "x", "nope": 1}).status_code == 400
    special = http.post("/tokenize", json={"content": "<|im_end|>", "parse_special": True})
    assert len(special.json()["tokens"]) == 1
    refused = http.post("/tokenize", json={"content": "x", "parse_special": False})
    assert refused.json()["error"]["param"] == "parse_special"


# -- other clients -----------------------------------------------------------------------------


def test_litellm_text_completion(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    response = litellm.text_completion(
        model=f"text-completion-openai/{MODEL}", api_base=server.url + "/v1", api_key="unused",
        prompt="Once upon a time", max_tokens=5, temperature=0,
    )  # fmt: skip
    assert response.choices[0].text is not None
    assert response.usage.completion_tokens <= 5


def test_langchain_completions_llm_and_chat_logprobs(server):
    from langchain_openai import ChatOpenAI, OpenAI

    llm = OpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=5,
                 temperature=0, max_retries=0)  # fmt: skip
    text = llm.invoke("Once upon a time")
    assert isinstance(text, str)
    assert "".join(llm.stream("Once upon a time")) == text
    chat = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=5,
                      temperature=0, max_retries=0).bind(logprobs=True, top_logprobs=2)  # fmt: skip
    message = chat.invoke("Hello")
    content = message.response_metadata["logprobs"]["content"]
    assert b"".join(bytes(t["bytes"]) for t in content).decode(errors="replace") == message.content
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)


def test_llm_cli_completion_model(server, tmp_path):
    program = shutil.which("llm", path=str(Path(sys.executable).parent))
    assert program, "the llm CLI is part of the dev environment"
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: fermi-tiny-completion\n  model_name: {MODEL}\n"
        f"  api_base: {server.url}/v1\n  completion: true\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}
    for extra in ([], ["--no-stream"]):
        out = subprocess.run(
            [program, "-m", "fermi-tiny-completion", "-o", "max_tokens", "4",
             "-o", "temperature", "0", *extra, "Once upon a time"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    logged = subprocess.run(
        [program, "logs", "-n", "1", "--json"], env=env, capture_output=True, text=True
    )
    record = json.loads(logged.stdout)[0]
    assert record["model"] == "fermi-tiny-completion" and record["prompt"] == "Once upon a time"
    assert math.isfinite(len(record["response"]))


def test_completions_stream_echo_matches_the_body(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0, logprobs=1,
              echo=True)  # fmt: skip
    body = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].text == "The quick brown fox"  # the echo comes first, in its own chunk
    assert "".join(c.text for c in chunks) == body.text
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert streamed == body.logprobs.token_logprobs
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == body.logprobs.text_offset


def test_line_separators_in_text_keep_each_sse_event_on_one_line(http):
    """U+2028, U+2029 and U+0085 are line breaks to Python's str.splitlines (so to httpx's
    iter_lines) and to older JavaScript: inside a streamed event they come escaped, so every
    line of the stream is a whole `data:` line and the text survives."""
    prompt = "one\u2028two\u2029three\x85four"
    body = {"model": MODEL, "prompt": prompt, "echo": True, "stream": True, "max_tokens": 2}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    echoed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert echoed.startswith(prompt)


@pytest.mark.parametrize("graph", ["cpu", "portable"])
def test_n_choices_that_end_on_their_first_token_answer(graph, tiny_cpu_artifact, tiny_artifact):
    """n = 2 with max_tokens 1 (every choice ends on its first token), chat and completions,
    and scoring with max_tokens 0: each choice answers, and a stream already running goes on
    to its end."""
    artifact = tiny_cpu_artifact if graph == "cpu" else tiny_artifact
    with serve(str(artifact), env={**ENV, "FERMI_ENGINE_POOL": "4"}) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": "Go on"}],
            max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        chat = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": "Hi"}], n=2,
            max_tokens=1, temperature=0,
        )  # fmt: skip
        assert [c.finish_reason for c in chat.choices] == ["length", "length"]
        assert chat.choices[0].message.content == chat.choices[1].message.content
        plain = client.completions.create(
            model="tiny-qwen3", prompt=["Hello", "World"], n=2, max_tokens=1, temperature=0
        )
        assert [c.index for c in plain.choices] == [0, 1, 2, 3]
        scored = client.completions.create(
            model="tiny-qwen3", prompt="Hello there", n=2, max_tokens=0, echo=True, logprobs=1
        )
        assert (
            scored.choices[0].logprobs.token_logprobs == scored.choices[1].logprobs.token_logprobs
        )
        rest = [c for c in chunks if c.choices]
        assert rest[-1].choices[0].finish_reason == "length"
