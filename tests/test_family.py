"""Model-family knowledge comes from the architecture spec and the manifest, never the name:
the manifest's family fields at export, the same values inferred for a manifest that predates
them, and the runtime's sampling defaults and thinking support taken from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from export.architectures import QWEN3_SAMPLING
from export.exporter import export_model
from fermi.artifact import FAMILY_FIELDS, MANIFEST, Manifest, load_manifest
from fermi.family import detokenizer_kind, family_fields
from fermi.requests import GenerationRequest, Message
from fermi.runtime import Runtime
from fermi.settings import Settings

THINK = ["<think>", "</think>"]
TOOL_CALL = ["<tool_call>", "</tool_call>"]


def test_tiny_qwen3_manifest_has_the_family_fields(tiny_artifact):
    m = load_manifest(tiny_artifact)
    assert m.detokenizer == "byte_level"
    assert m.reasoning_tags == THINK
    assert m.sampling_advice == QWEN3_SAMPLING  # carried by the Qwen3ForCausalLM row
    assert m.sampling_defaults == "generation_config"  # it ships temperature 0.6 ...
    saved = json.loads((tiny_artifact / MANIFEST).read_text())
    assert FAMILY_FIELDS <= saved.keys()


def test_qwen3_real_tokenizer_and_template(qwen3_tokenizer_dir):
    fields = family_fields(qwen3_tokenizer_dir, True, QWEN3_SAMPLING)
    assert fields["detokenizer"] == "byte_level"
    assert fields["reasoning_tags"] == THINK
    assert (fields["tool_call_tags"], fields["tool_call_format"]) == (TOOL_CALL, "hermes")
    # No generation_config.json beside it: the family's advice is what applies.
    assert fields["sampling_defaults"] == "family_advice"


def llama_style_tokenizer_json() -> dict:
    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return json.loads(tok.to_str())


def test_detokenizer_kind_from_tokenizer_json(qwen3_tokenizer_dir):
    qwen = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text())
    assert detokenizer_kind(qwen) == "byte_level"
    assert detokenizer_kind(llama_style_tokenizer_json()) == "sentencepiece"
    assert detokenizer_kind({"decoder": {"type": "WordPiece"}}) is None


def test_old_manifest_gets_the_fields_inferred(tiny_artifact, tmp_path):
    """A manifest written before the family fields loads, with the values export would write."""
    old = Path(shutil.copytree(tiny_artifact, tmp_path / "old"))
    data = json.loads((old / MANIFEST).read_text())
    current = {k: data.pop(k) for k in FAMILY_FIELDS}
    (old / MANIFEST).write_text(json.dumps(data))
    m = Manifest.read(old)
    assert {k: getattr(m, k) for k in FAMILY_FIELDS} == current
    assert load_manifest(old).sampling_advice == QWEN3_SAMPLING


def strip_sampling(artifact: Path, tmp_path: Path, architecture: str | None = None) -> Path:
    """A copy of the artifact whose generation_config.json has no sampling values (the eos ids
    stay), as a checkpoint that ships none would give; optionally another architecture."""
    copy = Path(shutil.copytree(artifact, tmp_path / "copy"))
    config = json.loads((copy / "generation_config.json").read_text())
    keep = {k: v for k, v in config.items() if k.endswith("token_id")}
    (copy / "generation_config.json").write_text(json.dumps(keep))
    manifest = json.loads((copy / MANIFEST).read_text())
    for name in FAMILY_FIELDS:  # re-inferred from the edited files
        manifest.pop(name)
    if architecture:
        manifest["architecture"] = architecture
    manifest["files"].pop("generation_config.json")  # edited: no longer checked
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def resolved(artifact: Path, thinking: str):
    runtime = Runtime(Settings(model=str(artifact), device="cpu"), artifact, "cpu")
    generation = runtime.submit(GenerationRequest([Message("user", "hi")], thinking=thinking))
    try:
        return generation._job.sampling, runtime.manifest.sampling_defaults
    finally:
        generation.close()


def test_runtime_uses_the_models_generation_config_in_both_modes(tiny_artifact):
    for thinking in ("on", "off"):
        sampling, source = resolved(tiny_artifact, thinking)
        assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.6, 0.95, 20)
        assert source == "generation_config"


def test_runtime_uses_family_advice_only_when_the_config_has_none(tiny_artifact, tmp_path):
    artifact = strip_sampling(tiny_artifact, tmp_path)
    on, source = resolved(artifact, "on")
    assert (on.temperature, on.top_p, on.top_k, source) == (0.6, 0.95, 20, "family_advice")
    off, _ = resolved(artifact, "off")
    assert (off.temperature, off.top_p, off.top_k) == (0.7, 0.8, 20)


def test_other_families_get_neutral_defaults_whatever_the_name(tiny_artifact, tmp_path):
    """The same files under a family that advises nothing: neutral values, though the source
    is still named tiny-qwen3."""
    artifact = strip_sampling(tiny_artifact, tmp_path, architecture="LlamaForCausalLM")
    sampling, source = resolved(artifact, "off")
    assert (sampling.temperature, sampling.top_p, sampling.top_k, source) == (1, 1, 0, "neutral")


@pytest.mark.parametrize("supports", [True, False])
def test_thinking_support_comes_from_the_manifest(tiny_artifact, tmp_path, supports):
    artifact = Path(shutil.copytree(tiny_artifact, tmp_path / "a"))
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["supports_thinking"] = supports
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    runtime = Runtime(Settings(model="Qwen/Qwen3-1.7B", device="cpu"), artifact, "cpu")
    generation = runtime.submit(GenerationRequest([Message("user", "hi")], thinking="on"))
    generation.close()
    assert generation.thinking is supports


def test_a_llama_checkpoint_gets_its_own_family_fields(tmp_path):
    """A Llama checkpoint with a plain ChatML template and no sampling values: no reasoning or
    tool-call tags, neutral sampling."""
    transformers = pytest.importorskip("transformers")
    from export import tiny

    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=64,
        eos_token_id=2,
    )
    checkpoint = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(checkpoint)
    tiny.write_tokenizer(checkpoint)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    m = load_manifest(export_model(str(checkpoint), "fp32", tmp_path / "out"))
    assert (m.architecture, m.supports_thinking, m.sampling_advice) == (
        "LlamaForCausalLM",
        False,
        None,
    )
    assert (m.tool_call_tags, m.tool_call_format, m.sampling_defaults) == (None, None, "neutral")
    # tiny's vocabulary carries Qwen3's <think> tokens, so the tags are known, but thinking is
    # not supported by this template.
    assert m.reasoning_tags == THINK and m.detokenizer == "byte_level"
