"""Measure fermi's graph variants beside onnxruntime-genai and llama.cpp on one checkpoint, in
one run on one machine, with every engine in a fresh process per measurement:

    python -m export.bench_variants --checkpoint DIR --out DIR [--rounds 3] [--threads 2]

Engines and their inputs (made beforehand; see docs/benchmarks.md, "Fast graphs"):
  fermi-<variant>=ARTIFACT       an exported artifact (any target/precision)
  genai-<precision>=MODEL_DIR    onnxruntime-genai builder output, run in .nox/bench_ortgenai
  llama-<type>=FILE.gguf         llama.cpp via llama-cpp-python, run in .nox/bench_llamacpp

Per round and engine: `decode` (prompt 128, then 32 tokens one by one: median step time),
`ttft` (prompt 1024 to the first token) and `cold` (process spawn to the first token of a
16-token prompt: imports, load and one step; the engine's files are read just before, so the
page cache holds them). Once per engine: `rss` (prompt 4096 and 16 tokens: peak resident
memory). Each round first measures the machine's read bandwidth (`--threads` processes,
fermi.bench.bandwidth) and rotates the engine order, so that load from other work on the
machine spreads over all engines. An engine's decode ceiling is that bandwidth over the weight
bytes it reads per token.

Only the standard library is imported at module level: the same file is the worker that runs in
the peers' virtualenvs (with the repository as the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {
    "fermi": sys.executable,
    "genai": str(ROOT / ".nox/bench_ortgenai/bin/python"),
    "llama": str(ROOT / ".nox/bench_llamacpp/bin/python"),
}
# Without --spin, each engine's own best setting on a shared machine: spinning thread pools
# collapse when another process holds a core (llama.cpp's OpenMP workers, onnxruntime's intra-op
# spinning, which fermi leaves off by default and the genai worker turns off).
PASSIVE = {"llama": {"OMP_WAIT_POLICY": "PASSIVE"}}
SCENARIOS = {"decode": (128, 32), "ttft": (1024, 1), "cold": (16, 1), "rss": (4096, 16)}


# -- workers: load an engine, run one scenario, print one JSON line ------------------------------


def fermi_steps(path: str, threads: int, spin: bool):
    from fermi.engine import Engine
    from fermi.generate import decode_one_token, prefill

    engine = Engine(Path(path), "cpu", threads, spin)
    cache = engine.new_cache()

    def run(prompt: list[int], count: int):
        logits = prefill(engine, cache, prompt)
        yield
        for _ in range(count - 1):
            logits = decode_one_token(engine, cache, int(logits.argmax()))
            yield

    return run


def genai_steps(path: str, threads: int, spin: bool):
    import onnxruntime_genai as og

    config = og.Config(path)
    config.clear_providers()
    options = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": str(int(spin))}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)

    def run(prompt: list[int], count: int):
        params = og.GeneratorParams(model)
        total = len(prompt) + count  # max_length: genai preallocates the KV cache to it
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        yield
        for _ in range(count - 1):
            generator.generate_next_token()
            yield

    return run


def llama_steps(path: str, threads: int, spin: bool):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=4096 + 64,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )

    def run(prompt: list[int], count: int):
        llm.reset()
        llm.eval(prompt)
        yield
        for _ in range(count - 1):
            llm.eval([7])
            yield

    return run


LOADERS = {"fermi": fermi_steps, "genai": genai_steps, "llama": llama_steps}


def worker(family: str, path: str, scenario: str, threads: int, spin: bool, spawned: float) -> dict:
    run = LOADERS[family](path, threads, spin)
    loaded_at = time.time()
    prompt_len, count = SCENARIOS[scenario]
    prompt = [10 + (i * 7919) % 990 for i in range(prompt_len)]  # fixed ids, in every vocab
    steps, marks = run(prompt, count), []
    start = time.perf_counter()
    for _ in steps:
        marks.append(time.perf_counter())
    first = marks[0] - start
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {
        "load_s": loaded_at - spawned,
        "first_token_s": first,
        "cold_s": loaded_at - spawned + first,
        "step_s": statistics.median(gaps) if gaps else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


# -- driver --------------------------------------------------------------------------------------


def warm_page_cache(path: str) -> None:
    """Read an engine's files once, so that a cold start measures the engine, not the disk:
    with many engines in one run, earlier ones push later ones' weights out of the page cache,
    and whichever reads its weights lazily (memory-mapped) would pay that at its first token."""
    root = Path(path)
    for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def measure(name: str, path: str, scenario: str, threads: int, spin: bool) -> dict:
    family = name.split("-")[0]
    if scenario == "cold":
        warm_page_cache(path)
    spawned = time.time()
    command = [
        PYTHON[family],
        "-m",
        "export.bench_variants",
        "--worker",
        family,
        path,
        scenario,
        str(threads),
        str(int(spin)),
        str(spawned),
    ]
    env = {**os.environ, **({} if spin else PASSIVE.get(family, {}))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(engines: dict[str, str]) -> dict[str, int]:
    """Bytes read per decoded token of each ONNX engine's graph (fermi.bench.weights), fp32
    GGUFs by file size; the ceiling column uses them."""
    from fermi.bench.weights import onnx_bytes_per_token

    sizes = {}
    for name, path in engines.items():
        if name.startswith("llama"):
            sizes[name] = Path(path).stat().st_size
        else:
            sizes[name] = onnx_bytes_per_token(Path(path) / "model.onnx")
    return sizes


def ceiling(threads: int) -> float:
    from fermi.bench.bandwidth import measure as bandwidth

    return bandwidth(threads)["all_processes"]["median"]


def _median(runs: list[dict], engine: str, scenario: str, key: str) -> float | None:
    values = [
        r[key]
        for r in runs
        if r["engine"] == engine and r["scenario"] == scenario and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def report(results: dict, bytes_per_token: dict[str, int]) -> str:
    """The markdown table: medians over rounds. The share of the ceiling pairs each round's
    decode with that round's bandwidth (the load on the machine moves); the ceiling shown uses
    the median bandwidth."""
    runs, bandwidth = results["runs"], results["bandwidth_gb_s"]
    lines = [
        "| engine | decode tok/s (prompt 128) | % of ceiling (ceiling tok/s) | TTFT 1024 s "
        "| cold start s (load s) | peak RSS 4096 GB | decode tok/s at 4096 |",
        "|---" * 7 + "|",
    ]
    for name in dict.fromkeys(r["engine"] for r in runs):
        step = _median(runs, name, "decode", "step_s")
        shares = [
            1 / r["step_s"] * bytes_per_token[name] / (bandwidth[r["round"]] * 1e9)
            for r in runs
            if r["engine"] == name and r["scenario"] == "decode" and r.get("step_s")
        ]
        ceiling = statistics.median(bandwidth) * 1e9 / bytes_per_token[name]
        ttft = _median(runs, name, "ttft", "first_token_s")
        cold, load = _median(runs, name, "cold", "cold_s"), _median(runs, name, "cold", "load_s")
        rss, long_step = (_median(runs, name, "rss", k) for k in ("peak_rss_gb", "step_s"))
        cells = [
            name,
            f"{1 / step:.2f}" if step else "-",
            f"{100 * statistics.median(shares):.0f}% ({ceiling:.1f})" if shares else "-",
            f"{ttft:.2f}" if ttft else "-",
            f"{cold:.2f} ({load:.2f})" if cold else "-",
            f"{rss:.2f}" if rss else "-",
            f"{1 / long_step:.2f}" if long_step else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        family, path, scenario, threads, spin, spawned = sys.argv[2:8]
        print(json.dumps(worker(family, path, scenario, int(threads), spin == "1", float(spawned))))
        return
    parser = argparse.ArgumentParser(
        prog="python -m export.bench_variants", description=__doc__.split("\n")[0]
    )
    parser.add_argument("engines", nargs="+", help="name=path, name starting fermi-/genai-/llama-")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--spin", action="store_true", help="let every engine's threads spin (each one's default)"
    )
    parser.add_argument("--scenarios", default="decode,ttft,cold,rss")
    parser.add_argument("--report", action="store_true", help="only print OUT's table")
    args = parser.parse_args(argv)
    engines = dict(item.split("=", 1) for item in args.engines)
    if args.report:
        results = json.loads((args.out / "results.json").read_text())
        print(report(results, weight_bytes(engines)))
        return
    scenarios = args.scenarios.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads, "spin": args.spin, "bandwidth_gb_s": [], "runs": []}
    names = list(engines)
    for round_ in range(args.rounds):
        results["bandwidth_gb_s"].append(ceiling(args.threads))  # this round's ceiling
        order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate the order
        for scenario in [s for s in scenarios if s != "rss" or round_ == 0]:
            for name in order:
                entry = {
                    "engine": name,
                    "scenario": scenario,
                    "round": round_,
                    "load_average": os.getloadavg()[0],
                    **measure(name, engines[name], scenario, args.threads, args.spin),
                }
                results["runs"].append(entry)
                print(json.dumps(entry), flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
