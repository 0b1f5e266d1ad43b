"""What a run measures: sizes, repetitions and engines, shared by the orchestrator and workers
(it travels to a worker as JSON, so it holds plain values only)."""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field

# Engine families and the variants `--engines llamacpp` expands to. A variant is the precision
# or quantization the family runs the checkpoint at.
FAMILIES: dict[str, list[str]] = {
    "fermi": ["fp32", "int8", "int4"],  # the cpu target; int8/int4 exported by the worker
    "transformers": ["fp32"],
    "llamacpp": ["f32", "q8_0", "q4_0", "q4_k_m"],  # native llama.cpp (fermi.bench.llama_cpp)
    "ortgenai": ["fp32", "int4"],
}
DEFAULT_ENGINES = "fermi,transformers,llamacpp,ortgenai"
# Families that run on the interpreter running `fermi bench` (no peer venv): fermi itself, and
# llama.cpp, a native program.
LOCAL_FAMILIES = ("fermi", "llamacpp")
# Thread modes each engine runs in, in the same run: "spin" lets worker threads spin between
# kernels (llama.cpp's and onnxruntime's default; fermi's FERMI_SPIN=1), "passive" makes them
# sleep (fermi's default; llama.cpp with OMP_WAIT_POLICY=PASSIVE and --poll 0).
THREADING = ("spin", "passive")


@dataclass
class BenchConfig:
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 1024, 4096])
    new_tokens: int = 256  # decoded per decode run, eos ignored
    decode_prompt: int = 128  # prompt length of the decode runs
    reps: int = 3  # repetitions of every timed measurement (the median is reported)
    cold_reps: int = 3  # fresh processes for the cold start
    warmup_tokens: int = 8  # one untimed generation after load
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    server_tokens: int = 64  # completion tokens per server request
    server_prompt_words: int = 100
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # The thread modes every engine is measured in (THREADING), in this order.
    threading: list[str] = field(default_factory=lambda: list(THREADING))
    # The mode of the engine run at hand (set per run by the orchestrator from `threading`).
    spin: bool = False
    seed: int = 0

    def __post_init__(self):
        unknown = [mode for mode in self.threading if mode not in THREADING]
        if unknown or not self.threading:
            raise ValueError(
                f"threading takes a comma list of {', '.join(THREADING)}, not {self.threading!r}"
            )

    @classmethod
    def quick(cls) -> BenchConfig:
        """A run that fits in minutes: shorter prompts, fewer tokens and repetitions."""
        return cls(
            prompt_lengths=[128, 1024],
            new_tokens=64,
            reps=2,
            cold_reps=1,
            concurrency=[1, 4],
            server_tokens=32,
        )

    def replace(self, **changes) -> BenchConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchConfig:
        return cls(**data)


@dataclass(frozen=True)
class EngineId:
    family: str
    variant: str

    @property
    def name(self) -> str:
        return f"{self.family}:{self.variant}"

    @property
    def venv_name(self) -> str:
        return f"bench_{self.family}"


def parse_engines(text: str) -> list[EngineId]:
    """`fermi,llamacpp:q4_0,ortgenai` -> engine ids; a bare family means all its variants."""
    engines: list[EngineId] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        family, _, variant = item.partition(":")
        if family not in FAMILIES:
            raise ValueError(f"unknown engine {family!r}: choose from {', '.join(FAMILIES)}")
        variants = [variant.lower()] if variant else FAMILIES[family]
        for v in variants:
            if v not in FAMILIES[family]:
                raise ValueError(f"{family} has no variant {v!r}: {', '.join(FAMILIES[family])}")
            if EngineId(family, v) not in engines:
                engines.append(EngineId(family, v))
    if not engines:
        raise ValueError("no engine selected")
    return engines


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    """A deterministic prompt of exactly `length` ordinary token ids (below `vocab`, the size
    without added/special tokens). Every engine gets the same ids: no tokenizer differences."""
    rng = random.Random(seed * 1_000_003 + length)
    return [rng.randrange(vocab) for _ in range(length)]
