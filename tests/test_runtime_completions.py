"""The runtime's raw-prompt path (no chat template), logprobs, prompt logprobs and n choices,
on the tiny model through both the portable graph and the fused cpu graph."""

from __future__ import annotations

import numpy as np
import pytest

from fermi.errors import ContextLengthExceeded, InvalidRequest
from fermi.requests import Finished, GenerationRequest, PromptLogprobs, SamplingParams, TextDelta
from fermi.runtime import Runtime
from fermi.settings import Settings

GREEDY = SamplingParams(temperature=0.0)
HOT = dict(temperature=1.0, top_p=1.0, top_k=0)


@pytest.fixture(scope="module")
def cpu_graph(tmp_path_factory):
    from export.exporter import export_model

    return export_model(
        "tiny-qwen3", "fp32", tmp_path_factory.mktemp("raw") / "tiny-cpu", target="cpu"
    )


@pytest.fixture(scope="module", params=["portable", "cpu"])
def runtime(request, tiny_artifact, cpu_graph):
    artifact = tiny_artifact if request.param == "portable" else cpu_graph
    return Runtime.load(Settings(model=str(artifact), device="cpu"))


def complete(runtime, prompt, **kw) -> list:
    kw.setdefault("sampling", GREEDY)
    return list(runtime.submit(GenerationRequest([], prompt=prompt, **kw)))


def deltas(events, index=0) -> list[TextDelta]:
    return [e for e in events if isinstance(e, TextDelta) and e.index == index]


def ids(events, index=0) -> list[int]:
    return [t for d in deltas(events, index) for t in d.token_ids]


def test_raw_prompt_is_not_templated(runtime):
    text = "The capital of France is"
    events = complete(runtime, text, max_new_tokens=4, ignore_eos=True)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.thinking is False
    assert finished.usage.prompt_tokens == len(runtime.encode_special(text, True))
    same = complete(runtime, runtime.encode_special(text, True), max_new_tokens=4, ignore_eos=True)
    assert ids(same) == ids(events) and len(ids(events)) == 4


def test_token_logprobs_match_the_model_distribution(runtime):
    prompt = runtime.encode_special("one two three four", True)
    events = complete(runtime, prompt, max_new_tokens=3, ignore_eos=True, logprobs=5)
    tokens = [t for d in deltas(events) for t in d.logprobs]
    assert [t.id for t in tokens] == ids(events)
    for t in tokens:
        assert len(t.top_logprobs) == 5 and t.top_logprobs[0] == (t.id, pytest.approx(t.logprob))
    # Greedy logprobs are the raw distribution: scoring prompt + first token as a prompt must
    # give the first token the same logprob.
    scored = complete(runtime, prompt + [tokens[0].id], max_new_tokens=1, prompt_logprobs=2)
    entries = next(e for e in scored if isinstance(e, PromptLogprobs)).logprobs
    assert entries[0] is None and len(entries) == len(prompt) + 1
    assert entries[-1].id == tokens[0].id
    assert entries[-1].logprob == pytest.approx(tokens[0].logprob, abs=1e-4)


def test_prompt_logprobs_span_prefill_chunks(runtime, monkeypatch):
    from fermi import generate

    prompt = [int(i) for i in np.random.default_rng(0).integers(5, 300, size=40)]
    whole = complete(runtime, prompt, max_new_tokens=1, prompt_logprobs=0)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    chunked = complete(runtime, prompt, max_new_tokens=1, prompt_logprobs=0)
    a = next(e for e in whole if isinstance(e, PromptLogprobs)).logprobs
    b = next(e for e in chunked if isinstance(e, PromptLogprobs)).logprobs
    assert [t.id for t in a[1:]] == prompt[1:]
    assert [t.logprob for t in a[1:]] == pytest.approx([t.logprob for t in b[1:]], abs=1e-4)


def test_n_choices_use_seed_plus_index(runtime):
    sampling = SamplingParams(**HOT, seed=11)
    many = complete(runtime, "Once upon", max_new_tokens=6, ignore_eos=True, n=3, sampling=sampling)
    finished = many[-1]
    assert finished.finish_reasons == ["length"] * 3 and finished.usage.completion_tokens == 18
    for index in range(3):
        one = complete(
            runtime,
            "Once upon",
            max_new_tokens=6,
            ignore_eos=True,
            sampling=SamplingParams(**HOT, seed=11 + index),
        )
        assert ids(many, index) == ids(one)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 2, "session_id": "s"}, "n"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_bad_raw_requests_name_the_field(runtime, fields, param):
    with pytest.raises(InvalidRequest) as e:
        runtime.submit(GenerationRequest([], **fields))
    assert e.value.param == param


def test_raw_prompt_too_long_is_refused(runtime):
    with pytest.raises(ContextLengthExceeded) as e:
        runtime.submit(GenerationRequest([], prompt=[5] * runtime.context_length))
    assert e.value.param == "prompt"
