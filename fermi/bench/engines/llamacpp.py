"""llama.cpp through llama-cpp-python (a CPU build): an f32 GGUF written from the checkpoint's
safetensors, and Q8_0 / Q4_0 made from it with `llama_model_quantize`."""

from __future__ import annotations

import ctypes
from importlib import metadata
from pathlib import Path

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("llama-cpp-python", "gguf")}


def imports() -> None:
    import llama_cpp  # noqa: F401


def gguf_path(spec: dict, variant: str) -> Path:
    return Path(spec["cache"]) / f"model-{variant}.gguf"


def prepare(spec: dict) -> dict:
    from fermi.bench.gguf_export import write_gguf

    variant = spec["engine"]["variant"]
    f32 = gguf_path(spec, "f32")
    if not f32.is_file():
        f32.parent.mkdir(parents=True, exist_ok=True)
        tmp = f32.with_suffix(".tmp")
        write_gguf(Path(spec["checkpoint"]), tmp)
        tmp.rename(f32)
    target = gguf_path(spec, variant)
    if not target.is_file():
        quantize(f32, target, variant, spec["config"]["threads"])
    return {"model_path": str(target), "model_bytes": target.stat().st_size}


def quantize(source: Path, target: Path, variant: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[variant])
    params.nthread = threads
    tmp = target.with_suffix(".tmp")
    code = llama_cpp.llama_model_quantize(
        str(source).encode(), str(tmp).encode(), ctypes.byref(params)
    )
    if code != 0:
        raise RuntimeError(f"llama_model_quantize to {variant} failed ({code})")
    tmp.rename(target)


def load(spec: dict) -> LlamaModel:
    import llama_cpp

    config = spec["config"]
    context = max(config["prompt_lengths"] + [config["decode_prompt"]]) + config["new_tokens"] + 16
    path = gguf_path(spec, spec["engine"]["variant"])
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=512,
        n_threads=config["threads"],
        n_threads_batch=config["threads"],
        verbose=False,
    )
    return LlamaModel(llm, path, spec["engine"]["variant"])


class LlamaModel:
    def __init__(self, llm, path: Path, variant: str):
        self.llm = llm
        self.path = path
        self.label = f"llama.cpp {variant.upper()} (llama-cpp-python, CPU)"

    def weight_bytes_per_token(self) -> int:
        """Every tensor of the GGUF, less the token embedding when a separate output matrix
        exists (then a step reads one embedding row); tied, it is the output matrix."""
        import gguf

        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(self.path)).tensors}
        total = sum(tensors.values())
        if "output.weight" in tensors:
            total -= tensors.get("token_embd.weight", 0)
        return total

    def stream(self, ids: list[int], count: int):
        """Greedy (top_k 1) from an empty KV cache: reset() drops the previous sequence, so the
        prompt is never served from a cached prefix. generate() ignores end-of-sequence."""
        self.llm.reset()
        tokens = self.llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )
        for produced, token in enumerate(tokens, start=1):
            yield int(token)
            if produced >= count:
                return
