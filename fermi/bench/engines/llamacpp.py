"""llama.cpp built natively (fermi.bench.llama_cpp), measured by its own llama-bench: an F32
GGUF of the checkpoint (llama.cpp's convert_hf_to_gguf.py) or of a GGUF source (dequantized),
and Q8_0 / Q4_0 / Q4_K_M made from it by llama-quantize.

llama-bench times llama.cpp's own decode calls, so no interpreter sits between the engine and
the clock: TTFT at N is its `pp N` test (N prompt tokens in one batch from an empty cache, the
last position's logits), decode is its `tg` test (`new_tokens` single-token steps after
`decode_prompt` tokens of context, `-d`), and a cold start is the wall time of a fresh
llama-bench process that loads the model and prefills 16 tokens once (`--no-warmup`)."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

from fermi.bench import llama_cpp

KINDS = {"f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def versions() -> dict[str, str]:
    return {"llama.cpp": f"vendored in llama-cpp-python {llama_cpp.LLAMA_CPP_PYTHON}, native"}


def imports() -> None:
    """Nothing to import: the engine is a native program."""


def gguf_path(spec: dict) -> Path:
    kind = KINDS[spec["engine"]["variant"]]
    return Path(spec["cache"]) / f"model-{kind}.gguf"


def prepare(spec: dict) -> dict:
    """Build the tools (once), write the F32 GGUF and quantize it to the variant (cached)."""
    bin_dir = llama_cpp.build_llama_cpp()
    f32 = Path(spec["cache"]) / "model-F32.gguf"
    if spec.get("gguf"):
        llama_cpp.f32_from_gguf(Path(spec["gguf"]), f32)
    elif spec.get("checkpoint"):
        llama_cpp.f32_from_checkpoint(bin_dir, Path(spec["checkpoint"]), f32)
    else:
        raise ValueError("llama.cpp needs a checkpoint directory or a GGUF file to convert")
    kind = KINDS[spec["engine"]["variant"]]
    target = llama_cpp.quantized(bin_dir, f32, kind, spec["config"]["threads"])
    return {"model_path": str(target), "model_bytes": target.stat().st_size}


def load(spec: dict) -> LlamaBench:
    return LlamaBench(llama_cpp.build_llama_cpp(), gguf_path(spec), spec["config"])


class LlamaBench:
    """The loaded "model": llama-bench runs on the variant's GGUF with the run's settings."""

    def __init__(self, bin_dir: Path, path: Path, config: dict):
        self.bin_dir = bin_dir
        self.path = path
        self.config = config
        self.threading = "spin" if config["spin"] else "passive"
        self.label = f"llama.cpp {KINDS[path.stem.removeprefix('model-').lower()]} (native)"

    def weight_bytes_per_token(self) -> int:
        return llama_cpp.gguf_bytes_per_token(self.path)

    def bench(self, test: llama_cpp.BenchTest) -> dict:
        config = self.config
        return llama_cpp.bench(
            self.bin_dir, self.path, test, config["threads"], self.threading, config["reps"]
        )

    def measure(self) -> dict:
        """TTFT per prompt length (pp tests) and decode rates (the tg test), every repetition."""
        config = self.config
        ttft = {}
        for length in config["prompt_lengths"]:
            result = self.bench(llama_cpp.BenchTest(prompt=length))
            ttft[str(length)] = result["seconds"]
        test = llama_cpp.BenchTest(gen=config["new_tokens"], depth=config["decode_prompt"])
        decode = self.bench(test)
        return {
            "ttft_s": ttft,
            "decode_tok_s": decode["tokens_per_s"],
            "build": decode["build"],
            "cpu": decode["cpu"],
            # the largest llama-bench process so far (the longest prefill's)
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        }

    def cold(self) -> dict:
        """A fresh llama-bench process: start to the end of a 16-token prefill, no warm-up."""
        test = llama_cpp.BenchTest(prompt=16)
        command = llama_cpp.bench_command(
            self.bin_dir, self.path, test, self.config["threads"], self.threading, 1, warmup=False
        )
        env = {**os.environ, **llama_cpp.threading_env(self.threading)}
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        finished = time.time()
        prefill = llama_cpp.parse_bench(done.stdout)[0]["seconds"][0]
        return {
            "cold_start_s": finished - started,
            "first_token_at": finished,
            "import_s": 0.0,
            "load_s": finished - started - prefill,
        }
