"""Measure fermi's graph variants beside onnxruntime-genai and llama.cpp on one checkpoint, in
one run on one machine, with every engine in a fresh process per measurement:

    python -m export.bench_variants --checkpoint DIR --out DIR [--rounds 3] [--threads 2]

Engines and their inputs (made beforehand; see docs/benchmarks.md, "Fast graphs"):
  fermi-<variant>=ARTIFACT       an exported artifact (any target/precision)
  genai-<precision>=MODEL_DIR    onnxruntime-genai builder output, run in .nox/bench_ortgenai
  llama-<type>=FILE.gguf         llama.cpp built natively (fermi.bench.llama_cpp), timed by
                                 its own llama-bench

Per round and engine: `decode` (prompt 128, then 32 tokens one by one: median step time),
`ttft` (prompt 1024 to the first token) and `cold` (process spawn to the first token of a
16-token prompt: imports, load and one step; the engine's files are read just before, so the
page cache holds them). Once per engine: `rss` (prompt 4096 and 16 tokens: peak resident
memory). Every scenario runs in each thread mode of `--threading` (spin: worker threads spin
between kernels, llama.cpp's default; passive: they sleep, fermi's default). Each round first
measures the machine's read bandwidth (`--threads` processes, fermi.bench.bandwidth's matvec
reader) and rotates the engine order, so that load from other work on the machine spreads over
all engines. An engine's decode ceiling is that bandwidth over the weight bytes it reads per
token.

llama.cpp runs as llama-bench: decode is its `tg 32` test at depth 128 (the rate over the 32
steps), TTFT its `pp 1024`, cold start the wall time of a fresh llama-bench process prefilling
16 tokens without warm-up, rss the peak of a `tg 16` at depth 4096 (os.wait4's rusage).

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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {
    "fermi": sys.executable,
    "genai": str(ROOT / ".nox/bench_ortgenai/bin/python"),
}
THREADING = ("spin", "passive")
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


LOADERS = {"fermi": fermi_steps, "genai": genai_steps}


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


def llama_tests(scenario: str):
    """The llama-bench test (and whether it warms up first) a scenario maps to."""
    from fermi.bench.llama_cpp import BenchTest

    prompt_len, count = SCENARIOS[scenario]
    if scenario in ("decode", "rss"):
        return BenchTest(gen=count, depth=prompt_len), scenario == "decode"
    return BenchTest(prompt=prompt_len), scenario == "ttft"


def llama_measure(path: str, scenario: str, threads: int, spin: bool) -> dict:
    """One scenario of native llama.cpp through llama-bench, in the worker's result shape."""
    from fermi.bench import llama_cpp

    threading = "spin" if spin else "passive"
    test, warmup = llama_tests(scenario)
    command = llama_cpp.bench_command(
        llama_cpp.build_llama_cpp(), Path(path), test, threads, threading, 1, warmup
    )
    env = {**os.environ, **llama_cpp.threading_env(threading)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.time()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of this child alone
        finished = time.time()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if process.returncode:
        return {"error": stderr.strip().splitlines()[-1:]}
    seconds = llama_cpp.parse_bench(stdout)[0]["seconds"][0]
    result = {"peak_rss_gb": usage.ru_maxrss / 1e6, "step_s": None}
    if test.gen:
        result["step_s"] = seconds / test.gen
    else:
        result |= {"first_token_s": seconds, "cold_s": finished - started}
        result["load_s"] = finished - started - seconds
    return result


def measure(name: str, path: str, scenario: str, threads: int, spin: bool) -> dict:
    family = name.split("-")[0]
    if scenario == "cold":
        warm_page_cache(path)
    if family == "llama":
        return llama_measure(path, scenario, threads, spin)
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
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
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


def _runs(runs: list[dict], engine: str, threading: str, scenario: str) -> list[dict]:
    return [
        r
        for r in runs
        if r["engine"] == engine
        and r.get("threading", "passive") == threading
        and r["scenario"] == scenario
    ]


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def default_threading(name: str) -> str:
    """fermi's threads sleep by default; onnxruntime-genai's and llama.cpp's spin."""
    return "passive" if name.startswith("fermi") else "spin"


def report(results: dict, bytes_per_token: dict[str, int]) -> str:
    """The markdown table, a row per engine and thread mode: medians over rounds. The share of
    the ceiling pairs each round's decode with that round's bandwidth (the load on the machine
    moves); the ceiling shown uses the median bandwidth."""
    runs, bandwidth = results["runs"], results["bandwidth_gb_s"]
    lines = [
        "| engine | threads | decode tok/s (prompt 128) | % of ceiling (ceiling tok/s) "
        "| TTFT 1024 s | cold start s (load s) | peak RSS 4096 GB | decode tok/s at 4096 |",
        "|---" * 8 + "|",
    ]
    modes = dict.fromkeys(r.get("threading", "passive") for r in runs)
    for name in dict.fromkeys(r["engine"] for r in runs):
        for mode in modes:
            decode = _runs(runs, name, mode, "decode")
            step = _median(decode, "step_s")
            shares = [
                1 / r["step_s"] * bytes_per_token[name] / (bandwidth[r["round"]] * 1e9)
                for r in decode
                if r.get("step_s")
            ]
            ceiling = statistics.median(bandwidth) * 1e9 / bytes_per_token[name]
            ttft = _median(_runs(runs, name, mode, "ttft"), "first_token_s")
            cold_runs = _runs(runs, name, mode, "cold")
            cold, load = _median(cold_runs, "cold_s"), _median(cold_runs, "load_s")
            rss_runs = _runs(runs, name, mode, "rss")
            rss, long_step = _median(rss_runs, "peak_rss_gb"), _median(rss_runs, "step_s")
            if not any((step, ttft, cold, rss)):
                continue
            cells = [
                name,
                mode + (" (default)" if mode == default_threading(name) else ""),
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
        "--threading", default="spin,passive", help="thread modes, each scenario in each"
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
    modes = args.threading.split(",")
    if not set(modes) <= set(THREADING):
        parser.error(f"--threading takes a comma list of {', '.join(THREADING)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads, "bandwidth_gb_s": [], "runs": []}
    names = list(engines)
    for round_ in range(args.rounds):
        results["bandwidth_gb_s"].append(ceiling(args.threads))  # this round's ceiling
        order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate the order
        for scenario in [s for s in scenarios if s != "rss" or round_ == 0]:
            for mode in modes if scenario in ("decode", "ttft") else modes[:1]:
                for name in order:
                    entry = {
                        "engine": name,
                        "scenario": scenario,
                        "threading": mode,
                        "round": round_,
                        "load_average": os.getloadavg()[0],
                        **measure(name, engines[name], scenario, args.threads, mode == "spin"),
                    }
                    results["runs"].append(entry)
                    print(json.dumps(entry), flush=True)
                    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
