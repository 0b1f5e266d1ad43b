"""The per-target graph variants (export/variants.py) and the engine that feeds them: parity
with transformers and with the portable graph, greedy decoding, the shared KV buffer (growth,
trim, session reuse, eviction), logits for the last position only, int8/int4 agreement, the
CoreML graph's static provider check, and the export CLI's --target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export_parity import (  # noqa: E402
    CASES,
    SMALL,
    hf_greedy,
    make_checkpoint,
    reference,
    tiny_prompts,
    torch_logits,
)

from export import quantize  # noqa: E402
from export.coreml_support import STATIC_NOTE, check_artifact  # noqa: E402
from export.exporter import export_model  # noqa: E402
from export.variants import GraphOptions  # noqa: E402
from fermi.artifact import MODEL_FILE, load_manifest  # noqa: E402
from fermi.engine import Engine  # noqa: E402
from fermi.generate import DECODE_ROOM, prefill  # noqa: E402
from fermi.kv_cache import STEP, SharedKVCache, WindowKVCache  # noqa: E402
from fermi.models import resolve_artifact  # noqa: E402
from fermi.requests import GenerationRequest, Message, SamplingParams  # noqa: E402
from fermi.runtime import Runtime  # noqa: E402
from fermi.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0)
WINDOW = 64  # the coreml graphs' KV window in these tests


def export(checkpoint, tmp_path, target, precision="fp32", **options) -> Path:
    name = f"{target}-{precision}-{'-'.join(f'{k}{v}' for k, v in options.items())}"
    options.setdefault("window", WINDOW)
    return export_model(
        str(checkpoint), precision, tmp_path / name, target=target, options=GraphOptions(**options)
    )


def engine_logits(engine: Engine, ids: list[int], chunks: tuple[int, ...] = (6, 5)) -> np.ndarray:
    """Every position's logits the way generation produces them: prefill chunks (all positions
    asked for), then one token per step (last position only): (T, V)."""
    cache, out, start = engine.new_cache(), [], 0
    for size in chunks:
        out.append(engine.forward(ids[start : start + size], cache, last_only=False))
        start += size
    out += [engine.forward([t], cache)[None] for t in ids[start:]]
    assert cache.offset == len(ids)
    return np.concatenate(out)


def random_ids(count: int, seed: int = 0, vocab: int = SMALL["vocab_size"]) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, count).tolist()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, fields = CASES[request.param]
    checkpoint = make_checkpoint(tmp_path_factory.mktemp(request.param), family, fields)
    return checkpoint, reference(checkpoint)


# -- fp32 variants against transformers -------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "coreml"])
def test_fp32_variants_match_transformers(case, target, tmp_path):
    """All four layouts: GQA 4:2 and 6:1 and MHA, tied and untied heads, q/k norm or biases;
    head_dim 32 and 16 take GQA's fused rotary, head_dim 8 the standard-op RoPE before it."""
    checkpoint, model = case
    engine = Engine(export(checkpoint, tmp_path, target), "cpu")
    ids = random_ids(20)
    expected = torch_logits(model, np.array([ids]), np.ones((1, 20), np.int64))[0]
    assert np.abs(engine_logits(engine, ids) - expected).max() <= 1e-4


def test_fused_graph_uses_the_contrib_ops(tmp_path):
    graph = onnx.load(
        str(export("tiny-qwen3", tmp_path, "cpu") / MODEL_FILE), load_external_data=False
    )
    ops = {n.op_type for n in graph.graph.node}
    assert {
        "GroupQueryAttention",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    } <= ops
    assert not ops & {"Softmax", "Where", "Expand"}  # no attention left in standard ops
    gqa = next(n for n in graph.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in gqa.attribute}["do_rotary"] == 1
    assert ("com.microsoft", 1) in [(o.domain, o.version) for o in graph.opset_import]


def test_fused_greedy_generation_matches_transformers(tmp_path):
    """tiny-qwen3 (a trained model) decoded greedily through the engine, token for token."""
    from export import tiny

    engine = Engine(export("tiny-qwen3", tmp_path, "cpu"), "cpu")
    prompt = tiny_prompts()[0]
    expected = hf_greedy(
        reference(tiny.checkpoint_path()),
        np.array([prompt]),
        np.ones((1, len(prompt)), np.int64),
        32,
        pad=0,
    )[0].tolist()
    cache, tokens = engine.new_cache(), []
    logits = engine.forward(prompt, cache)
    for _ in range(32):
        tokens.append(int(logits.argmax()))
        logits = engine.forward([tokens[-1]], cache)
    assert tokens == expected
    assert len(set(tokens)) > 8


def test_cuda_graph_is_fp16_and_runs_on_cpu(tmp_path):
    """The cuda target is the fused graph in fp16 (kv cache included); the CPU provider has
    fp16 kernels for every op in it, so its numbers can be checked here (no GPU in CI):
    within fp16's tolerance of the fp32 graph, as in the portable fp16 parity test."""
    family, fields = CASES["qwen3-tied"]
    checkpoint = make_checkpoint(tmp_path / "ckpt", family, fields)
    artifact = export(checkpoint, tmp_path, "cuda", "fp16")
    manifest = load_manifest(artifact)
    assert (manifest.target, manifest.io_mode, manifest.kv_dtype) == ("cuda", "shared", "float16")
    ids = random_ids(20)
    expected = engine_logits(Engine(export(checkpoint, tmp_path, "cpu"), "cpu"), ids)
    got = engine_logits(Engine(artifact, "cpu"), ids)
    assert np.abs(got - expected).max() <= 0.005 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


# -- the shared KV buffer and last-position logits --------------------------------------------


@pytest.fixture(scope="module")
def fused_tiny(tmp_path_factory) -> Path:
    return export_model(
        "tiny-qwen3", "fp32", tmp_path_factory.mktemp("fused") / "tiny", target="cpu"
    )


@pytest.fixture(scope="module")
def portable_logits(tiny_artifact):
    """All-position logits of 600 tokens from the portable graph, the reference below."""
    ids = random_ids(600, seed=3, vocab=300)
    engine = Engine(tiny_artifact, "cpu")
    return ids, engine.forward(ids, engine.new_cache(), last_only=False)


def test_cache_grows_in_steps_and_keeps_its_contents(fused_tiny, portable_logits):
    ids, expected = portable_logits
    engine = Engine(fused_tiny, "cpu")
    cache = engine.new_cache()
    assert isinstance(cache, SharedKVCache) and cache.capacity == 0
    got = [prefill(engine, cache, ids[:200])[None]]  # in chunks of 512, here one
    # Sized to what the session needs (the prompt and a little room), not to the context.
    assert cache.capacity == 200 + DECODE_ROOM
    capacities = [cache.capacity]
    for token in ids[200:]:
        got.append(engine.forward([token], cache)[None])
        if cache.capacity != capacities[-1]:
            capacities.append(cache.capacity)
    assert capacities == [264, 264 + STEP, 264 + 2 * STEP]  # grown in steps, twice
    assert cache.nbytes == cache.capacity * 2 * 2 * 2 * 32 * 4  # layers, k/v, kv heads, dim
    assert np.abs(np.concatenate(got) - expected[199:]).max() <= 1e-4


def test_trim_reuses_the_buffer_in_place(fused_tiny, portable_logits):
    ids, expected = portable_logits
    engine = Engine(fused_tiny, "cpu")
    cache = engine.new_cache()
    engine.forward(ids[:500], cache)
    buffers = [v.data_ptr() for v in cache.values]
    cache.trim(120)
    assert cache.offset == 120
    logits = engine.forward(ids[120:400], cache, last_only=False)
    assert [v.data_ptr() for v in cache.values] == buffers  # no copy, no new buffer
    assert np.abs(logits - expected[120:400]).max() <= 1e-4


def test_last_position_logits_only(fused_tiny):
    """The head runs on the gathered last hidden state: a (1, 1, V) output, the same values."""
    engine = Engine(fused_tiny, "cpu")
    ids = random_ids(40, vocab=300)
    full = engine.forward(ids, engine.new_cache(), last_only=False)
    last = engine.forward(ids, engine.new_cache())
    assert full.shape == (40, engine.manifest.vocab_size) and last.shape == full.shape[1:]
    np.testing.assert_allclose(last, full[-1], atol=1e-5)
    session = engine.session
    m = engine.manifest
    feeds = {
        "input_ids": np.array([ids]),
        "seqlens_k": np.array([39], np.int32),
        "total_sequence_length": np.array(40, np.int32),
        "logits_index": np.array([39]),
    }
    feeds.update(
        {n: np.zeros((1, m.num_kv_heads, 64, m.head_dim), np.float32) for n in engine.past_names}
    )
    assert session.run(["logits"], feeds)[0].shape == (1, 1, m.vocab_size)


def test_window_cache_is_fixed_and_trims_by_offset(tmp_path):
    engine = Engine(export("tiny-qwen3", tmp_path, "coreml"), "cpu")
    assert engine.manifest.context_length == WINDOW  # the window bounds the context
    ids = random_ids(WINDOW, seed=5, vocab=300)
    expected = engine.forward(ids, engine.new_cache(), last_only=False)
    cache = engine.new_cache()
    assert isinstance(cache, WindowKVCache)
    engine.forward(ids[:50], cache)
    cache.trim(20)
    got = engine.forward(ids[20:], cache, last_only=False)
    assert np.abs(got - expected[20:]).max() <= 1e-4
    with pytest.raises(ValueError, match="window"):
        engine.forward([1], cache)


def ask(runtime: Runtime, text: str, session: str | None = None) -> tuple[list[int], object]:
    request = GenerationRequest(
        [Message("user", text)],
        max_new_tokens=12,
        sampling=GREEDY,
        thinking="off",
        session_id=session,
        append=session is not None,
    )
    *deltas, finished = runtime.submit(request)
    return [t for d in deltas for t in d.token_ids], finished


def test_session_prefix_reuse_on_the_shared_buffer(fused_tiny):
    runtime = Runtime.load(Settings(model=str(fused_tiny), device="cpu"))
    ask(runtime, "Tell me a story", "s")
    entry = runtime.sessions._sessions["s"].cache  # the session pins its prefix-cache entry
    assert entry.pinned
    held = len(entry.tokens)
    continued, finished = ask(runtime, "And then?", "s")
    assert finished.usage.cached_tokens > 0
    newer = runtime.sessions._sessions["s"].cache
    assert newer is not entry and len(newer.tokens) > held and newer.pinned and not entry.pinned
    history = runtime.sessions._sessions["s"].history[:-1]
    *fresh, done = runtime.submit(
        GenerationRequest(
            history, max_new_tokens=12, sampling=GREEDY, thinking="off", tenant="another"
        )
    )
    assert done.usage.cached_tokens == 0
    assert continued == [t for d in fresh for t in d.token_ids]


def test_evicted_session_starts_over_and_matches_fresh(fused_tiny):
    runtime = Runtime.load(Settings(model=str(fused_tiny), device="cpu", session_max=1))
    first, _ = ask(runtime, "Tell me a story", "a")
    ask(runtime, "Something else", "b")  # evicts "a" (one idle session at most)
    assert "a" not in runtime.sessions and "b" in runtime.sessions
    again, finished = ask(runtime, "Tell me a story", "a")
    assert again == first
    # The history went with the session; its KV stayed in the prefix cache, now unpinned.
    assert finished.usage.cached_tokens == finished.usage.prompt_tokens - 1


def test_runtime_exports_the_variant_of_its_device(tmp_path):
    family, fields = CASES["qwen3-tied"]
    checkpoint = make_checkpoint(tmp_path / "ckpt", family, fields)
    settings = Settings(model=str(checkpoint), device="cpu", artifacts=str(tmp_path / "arts"))
    artifact = resolve_artifact(str(checkpoint), "fp32", settings)
    manifest = load_manifest(artifact)
    assert (manifest.target, manifest.io_mode) == ("cpu", "shared")
    assert artifact.name == "ckpt-fp32-cpu"


# -- int8 / int4 ------------------------------------------------------------------------------


def test_blockwise_quantization_round_trip():
    w = np.random.default_rng(0).standard_normal((40, 72)).astype(np.float32)  # K pads to 96
    for bits, levels in ((8, 127), (4, 8)):
        packed, scales = quantize.quantize_blockwise(w, bits, 32)
        assert packed.shape == (40, 3, 32 * bits // 8) and scales.shape == (40, 3)
        back = quantize.dequantize_blockwise(packed, scales, bits, 72)
        blocks = np.abs(np.pad(w, ((0, 0), (0, 24)))).reshape(40, 3, 32).max(-1)
        # Rounding moves a weight by at most half a step; int4's clip of +8 to +7 by one step.
        step = np.repeat(blocks / levels, 32, axis=1)[:, :72]
        assert (np.abs(back - w) <= (0.5 if bits == 8 else 1.0) * step + 1e-7).all()


# Measured on these seeded checkpoints (tests/test_export_parity.py CASES), fp32 fused graph as
# the reference, 48 positions: int8 top-1 0.96-1.0, mean KL <= 0.002; int4 top-1 0.73-0.98,
# mean KL <= 0.075 (hidden sizes of 48-64 leave one or two 32-wide blocks per row, the worst
# case for block quantization). The bounds leave about 2x room.
AGREEMENT = {"int8": (0.9, 0.01), "int4": (0.6, 0.15)}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def assert_agrees_with_fp32(checkpoint: Path, artifact: Path, precision: str, tmp_path) -> None:
    """Top-1 agreement and mean KL(fp32 || quantized) over 48 positions, within AGREEMENT."""
    ids = random_ids(48)
    expected = engine_logits(Engine(export(checkpoint, tmp_path, "cpu"), "cpu"), ids)
    got = engine_logits(Engine(artifact, "cpu"), ids)
    p = log_softmax(expected)
    kl = (np.exp(p) * (p - log_softmax(got))).sum(-1).mean()
    top1 = (got.argmax(-1) == expected.argmax(-1)).mean()
    min_top1, max_kl = AGREEMENT[precision]
    assert top1 >= min_top1 and kl <= max_kl, (top1, kl)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("name", ["qwen3-tied", "qwen3-untied"])
def test_quantized_agrees_with_fp32(name, precision, tmp_path):
    """qwen3-tied: the tied table stored once, quantized, read by GatherBlockQuantized and
    MatMulNBits; qwen3-untied: hidden 48, so K is padded to whole blocks."""
    family, fields = CASES[name]
    checkpoint = make_checkpoint(tmp_path / name, family, fields)
    artifact = export(checkpoint, tmp_path, "cpu", precision)
    assert_agrees_with_fp32(checkpoint, artifact, precision, tmp_path)
    graph = onnx.load(str(artifact / MODEL_FILE), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    # Per layer: q/k/v stacked, o, gate/up stacked, down; then lm_head (int8). The int4 default
    # keeps v_proj at int8, so q+k and v are two matmuls (tests/test_quantize.py).
    per_layer = 5 if precision == "int4" else 4
    assert ops.count("MatMulNBits") == per_layer * SMALL["num_hidden_layers"] + 1
    assert ("GatherBlockQuantized" in ops) == fields["tie_word_embeddings"]
    manifest = load_manifest(artifact)
    int4 = {"int4": "mix"} if precision == "int4" else {}
    assert manifest.graph_options == {"block_size": 32, "accuracy_level": 4, "head": "int8", **int4}


def head_blocks(artifact: Path) -> dict[str, int]:
    graph = onnx.load(str(artifact / MODEL_FILE), load_external_data=False)
    return {
        n.op_type: next(a.i for a in n.attribute if a.name == "block_size")
        for n in graph.graph.node
        if "embed_tokens" in n.name and n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_head_uses_blocks_of_128(precision, tmp_path):
    """A tied int8 head (hidden 128) is quantized in blocks of 128, read that way by both the
    head and the embedding, and still agrees with fp32; the layers keep the 32-wide blocks."""
    family, fields = CASES["qwen3-tied"]
    checkpoint = make_checkpoint(tmp_path / "wide", family, {**fields, "hidden_size": 128})
    artifact = export(checkpoint, tmp_path, "cpu", precision)
    assert head_blocks(artifact) == {"MatMulNBits": 128, "GatherBlockQuantized": 128}
    graph = onnx.load(str(artifact / MODEL_FILE), load_external_data=False)
    layer_blocks = {
        attributes["block_size"]
        for n in graph.graph.node
        if n.op_type == "MatMulNBits" and "layers" in n.name
        for attributes in [{a.name: a.i for a in n.attribute}]
        if attributes["bits"] == {"int8": 8, "int4": 4}[precision]
    }
    assert layer_blocks == {32}
    assert_agrees_with_fp32(checkpoint, artifact, precision, tmp_path)
    # An int4 head keeps the graph's block.
    int4_head = export(checkpoint, tmp_path, "cpu", "int4", head="int4")
    assert head_blocks(int4_head) == {"MatMulNBits": 32, "GatherBlockQuantized": 32}


def test_quantized_weights_are_smaller(tmp_path):
    family, fields = CASES["qwen3-tied"]
    checkpoint = make_checkpoint(tmp_path / "ckpt", family, fields)
    from export.bench_quality import weight_bytes

    # The weights' own bytes: on a checkpoint this small the file is mostly alignment padding.
    sizes = {
        p: weight_bytes(export(checkpoint, tmp_path, "cpu", p)) for p in ("fp32", "int8", "int4")
    }
    assert sizes["int4"] < sizes["int8"] < 0.5 * sizes["fp32"]


def test_quantized_needs_a_fused_target(tmp_path):
    from fermi.errors import InvalidRequest

    for target in ("portable", "coreml"):
        with pytest.raises(InvalidRequest, match="MatMulNBits"):
            export_model("tiny-qwen3", "int4", tmp_path / target, target=target)


# -- CoreML: standard ops only, checked statically ---------------------------------------------


def test_coreml_graph_is_all_coreml_by_static_check(tmp_path):
    coreml = check_artifact(export("tiny-qwen3", tmp_path, "coreml", "fp16"))
    assert (coreml.cpu, coreml.partitions) == (0, 1) and coreml.coreml > 100
    graph = onnx.load(
        str(export("tiny-qwen3", tmp_path, "coreml") / MODEL_FILE), load_external_data=False
    )
    assert {n.domain for n in graph.graph.node} == {""}
    onnx.checker.check_model(str(export("tiny-qwen3", tmp_path, "coreml") / MODEL_FILE))
    static = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.graph.input
        if v.name.startswith("past_key_values.")
    }
    assert all(dims == [1, 2, WINDOW, 32] for dims in static.values())  # fixed window
    # The same check is not generous: the portable and fused graphs leave ops to the CPU.
    portable = check_artifact(export("tiny-qwen3", tmp_path, "portable"))
    assert portable.cpu > 0 and any(r.startswith("Neg") for r in portable.unsupported)
    fused = check_artifact(export("tiny-qwen3", tmp_path, "cpu"))
    assert any("com.microsoft" in r for r in fused.unsupported)
    assert STATIC_NOTE in coreml.summary()


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_export_target_and_block_size(tmp_path):
    out = tmp_path / "int4"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fermi.cli",
            "export",
            "tiny-qwen3",
            "--precision",
            "int4",
            "--target",
            "auto",
            "--block-size",
            "16",
            "--head",
            "int4",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert (manifest.precision, manifest.target) == ("int4", "cpu")  # auto: this machine
    assert (manifest.graph_options["block_size"], manifest.graph_options["head"]) == (16, "int4")
    options = GraphOptions(block_size=16, head="int4")
    assert export_model("tiny-qwen3", "int4", out, target="cpu", options=options) == out  # reused
