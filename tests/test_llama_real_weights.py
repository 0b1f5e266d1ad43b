"""A real trained Llama-architecture model through the safetensors path: SmolLM2-135M-Instruct
(tests/smollm2_checkpoint.py) exported to the fp32 cpu graph decodes greedily exactly as
transformers does, token for token, on 10 chat prompts x 48 tokens; through the runtime its
streamed text equals transformers' decode of the same tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from smollm2_checkpoint import smollm2_safetensors  # noqa: E402

from export.exporter import export_model  # noqa: E402
from fermi.engine import Engine  # noqa: E402
from fermi.requests import GenerationRequest, Message, SamplingParams, TextDelta  # noqa: E402
from fermi.runtime import Runtime  # noqa: E402
from fermi.settings import Settings  # noqa: E402

NEW_TOKENS = 48
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a Python function that reverses a string.",
    "Who wrote Romeo and Juliet?",
    "List two benefits of regular exercise.",
]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return smollm2_safetensors()


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare all 48 tokens, past any end of turn
    return model.eval(), transformers.AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    yield export_model(str(checkpoint), "fp32", root / "cpu", target="cpu")
    shutil.rmtree(root, ignore_errors=True)  # 0.5 GB; the session keeps no module's exports


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def hf_argmax(model, ids: list[int]) -> list[int]:
    """transformers' greedy choice after every prefix of `ids`: argmax of each position's
    logits, one forward pass. A greedy continuation equals transformers' greedy decoding token
    for token exactly when each of its tokens is transformers' argmax after the tokens before
    it; this checks that without generate()'s 48 sequential steps."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits.argmax(-1).tolist()


def engine_greedy(engine: Engine, ids: list[int]) -> list[int]:
    cache, tokens = engine.new_cache(), []
    logits = engine.forward(ids, cache)
    for _ in range(NEW_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = engine.forward([tokens[-1]], cache)
    return tokens


def test_manifest_describes_a_llama(artifact):
    from fermi.artifact import load_manifest

    m = load_manifest(artifact)
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.head_dim) == (
        "LlamaForCausalLM",
        30,
        3,
        64,
    )
    assert m.eos_token_ids == [2] and m.context_length == 8192


def test_greedy_equals_transformers_on_ten_prompts(hf, artifact):
    model, tokenizer = hf
    engine = Engine(artifact, "cpu")
    for text in PROMPTS:
        ids = prompt_ids(tokenizer, text)
        tokens = engine_greedy(engine, ids)
        expected = hf_argmax(model, ids + tokens)[len(ids) - 1 : -1]
        assert tokens == expected, text


def test_runtime_answer_is_transformers_text(hf, artifact):
    """The whole runtime (template, sampling resolved to greedy, byte-level detokenizer): the
    answer streamed is transformers' greedy answer decoded, up to the end of turn."""
    model, tokenizer = hf
    runtime = Runtime(Settings(model=str(artifact), device="cpu"), artifact, "cpu")
    request = GenerationRequest(
        [Message("user", PROMPTS[0])],
        max_new_tokens=NEW_TOKENS,
        sampling=SamplingParams(temperature=0.0),
    )
    events = list(runtime.submit(request))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    tokens = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    ids = prompt_ids(tokenizer, PROMPTS[0])
    assert tokens == hf_argmax(model, ids + tokens)[len(ids) - 1 : -1]
    assert events[-1].finish_reason == "stop"  # ended at <|im_end|>, within 48 tokens
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in text


def test_fermi_chat_exports_and_answers_from_the_checkpoint(checkpoint, tmp_path):
    """As a user meets it: `fermi chat --model CHECKPOINT_DIR` exports the safetensors checkpoint
    on first use and answers a piped question greedily."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FERMI_ARTIFACTS": str(tmp_path / "artifacts")}
    done = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "chat", "--model", str(checkpoint)]
        + ["--device", "cpu", "--temperature", "0", "--max-new-tokens", "24"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert list((tmp_path / "artifacts").iterdir())  # exported there on first use
