"""The exported graph against transformers: logits with the KV cache fed back, greedy decoding
token for token (single and left-padded batch), fp16 within a stated tolerance, bf16 input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from export import tiny  # noqa: E402
from export.exporter import export_model  # noqa: E402
from fermi.artifact import MODEL_FILE, load_manifest  # noqa: E402

SMALL = {"num_hidden_layers": 2, "vocab_size": 320, "max_position_embeddings": 256}
CASES = {
    # head_dim 32 != 64 / 4, GQA 4:2, tied embeddings: the tiny-qwen3 layout.
    "qwen3-tied": (
        "Qwen3",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "tie_word_embeddings": True,
            "rope_theta": 1e6,
        },
    ),
    # head_dim 16 != 48 / 6, one kv head for six query heads, separate lm_head.
    "qwen3-untied": (
        "Qwen3",
        {
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_attention_heads": 6,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "tie_word_embeddings": False,
            "rope_theta": 1e4,
        },
    ),
    # q/k/v biases, no q/k norm, head_dim = hidden / heads.
    "qwen2-untied": (
        "Qwen2",
        {
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
            "rope_theta": 1e6,
        },
    ),
    "qwen2-tied-mha": (
        "Qwen2",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "rope_theta": 1e4,
        },
    ),
}


def randomize(model, seed: int) -> None:
    """Weights far from a fresh init's near-zero ones, so that attention is peaked and every
    mistake (mask, RoPE, bias, GQA order) moves the logits: matrices N(0, 1/fan_in), embeddings
    N(0, 1), biases N(0, 0.5), norm weights U(0.5, 1.5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def make_checkpoint(directory: Path, family: str, fields: dict, dtype=None) -> Path:
    """A random checkpoint saved by transformers itself, plus the tiny tokenizer files that an
    artifact needs (the vocab need not match for logits checks)."""
    fields = dict(fields)
    theta = fields.pop("rope_theta")
    config_cls = getattr(transformers, f"{family}Config")
    config = config_cls(
        **SMALL,
        **fields,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    randomize(model, seed=len(directory.name))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    tiny.write_tokenizer(directory)
    return directory


def reference(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    # The numpy greedy loop never stops, so neither may generate(): all tokens get compared.
    model.generation_config.eos_token_id = None
    return model.eval()


class Graph:
    """The exported graph driven the way the engine drives it: present fed back as past."""

    def __init__(self, artifact: Path):
        self.manifest = load_manifest(artifact)
        self.session = ort.InferenceSession(
            str(artifact / MODEL_FILE), providers=["CPUExecutionProvider"]
        )

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        shape = (batch, m.num_kv_heads, 0, m.head_dim)
        return [np.zeros(shape, m.kv_dtype) for _ in m.outputs[1:]]

    def __call__(self, ids, mask, positions, cache):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self.manifest.inputs[3:], cache, strict=True))
        logits, *present = self.session.run(None, feeds)
        assert logits.dtype == np.float32
        return logits, present


def positions_of(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def cached_logits(graph: Graph, ids: np.ndarray, mask: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens from an empty cache, then one token per step: (B, T, V)."""
    positions = positions_of(mask)
    logits, cache = graph(
        ids[:, :prefill], mask[:, :prefill], positions[:, :prefill], graph.empty_cache(len(ids))
    )
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = graph(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def greedy(graph: Graph, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    positions = positions_of(mask)
    logits, cache = graph(ids, mask, positions, graph.empty_cache(len(ids)))
    tokens = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        positions = positions[:, -1:] + 1
        logits, cache = graph(token[:, None], mask, positions, cache)
    return np.stack(tokens, axis=1)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_of(mask)),
        )
    return out.logits.float().numpy()


def left_padded_batch(vocab: int, lengths: tuple[int, int], seed: int = 0):
    """Two random sequences, the shorter left-padded: ids (2, T) and mask (2, T)."""
    rng = np.random.default_rng(seed)
    total = max(lengths)
    ids = rng.integers(3, vocab, size=(2, total), dtype=np.int64)
    mask = np.ones((2, total), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, : total - length] = 0
        ids[row, : total - length] = 0
    return ids, mask


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, fields = CASES[request.param]
    checkpoint = make_checkpoint(tmp_path_factory.mktemp(request.param), family, fields)
    return checkpoint, reference(checkpoint)


def test_fp32_logits_match_transformers_with_cache(case, tmp_path):
    checkpoint, model = case
    graph = Graph(export_model(str(checkpoint), precision="fp32", output=tmp_path / "a"))
    ids, mask = left_padded_batch(SMALL["vocab_size"], (14, 9))  # 6 prefill + 8 decode steps
    expected = torch_logits(model, ids, mask)
    got = cached_logits(graph, ids, mask, prefill=6)
    real = mask.astype(bool)  # pad positions' logits are meaningless in both
    assert np.abs(got - expected)[real].max() <= 1e-4


def test_fp16_logits_close_to_fp32_reference(case, tmp_path):
    checkpoint, model = case
    graph = Graph(export_model(str(checkpoint), precision="fp16", output=tmp_path / "a"))
    assert graph.manifest.kv_dtype == "float16"
    ids, mask = left_padded_batch(SMALL["vocab_size"], (14, 9))
    expected = torch_logits(model, ids, mask)[mask.astype(bool)]
    got = cached_logits(graph, ids, mask, prefill=6)[mask.astype(bool)]
    # fp16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4). Weights, activations and
    # the KV cache are each rounded and the errors add up over two layers; measured: 4-8e-4 of
    # the largest logit for these cases. 0.5% of it (~10 roundoffs) leaves margin without
    # hiding a real bug (a wrong mask, RoPE or bias moves logits by tens of percent).
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.005 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_bf16_checkpoint_exports_exactly(tmp_path):
    """Qwen ships bf16: export must read it (raw bytes when numpy lacks bf16) and match
    transformers running the same bf16 values in float32."""
    family, fields = CASES["qwen3-tied"]
    checkpoint = make_checkpoint(tmp_path / "bf16", family, fields, dtype=torch.bfloat16)
    model = reference(checkpoint)
    graph = Graph(export_model(str(checkpoint), precision="fp32", output=tmp_path / "a"))
    ids, mask = left_padded_batch(SMALL["vocab_size"], (12, 12))
    got = cached_logits(graph, ids, mask, prefill=4)
    assert np.abs(got - torch_logits(model, ids, mask)).max() <= 1e-4


def hf_greedy(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, pad: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.fixture(scope="module")
def tiny_reference():
    return reference(tiny.checkpoint_path())


def tiny_prompts() -> list[list[int]]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny.checkpoint_path())
    chats = [
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "你好! 2+2?"}],
    ]
    return [
        tokenizer.apply_chat_template(
            c, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for c in chats
    ]


def test_tiny_greedy_generation_matches_transformers(tiny_artifact, tiny_reference):
    prompt = np.array([tiny_prompts()[0]], dtype=np.int64)
    mask = np.ones_like(prompt)
    expected = hf_greedy(tiny_reference, prompt, mask, 32, pad=0)
    got = greedy(Graph(tiny_artifact), prompt, mask, 32)
    np.testing.assert_array_equal(got, expected)
    assert len(set(got[0].tolist())) > 8  # tiny-qwen3 does not just repeat itself


def test_tiny_greedy_left_padded_batch_matches_transformers(tiny_artifact, tiny_reference):
    first, second = tiny_prompts()
    pad = tiny.train_tokenizer().token_to_id("<|endoftext|>")
    total = max(len(first), len(second))
    ids = np.full((2, total), pad, dtype=np.int64)
    mask = np.zeros((2, total), dtype=np.int64)
    for row, prompt in enumerate((first, second)):
        ids[row, total - len(prompt) :] = prompt
        mask[row, total - len(prompt) :] = 1
    assert mask.min() == 0  # one row really is padded
    expected = hf_greedy(tiny_reference, ids, mask, 32, pad=pad)
    np.testing.assert_array_equal(greedy(Graph(tiny_artifact), ids, mask, 32), expected)
    # Each row alone gives the same tokens: padding changes nothing.
    for row, prompt in enumerate((first, second)):
        alone = np.array([prompt], dtype=np.int64)
        np.testing.assert_array_equal(
            greedy(Graph(tiny_artifact), alone, np.ones_like(alone), 32), expected[row : row + 1]
        )


def test_qwen2_greedy_generation_matches_transformers(tmp_path):
    family, fields = CASES["qwen2-untied"]
    checkpoint = make_checkpoint(tmp_path / "qwen2", family, fields)
    graph = Graph(export_model(str(checkpoint), precision="fp32", output=tmp_path / "a"))
    ids, mask = left_padded_batch(SMALL["vocab_size"], (7, 4), seed=1)
    expected = hf_greedy(reference(checkpoint), ids, mask, 32, pad=0)
    np.testing.assert_array_equal(greedy(graph, ids, mask, 32), expected)
