"""LlamaForCausalLM from safetensors against transformers on every graph target: odd head dims
(48, 80, 40), 1 and 3 kv heads, tied and untied heads, attention and MLP biases, and each RoPE
scaling type (llama3, linear, yarn, dynamic) over sequences long enough that the scaling moves
the logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export_parity import (  # noqa: E402
    Graph,
    cached_logits,
    greedy,
    hf_greedy,
    left_padded_batch,
    randomize,
    reference,
    torch_logits,
)

from export import tiny  # noqa: E402
from export.architectures import model_config  # noqa: E402
from export.exporter import export_model  # noqa: E402
from export.rope import read_rope, rope_parameters  # noqa: E402
from export.variants import GraphOptions  # noqa: E402
from fermi.engine import Engine  # noqa: E402
from fermi.errors import UnsupportedArchitecture  # noqa: E402

VOCAB, CONTEXT = 320, 256
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short, so positions 32..200 are "long context"
}
CASES = {
    # head_dim 48 != 96 / 6, kv heads 3, untied, q/k/v/o and MLP biases, llama3 scaling.
    "hd48-kv3-untied-llama3-bias": {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "head_dim": 48,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "mlp_bias": True,
        "rope_parameters": {"rope_theta": 10000.0, **LLAMA3},
    },
    # head_dim 80, one kv head for four query heads, tied, linear scaling.
    "hd80-kv1-tied-linear": {
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 80,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0},
    },
    # head_dim 40 (not a multiple of 16: RoPE from standard ops before GQA), YaRN with its
    # attention factor on cos/sin.
    "hd40-kv1-untied-yarn": {
        "hidden_size": 80,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 40,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


def make_llama(directory: Path, fields: dict) -> Path:
    """A random LlamaForCausalLM saved by transformers, with tiny-qwen3's tokenizer files."""
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=CONTEXT,
        eos_token_id=2,
        **fields,
    )
    model = transformers.LlamaForCausalLM(config)
    randomize(model, seed=len(directory.name))
    model.save_pretrained(directory)
    tiny.write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    checkpoint = make_llama(tmp_path_factory.mktemp(request.param), CASES[request.param])
    return checkpoint, reference(checkpoint)


def random_ids(count: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, count).tolist()


def export(checkpoint: Path, tmp_path: Path, target: str) -> Path:
    return export_model(
        str(checkpoint),
        "fp32",
        tmp_path / target,
        target=target,
        options=GraphOptions(window=CONTEXT),
    )


def engine_logits(engine: Engine, ids: list[int], prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens (all positions' logits), then one token per step: (T, V)."""
    cache = engine.new_cache()
    out = [engine.forward(ids[:prefill], cache, last_only=False)]
    out += [engine.forward([t], cache)[None] for t in ids[prefill:]]
    return np.concatenate(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_parameters_match_transformers(name):
    """inv_freq and the cos/sin factor equal transformers' own rope init function's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(max_position_embeddings=CONTEXT, **CASES[name])
    rope_type = config.rope_parameters["rope_type"]
    expected, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    cfg = model_config(config.to_dict())
    got, got_factor = rope_parameters(cfg.rope, cfg.head_dim, cfg.context_length)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(factor, rel=1e-7)


def test_scaling_moves_the_logits(case):
    """The cases are long enough for the scaling to matter: the same weights with plain RoPE
    give different logits (so parity below really checks the scaled frequencies)."""
    checkpoint, model = case
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    config.rope_parameters = {
        "rope_type": "default",
        "rope_theta": config.rope_parameters["rope_theta"],
    }
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    ids = np.array([random_ids(200)])
    mask = np.ones_like(ids)
    diff = np.abs(torch_logits(plain.eval(), ids, mask) - torch_logits(model, ids, mask))
    assert diff.max() > 0.1


def test_portable_logits_match_transformers(case, tmp_path):
    checkpoint, model = case
    graph = Graph(export(checkpoint, tmp_path, "portable"))
    ids, mask = left_padded_batch(VOCAB, (200, 150))  # 180 prefill + 20 decode steps
    expected = torch_logits(model, ids, mask)
    got = cached_logits(graph, ids, mask, prefill=180)
    real = mask.astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-4


@pytest.mark.parametrize("target", ["cpu", "coreml"])
def test_fused_and_coreml_logits_match_transformers(case, target, tmp_path):
    """cpu: GroupQueryAttention with the scaled cos/sin caches (head_dim 48, 80) or the
    standard-op RoPE before it (head_dim 40); coreml: the fixed window with standard ops."""
    checkpoint, model = case
    engine = Engine(export(checkpoint, tmp_path, target), "cpu")
    ids = random_ids(200, seed=1)
    expected = torch_logits(model, np.array([ids]), np.ones((1, 200), np.int64))[0]
    assert np.abs(engine_logits(engine, ids, prefill=180) - expected).max() <= 1e-4


def test_greedy_generation_matches_transformers(case, tmp_path):
    """Greedy tokens from a 160-token prompt, token for token, portable and cpu graphs."""
    checkpoint, model = case
    prompt = np.array([random_ids(160, seed=2)])
    mask = np.ones_like(prompt)
    expected = hf_greedy(model, prompt, mask, 32, pad=0)
    np.testing.assert_array_equal(
        greedy(Graph(export(checkpoint, tmp_path, "portable")), prompt, mask, 32), expected
    )
    engine = Engine(export(checkpoint, tmp_path, "cpu"), "cpu")
    cache, tokens = engine.new_cache(), []
    logits = engine.forward(prompt[0].tolist(), cache)
    for _ in range(32):
        tokens.append(int(logits.argmax()))
        logits = engine.forward([tokens[-1]], cache)
    assert tokens == expected[0].tolist()


def test_dynamic_rope_equals_default_within_the_context(tmp_path):
    """Dynamic NTK changes theta only at or beyond max_position_embeddings, which the artifact
    never reaches: its graph matches transformers' dynamic model over the whole context."""
    fields = dict(CASES["hd80-kv1-tied-linear"])
    fields["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    checkpoint = make_llama(tmp_path / "dynamic", fields)
    graph = Graph(export(checkpoint, tmp_path, "portable"))
    ids, mask = left_padded_batch(VOCAB, (CONTEXT, 100))
    expected = torch_logits(reference(checkpoint), ids, mask)
    got = cached_logits(graph, ids, mask, prefill=CONTEXT - 4)
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a `factor`"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_rope_is_one_clear_error(config, message):
    with pytest.raises(UnsupportedArchitecture, match=message) as e:
        read_rope({"rope_theta": 1e4, **config})
    assert "\n" not in str(e.value)


def test_legacy_rope_scaling_field_is_read():
    """Older Llama 3.1 configs: rope_theta beside rope_scaling with `rope_type` (or `type`)."""
    rope = read_rope(
        {"rope_theta": 5e5, "max_position_embeddings": 131072, "rope_scaling": {**LLAMA3}}
    )
    assert (rope.theta, rope.rope_type, rope.params["factor"]) == (5e5, "llama3", 8.0)
    legacy = read_rope({"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (legacy.theta, legacy.rope_type) == (10000.0, "linear")


def test_cuda_target_fp16_close_to_fp32(case, tmp_path):
    """The cuda graph (fp16, the same scaled cos/sin caches) run by the CPU provider: within
    fp16's tolerance of the fp32 cpu graph, as tests/test_fast_graphs.py checks for Qwen."""
    checkpoint, _ = case
    ids = random_ids(200, seed=3)
    expected = engine_logits(Engine(export(checkpoint, tmp_path, "cpu"), "cpu"), ids, 180)
    cuda = export_model(
        str(checkpoint), "fp16", tmp_path / "cuda", target="cuda", options=GraphOptions()
    )
    got = engine_logits(Engine(cuda, "cpu"), ids, 180)
    assert np.abs(got - expected).max() <= 0.005 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("target", ["portable", "cpu"])
def test_mistral_without_sliding_window_matches_transformers(target, tmp_path):
    """MistralForCausalLM with sliding_window null: Llama's decoder, same parity."""
    config = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=CONTEXT,
        sliding_window=None,
        eos_token_id=2,
    )
    model = transformers.MistralForCausalLM(config)
    randomize(model, seed=5)
    model.save_pretrained(tmp_path / "mistral")
    tiny.write_tokenizer(tmp_path / "mistral")
    engine = Engine(export(tmp_path / "mistral", tmp_path, target), "cpu")
    ids = random_ids(60, seed=4)
    expected = torch_logits(model.eval(), np.array([ids]), np.ones((1, 60), np.int64))[0]
    assert np.abs(engine_logits(engine, ids, prefill=50) - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "fields",
    [
        {"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096},
    ],
)
def test_sliding_window_is_refused(fields):
    from export.architectures import check_sliding_window

    with pytest.raises(UnsupportedArchitecture, match="sliding-window"):
        check_sliding_window(fields)
    check_sliding_window({**fields, "use_sliding_window": False})  # Qwen2's switched-off window


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_int8_graph_agrees_with_fp32(case, tmp_path):
    """int8 weights (MatMulNBits) on the Llama layouts, biases included: top-1 agreement with
    the fp32 cpu graph and a small KL over 200 positions of scaled RoPE."""
    checkpoint, _ = case
    ids = random_ids(200, seed=6)
    expected = engine_logits(Engine(export(checkpoint, tmp_path, "cpu"), "cpu"), ids, 180)
    int8 = export_model(
        str(checkpoint), "int8", tmp_path / "int8", target="cpu", options=GraphOptions()
    )
    got = engine_logits(Engine(int8, "cpu"), ids, 180)
    p, q = log_softmax(expected), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9 and kl <= 0.01, kl
