"""int4 quality beside llama.cpp: KL-divergence against fp32, perplexity ratio, bits per weight
and decode speed of fermi's int8/int4 variants and llama.cpp's Q8_0 / Q4_0 / Q4_K_M, on one
checkpoint and one text, in one run:

    python -m export.bench_quality (--checkpoint DIR | --gguf FILE) --out DIR [--text FILE]

The model comes as an HF safetensors checkpoint, or as a GGUF file (a quantized one is
dequantized: those weights are then the fp32 reference on both sides); from a GGUF, transformers
writes the checkpoint that fermi exports (`from_pretrained(..., gguf_file=...)`'s loader) and the
F32 GGUF keeps the file's own metadata and tokenizer.

Both sides use llama-perplexity's protocol (fermi/eval.py): chunks of 512 tokens, the second
half of each scored, KL(P_fp32 || P) per scored token.

- llama.cpp is built natively from the sources vendored in the llama-cpp-python sdist (cmake,
  fermi.bench.llama_cpp: llama-perplexity, llama-quantize, llama-bench), once, into the cache
  (`$FERMI_CACHE`, default ~/.cache/fermi); LLAMA_CPP_CMAKE_ARGS replaces the machine flags.
  A checkpoint becomes an F32 GGUF with llama.cpp's own convert_hf_to_gguf.py, quantized
  with llama-quantize; llama-perplexity runs once with --kl-divergence-base on F32, then with
  --kl-divergence per type. Its bits per weight are the loader's (file bytes over elements).
- fermi exports each variant (VARIANTS) from the same checkpoint and scores them all against
  its fp32 artifact (fermi.eval.evaluate_many). Bits per weight: the bytes of every weight
  initializer (codes, scales, zero points, norms; not the RoPE tables) over the checkpoint's
  parameter count, a tied table counted once.
- Decode: fermi's median step after a 128-token prompt (export/bench_variants.py, a fresh
  process per measurement, rounds interleaved); llama.cpp's llama-bench `tg` with the same
  thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from fermi.bench import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
TEXT = ROOT / "tests" / "data" / "gpl-3.0.txt"
# name -> (precision, GraphOptions fields)
VARIANTS = {
    "fp32": ("fp32", {}),
    "int8": ("int8", {}),
    "int4-plain": ("int4", {"int4": "plain"}),
    "int4-asym": ("int4", {"int4": "asym"}),
    "int4-mix": ("int4", {"int4": "mix"}),  # the int4 default
    "int4-gptq": ("int4", {"int4": "gptq"}),
}


# -- llama.cpp (built natively: fermi.bench.llama_cpp) --------------------------------------------


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, **kwargs)


def llama_gguf(bin_dir: Path, checkpoint: Path, out: Path, types: list[str]) -> dict[str, Path]:
    """F32 GGUF (llama.cpp's converter unless made from a GGUF already) and each quantized
    type, made once into `out`."""
    source = llama_cpp.source_dir(bin_dir)
    files = {"F32": out / "model-F32.gguf"}
    out.mkdir(parents=True, exist_ok=True)
    if not files["F32"].is_file():
        run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint),
             "--outtype", "f32", "--outfile", str(files["F32"])])  # fmt: skip
    for kind in types:
        files[kind] = out / f"model-{kind}.gguf"
        if not files[kind].is_file():
            done = run([str(bin_dir / "llama-quantize"), str(files["F32"]), str(files[kind]), kind],
                       capture_output=True, text=True)  # fmt: skip
            (out / f"quantize-{kind}.log").write_text(done.stdout + done.stderr)
    return files


PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "ppl_ref": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)",
    "kl_mean": r"Mean\s+KLD:\s*([-\d.]+)",
    "kl_p99": r"99\.0%\s+KLD:\s*([-\d.]+)",
    "kl_median": r"Median\s+KLD:\s*([-\d.]+)",
    "kl_max": r"Maximum KLD:\s*([-\d.]+)",
    "top1": r"Same top p:\s*([\d.]+)",
}
# llama-quantize's summary: the output's bytes * 8 over the model's elements
QUANT_BPW = r"quant size\s*=\s*[\d.]+ [MG]iB \(([\d.]+) BPW\)"


def llama_perplexity(bin_dir: Path, files: dict, text: Path, out: Path, threads: int) -> dict:
    """llama-perplexity's KL statistics for each quantized type against F32."""
    base = out / "F32.kld"
    common = ["-f", str(text), "-c", "512", "-b", "512", "-t", str(threads)]
    perplexity = str(bin_dir / "llama-perplexity")
    log = _output(run([perplexity, "-m", str(files["F32"]), "--kl-divergence-base", str(base),
                       *common], capture_output=True, text=True))  # fmt: skip
    (out / "F32.log").write_text(log)
    results = {"F32": {"bpw": 32.0}}
    for kind, path in files.items():
        if kind == "F32":
            continue
        command = [perplexity, "-m", str(path), "--kl-divergence-base", str(base),
                   "--kl-divergence", *common]  # fmt: skip
        log = _output(run(command, capture_output=True, text=True))
        (out / f"{kind}.log").write_text(log)
        results[kind] = {key: _float(pattern, log) for key, pattern in PATTERNS.items()}
        results[kind]["top1"] /= 100
        quantize_log = (files[kind].parent / f"quantize-{kind}.log").read_text()
        results[kind]["bpw"] = _float(QUANT_BPW, quantize_log)
    return results


def _output(done: subprocess.CompletedProcess) -> str:
    """llama-perplexity prints its statistics on stdout and its progress on stderr."""
    return done.stdout + done.stderr


def _float(pattern: str, log: str) -> float:
    match = re.search(pattern, log)
    if not match:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}")
    return float(match.group(1))


def llama_decode(bin_dir: Path, path: Path, threads: int) -> float:
    """llama-bench's token-generation rate (32 tokens after none, 3 repetitions), tokens/s;
    OpenMP threads sleep when idle, as fermi's do (spinning threads on a shared machine measure
    the load)."""
    test = llama_cpp.BenchTest(gen=32)
    result = llama_cpp.bench(bin_dir, path, test, threads, "passive", reps=3)
    return sum(result["tokens_per_s"]) / len(result["tokens_per_s"])


def f32_gguf(source: Path, output: Path) -> Path:
    """A GGUF file rewritten with every tensor dequantized to F32 (gguf.quants), its metadata
    (tokenizer, chat template, hyperparameters) kept."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(output), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def checkpoint_from_gguf(source: Path, output: Path) -> Path:
    """An fp32 HF checkpoint of a GGUF file through transformers' GGUF loader (which undoes
    llama.cpp's q/k row permutation); the tokenizer from the GGUF metadata."""
    if (output / "config.json").is_file():
        return output
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(output)
    return output


# -- fermi ---------------------------------------------------------------------------------------


def fermi_artifacts(checkpoint: Path, out: Path, names: list[str]) -> dict[str, Path]:
    from export.exporter import export_model
    from export.variants import GraphOptions

    artifacts = {}
    for name in names:
        precision, fields = VARIANTS[name]
        artifacts[name] = export_model(
            str(checkpoint),
            precision=precision,
            output=out / name,
            target="cpu",
            options=replace(GraphOptions(), **fields),
        )
    return artifacts


def parameter_count(checkpoint: Path) -> int:
    """Elements of every tensor in the checkpoint's safetensors files (a tied table once)."""
    from safetensors import safe_open

    count = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count += math.prod(shape)
    return count


def weight_bytes(artifact: Path) -> int:
    """Bytes of the graph's weight initializers: float and uint8 (codes, zero points) tensors
    but the RoPE cos/sin tables; integer constants (shapes, axes) are not weights."""
    import onnx

    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    kinds = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8}
    total = 0
    for tensor in graph.initializer:
        rope = "cos_cache" in tensor.name or "sin_cache" in tensor.name
        if rope or tensor.data_type not in kinds:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        total += int(external["length"]) if "length" in external else len(tensor.raw_data)
    return total


def fermi_decode(artifacts: dict[str, Path], threads: int, rounds: int) -> dict[str, float]:
    """Median decode tokens/s per variant, rounds interleaved (bench_variants' worker)."""
    from export.bench_variants import measure

    steps: dict[str, list[float]] = {name: [] for name in artifacts}
    for _ in range(rounds):
        for name, path in artifacts.items():
            result = measure(f"fermi-{name}", str(path), "decode", threads, False)
            if "step_s" in result:
                steps[name].append(result["step_s"])
    return {name: 1 / sorted(s)[len(s) // 2] for name, s in steps.items() if s}


# -- report --------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| | KL vs fp32 (mean) | KL 99% | top-1 | perplexity ratio | bits/weight | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["name"],
            _fmt(r.get("kl_mean"), "{:.4f}"),
            _fmt(r.get("kl_p99"), "{:.3f}"),
            _fmt(r.get("top1"), "{:.1%}"),
            _fmt(r.get("ppl_ratio"), "{:.3f}"),
            _fmt(r.get("bpw"), "{:.2f}"),
            _fmt(r.get("decode"), "{:.1f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value).replace("%", "%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.bench_quality", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="HF safetensors dir")
    source.add_argument("--gguf", type=Path, help="a GGUF file (dequantized: the fp32 reference)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of VARIANTS, fp32 first")
    parser.add_argument("--llama-types", default=",".join(LLAMA_TYPES), help="'' skips llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="fermi decode measurements")
    parser.add_argument("--no-decode", action="store_true", help="quality and size only")
    args = parser.parse_args(argv)
    from fermi.eval import evaluate_many

    args.out.mkdir(parents=True, exist_ok=True)
    if args.gguf:
        args.checkpoint = checkpoint_from_gguf(args.gguf, args.out / "checkpoint")
        (args.out / "gguf").mkdir(exist_ok=True)
        if not (args.out / "gguf" / "model-F32.gguf").is_file():
            f32_gguf(args.gguf, args.out / "gguf" / "model-F32.gguf")
    names = args.variants.split(",")
    artifacts = fermi_artifacts(args.checkpoint, args.out / "fermi", names)
    params = parameter_count(args.checkpoint)
    scored = evaluate_many(list(artifacts.values()), args.text, artifacts[names[0]])
    decode = {} if args.no_decode else fermi_decode(artifacts, args.threads, args.rounds)
    rows = []
    for name, result in zip(names, scored, strict=True):
        row = {"name": f"fermi {name}", **result.to_dict()}
        row["bpw"] = 8 * weight_bytes(artifacts[name]) / params
        row["decode"] = decode.get(name)
        rows.append(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    types = [t for t in args.llama_types.split(",") if t]
    if types:
        bin_dir = llama_cpp.build_llama_cpp()
        files = llama_gguf(bin_dir, args.checkpoint, args.out / "gguf", types)
        llama = llama_perplexity(bin_dir, files, args.text, args.out, args.threads)
        for kind in ["F32", *types]:
            row = {"name": f"llama.cpp {kind}", **llama[kind]}
            row["decode"] = (
                None if args.no_decode else llama_decode(bin_dir, files[kind], args.threads)
            )
            rows.append(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
