"""The cost of constrained decoding per token, on a real vocabulary.

    python -m fermi.bench.constraint_mask --tokenizer DIR [--vocab 151936] [--tokens 200]

DIR holds a tokenizer.json (e.g. Qwen3's, 151,669 tokens, logits padded to 151,936). For each
grammar (a JSON schema, a forced tool call, a regex), a random-logits walk of `--tokens` steps
times: llguidance's mask alone (`fill_next_token_bitmask`), fermi's `Constraint.allowed_ids`
(that mask unpacked into the allowed token ids the sampler draws among) and the sampler's step
without and with the constraint (the latter includes the mask and llguidance consuming the
token). Also the one-off costs: the llguidance tokenizer (once per model) and a grammar's
compilation (once per request). Prints a markdown table; times are medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from llguidance.numpy import fill_next_token_bitmask
from tokenizers import Tokenizer

from fermi.constraints import Constraint, GrammarCompiler, request_grammar
from fermi.requests import GenerationRequest, OutputFormat
from fermi.sampling import ResolvedSampling, Sampler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}
TOOLS = [
    {"type": "function", "function": {"name": "lookup_person", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
]
REQUESTS = {
    "json_schema (4 fields, nested)": GenerationRequest(
        [], output_format=OutputFormat("json_schema", SCHEMA)
    ),
    "tool_choice required (2 tools)": GenerationRequest([], tools=TOOLS, tool_choice="required"),
    "regex `[a-z ]{1,200}`": GenerationRequest(
        [], output_format=OutputFormat("regex", "[a-z ]{1,200}")
    ),
}
SAMPLING = ResolvedSampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.3f}"


def measure(compiler: GrammarCompiler, request: GenerationRequest, vocab: int, steps: int):
    """Median ms per step: llguidance mask, allowed ids, sampler step without/with them."""
    terms = [compiler.tag_term(t) for t in ("<tool_call>", "</tool_call>")]
    start = time.perf_counter()
    spec = request_grammar(request, terms)
    constraint = Constraint(compiler.matcher(spec), vocab)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    plain, constrained = Sampler(SAMPLING, 0), Sampler(SAMPLING, 0, constraint=constraint)
    raw, full, free, masked = [], [], [], []
    for _ in range(steps):
        if constraint.matcher.is_stopped():
            constraint.matcher.reset()
        logits = rng.normal(0, 3, vocab).astype(np.float32)
        t0 = time.perf_counter()
        fill_next_token_bitmask(constraint.matcher, constraint._bits)
        t1 = time.perf_counter()
        constraint.allowed_ids(vocab)
        t2 = time.perf_counter()
        plain.sample(logits)
        t3 = time.perf_counter()
        constrained.sample(logits)
        t4 = time.perf_counter()
        raw.append(t1 - t0)
        full.append(t2 - t1)
        free.append(t3 - t2)
        masked.append(t4 - t3)
    return compile_s, raw, full, free, masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--eos", type=int, nargs="+", default=[151645, 151643])
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    compiler = GrammarCompiler(tokenizer, args.vocab, args.eos)
    start = time.perf_counter()
    compiler.ll_tokenizer  # noqa: B018 (built lazily: this is the one-off cost)
    print(f"llguidance tokenizer: {time.perf_counter() - start:.2f} s, vocab {args.vocab}\n")
    print("| grammar | compile (ms) | llguidance mask | allowed ids | sampler step | "
          "sampler step, constrained |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, request in REQUESTS.items():
        compile_s, raw, full, free, masked = measure(compiler, request, args.vocab, args.tokens)
        print(f"| {name} | {compile_s * 1000:.1f} | {_ms(raw)} | {_ms(full)} | {_ms(free)} | "
              f"{_ms(masked)} |")  # fmt: skip
    print(f"\n{args.tokens} steps each, median ms per token; {json.dumps(SAMPLING.__dict__)}")


if __name__ == "__main__":
    main()
