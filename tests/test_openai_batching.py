"""The scheduler as an OpenAI client meets it: `fermi serve openai` over the cpu-target export
(the graph that batches), driven with the official `openai` client on 127.0.0.1. Concurrent
streams decode together and each gets what it gets alone; a stock client that resends its
conversation hits the prefix cache; n > 1 choices stream interleaved; API keys never share a
cached prefix."""

from __future__ import annotations

import threading

import openai
import pytest

from fermi.openai_server.loadtest import serve

MODEL = "tiny-qwen3"
KEYS = "key-a,key-b,key-c"
ENV = {
    "FERMI_API_KEY": KEYS,
    "FERMI_DEFAULT_THINKING": "",
    "FERMI_ENGINE_POOL": "4",
    "FERMI_MAX_QUEUE": "16",
    "HF_HUB_OFFLINE": "1",
}
QUESTIONS = ["Tell me a story", "What is two plus two?", "Name a colour", "Say hello", "Why?"]


@pytest.fixture(scope="module")
def server(tiny_cpu_artifact):
    with serve(str(tiny_cpu_artifact), env=ENV) as running:
        yield running


def client(server, key="key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(api: openai.OpenAI, messages, **fields):
    return api.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
        **fields,
    )


def streamed_text(api: openai.OpenAI, question: str) -> str:
    stream = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=20,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_concurrent_streams_equal_sequential(server):
    api = client(server, "key-b")
    alone = [streamed_text(api, q) for q in QUESTIONS]
    together: list[str | None] = [None] * len(QUESTIONS)

    def run(i: int) -> None:
        together[i] = streamed_text(client(server, "key-b"), QUESTIONS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert together == alone  # five streams, a batch of four: one waited, then joined


def test_stock_client_resending_a_conversation_hits_the_prefix_cache(server):
    api = client(server)
    system = {"role": "system", "content": "You are a terse assistant. " * 30}
    first = ask(api, [system, {"role": "user", "content": "Hi there"}])
    conversation = [
        system,
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = ask(api, conversation)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # All of the first prompt but its generation prompt (Qwen3's template renders an empty think
    # block there that the history's rendering of that turn leaves out).
    assert first.usage.prompt_tokens - 8 <= cached < second.usage.prompt_tokens
    # Another key sending the same conversation shares nothing.
    other = ask(client(server, "key-c"), conversation)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == second.choices[0].message.content


def test_n_choices_stream_interleaved(server):
    stream = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count with me"}],
        max_tokens=12,
        n=3,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts, order = {0: "", 1: "", 2: ""}, []
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            order.append(choice.index)
    assert texts[0] and texts[0] == texts[1] == texts[2]  # greedy: the same text, three times
    first_done = max(i for i, index in enumerate(order) if index == 0)
    assert set(order[:first_done]) == {0, 1, 2}  # decoded together, not one after another


def test_n_beyond_the_batch_limit_is_a_clear_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client(server), [{"role": "user", "content": "hi"}], n=5)
    assert caught.value.body["param"] == "n"
