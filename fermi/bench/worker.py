"""The subprocess side of `fermi bench`, run with an engine's own interpreter:

    python -m fermi.bench.worker prepare|cold|measure SPEC.json OUT.json

SPEC names the engine, the config and the model files; OUT receives one JSON object, rewritten
after every phase, so a run stopped by its timeout still reports what it finished. Only the
standard library is imported here; the engine module brings its own dependencies."""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from contextlib import closing
from pathlib import Path


def main(argv: list[str]) -> None:
    task, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    engine = importlib.import_module(f"fermi.bench.engines.{spec['engine']['family']}")
    out = Path(out_path)
    {"prepare": prepare, "cold": cold, "measure": measure}[task](engine, spec, out)


def save(out: Path, result: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), from /proc where there is one."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def prepare(engine, spec: dict, out: Path) -> None:
    started = time.perf_counter()
    info = engine.prepare(spec)
    save(out, {**info, "prepare_s": time.perf_counter() - started})


def timed_load(engine, spec: dict) -> tuple[object, float, float]:
    """(model, seconds importing the engine's libraries, seconds loading the model)."""
    started = time.perf_counter()
    engine.imports()
    imported = time.perf_counter()
    model = engine.load(spec)
    return model, imported - started, time.perf_counter() - imported


def cold(engine, spec: dict, out: Path) -> None:
    """Load and produce one token, as a fresh process would; the parent knows when it started.
    A native engine times its own fresh process (`model.cold()`, with `cold_start_s`)."""
    model, import_s, load_s = timed_load(engine, spec)
    if hasattr(model, "cold"):
        save(out, model.cold())
        return
    with closing(model.stream(spec["prompts"]["cold"], 1)) as tokens:
        next(tokens)
    save(out, {"first_token_at": time.time(), "import_s": import_s, "load_s": load_s})


def timed_stream(model, ids: list[int], count: int) -> tuple[float, list[float]]:
    """Run a greedy generation of `count` tokens: (start, arrival time of each token)."""
    arrivals: list[float] = []
    start = time.perf_counter()
    with closing(model.stream(ids, count)) as tokens:
        for _ in tokens:
            arrivals.append(time.perf_counter())
            if len(arrivals) >= count:
                break
    if len(arrivals) < count:
        raise RuntimeError(f"{model.label} stopped after {len(arrivals)} of {count} tokens")
    return start, arrivals


def measure(engine, spec: dict, out: Path) -> None:
    config = spec["config"]
    prompts = spec["prompts"]
    model, import_s, load_s = timed_load(engine, spec)
    result: dict = {
        "versions": engine.versions(),
        "import_s": import_s,
        "load_s": load_s,
        "label": model.label,
        "weight_bytes_per_token": model.weight_bytes_per_token(),
    }
    save(out, result)
    if hasattr(model, "measure"):  # a native engine's own benchmark tool (and its peak RSS);
        # its load happens in each of the tool's processes, timed by `cold` only
        result = {k: v for k, v in result.items() if k not in ("import_s", "load_s")}
        save(out, result | model.measure())
        return
    timed_stream(model, prompts["decode"], config["warmup_tokens"])  # warm-up, not reported
    result["ttft_s"] = {}
    for length in config["prompt_lengths"]:
        runs = []
        for _ in range(config["reps"]):
            start, arrivals = timed_stream(model, prompts[str(length)], 1)
            runs.append(arrivals[0] - start)
        result["ttft_s"][str(length)] = runs
        save(out, result | {"peak_rss_bytes": peak_rss_bytes()})
    count = config["new_tokens"]
    result["decode_tok_s"] = []
    for _ in range(config["reps"]):
        _, arrivals = timed_stream(model, prompts["decode"], count)
        result["decode_tok_s"].append((count - 1) / (arrivals[-1] - arrivals[0]))
        save(out, result | {"peak_rss_bytes": peak_rss_bytes()})
    if hasattr(model, "extra"):
        result["extra"] = model.extra(spec)
    result["peak_rss_bytes"] = peak_rss_bytes()
    save(out, result)


if __name__ == "__main__":
    main(sys.argv[1:])
