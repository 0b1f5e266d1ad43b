"""Where one decode step goes: onnxruntime's profiler over the engine's own decode loop.

    python -m fermi.bench.step_cost ARTIFACT [--threads 2] [--spin] [--prompt 128] [--steps 32]
                                    [--config KEY=VALUE ...] [--json PATH]

For an artifact (any io_mode the engine runs), it prefills `--prompt` fixed token ids, then
decodes `--steps` tokens one at a time, twice: first unprofiled, for the step's wall time and
the CPU time of every thread of the process (user + system; on a shared machine the CPU time
moves far less than the wall time), then with onnxruntime's profiler on, for what each step is
made of:

- kernels per step and their time by op type (onnxruntime's `<node>_kernel_time` events),
- the executor's own time between kernels (the `model_run` event minus the kernels in it),
- thread-pool dispatches per step: kernels that handed work to the intra-op pool (a non-empty
  `thread_scheduling_stats.main_thread.block_size`). Without spinning each dispatch wakes a
  sleeping worker (a futex wake and, later, a sleep), so their count is what thread spinning or
  fewer ops per layer would save.

The profiler adds its own cost to every kernel (a few microseconds), so its step is longer than
the unprofiled one; the split by op type is what it is for. The profile format is onnxruntime's
Chrome-trace JSON (docs: onnxruntime.ai, "Profiling tools").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROMPT_IDS = (10, 1000)  # fixed ids drawn from this range: below every tokenizer's size


@dataclass
class StepCost:
    """One artifact's decode step. Times in milliseconds per step (medians over the steps)."""

    artifact: str
    threads: int
    spin: bool
    config: dict[str, str]
    prompt_tokens: int
    steps: int
    step_ms: float  # wall time of engine.forward for one new token, unprofiled
    cpu_ms: float  # CPU time of all the process's threads per step, unprofiled
    profiled_step_ms: float  # onnxruntime's model_run per step, profiler on
    kernel_ms: float  # sum of kernel times per step
    executor_ms: float  # model_run minus the kernels: the executor between kernels
    kernels: float  # kernels run per step
    dispatches: float  # kernels per step that used the intra-op thread pool
    by_op: dict[str, dict] = field(default_factory=dict)  # op type -> {count, ms, dispatches}
    top_nodes: list[tuple[str, float]] = field(default_factory=list)  # (node, ms per step)


def cpu_seconds() -> float:
    """User + system CPU seconds of every thread of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decode(engine, prompt: list[int], steps: int) -> tuple[list[float], float]:
    """Prefill `prompt`, then `steps` single-token steps; returns each step's wall seconds and
    the CPU seconds per step. Tokens are fixed (no sampling): the step's cost does not depend on
    which token it is."""
    cache = engine.new_cache()
    engine.forward(prompt, cache)
    walls = []
    cpu_start = cpu_seconds()
    for i in range(steps):
        started = time.perf_counter()
        engine.forward([prompt[i % len(prompt)]], cache)
        walls.append(time.perf_counter() - started)
    return walls, (cpu_seconds() - cpu_start) / steps


def dispatched(kernel: dict) -> bool:
    """Whether a kernel event handed work to the intra-op thread pool (its main thread's
    block_size list is non-empty). A session without a pool (1 thread) records no stats."""
    stats = kernel.get("args", {}).get("thread_scheduling_stats")
    if not isinstance(stats, dict):
        return False
    main = stats.get("main_thread")
    return isinstance(main, dict) and bool(main.get("block_size"))


def summarize_profile(events: list[dict], runs: int) -> dict:
    """The last `runs` model_run events of an onnxruntime profile and the kernels inside them,
    per run: kernel count, kernel ms, executor ms, dispatches, by op type and the top nodes."""
    model_runs = [e for e in events if e.get("name") == "model_run"][-runs:]
    if not model_runs:
        raise ValueError("the profile has no model_run event")
    kernels = sorted(
        (
            e
            for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
        ),
        key=lambda e: e["ts"],
    )
    by_op: dict[str, Counter] = {}
    nodes: Counter = Counter()
    total_run = total_kernel = count = dispatches = 0
    for run in model_runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        total_run += run["dur"]
        for event in kernels:
            if not start <= event["ts"] <= end:
                continue
            op = event["args"].get("op_name", "?")
            stats = by_op.setdefault(op, Counter())
            stats["count"] += 1
            stats["us"] += event["dur"]
            if dispatched(event):
                stats["dispatches"] += 1
                dispatches += 1
            nodes[event["name"].removesuffix("_kernel_time")] += event["dur"]
            total_kernel += event["dur"]
            count += 1
    n = len(model_runs)
    return {
        "profiled_step_ms": total_run / n / 1e3,
        "kernel_ms": total_kernel / n / 1e3,
        "executor_ms": (total_run - total_kernel) / n / 1e3,
        "kernels": count / n,
        "dispatches": dispatches / n,
        "by_op": {
            op: {
                "count": s["count"] / n,
                "ms": s["us"] / n / 1e3,
                "dispatches": s["dispatches"] / n,
            }
            for op, s in sorted(by_op.items(), key=lambda item: -item[1]["us"])
        },
        "top_nodes": [(name, us / n / 1e3) for name, us in nodes.most_common(10)],
    }


def measure(
    artifact: Path,
    threads: int = 2,
    spin: bool = False,
    prompt_tokens: int = 128,
    steps: int = 32,
    config: dict[str, str] | None = None,
) -> StepCost:
    """Decode `steps` tokens after `prompt_tokens` through fermi's CPU engine, unprofiled and
    then profiled (module docstring). `config`: extra onnxruntime session config entries."""
    import onnxruntime as ort

    from fermi import engine as engine_module
    from fermi.artifact import MODEL_FILE

    config = dict(config or {})
    engine = engine_module.Engine(artifact, "cpu", threads=threads, spin=spin)
    if config:  # the same session, with the extra entries
        options = engine_module.session_options(
            threads, {**engine.manifest.session_config, **config}, spin
        )
        engine.session = ort.InferenceSession(
            str(engine.artifact / MODEL_FILE),
            sess_options=options,
            providers=engine_module.providers_for("cpu"),
        )
    rng = np.random.default_rng(0)
    prompt = rng.integers(*PROMPT_IDS, prompt_tokens).tolist()
    decode(engine, prompt, 2)  # warm-up: first-run allocations
    walls, cpu = decode(engine, prompt, steps)

    with tempfile.TemporaryDirectory() as tmp:
        options = engine_module.session_options(
            threads, {**engine.manifest.session_config, **config}, spin
        )
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "step")
        engine.session = ort.InferenceSession(
            str(engine.artifact / MODEL_FILE),
            sess_options=options,
            providers=engine_module.providers_for("cpu"),
        )
        decode(engine, prompt, 2)  # its own warm-up; only the last `steps` runs are read
        decode(engine, prompt, steps)
        events = json.loads(Path(engine.session.end_profiling()).read_text())
    profile = summarize_profile(events, steps)
    return StepCost(
        artifact=str(artifact),
        threads=threads,
        spin=spin,
        config=config,
        prompt_tokens=prompt_tokens,
        steps=steps,
        step_ms=statistics.median(walls) * 1e3,
        cpu_ms=cpu * 1e3,
        **profile,
    )


def render(cost: StepCost) -> str:
    """A plain-text report: the step, then op types by time."""
    lines = [
        f"{cost.artifact}: {cost.threads} threads, spinning {'on' if cost.spin else 'off'}, "
        f"{cost.steps} steps after {cost.prompt_tokens} tokens",
        f"step {cost.step_ms:.2f} ms wall, {cost.cpu_ms:.2f} ms CPU (all threads); profiled "
        f"{cost.profiled_step_ms:.2f} ms = kernels {cost.kernel_ms:.2f} + executor "
        f"{cost.executor_ms:.2f}",
        f"{cost.kernels:.0f} kernels per step, {cost.dispatches:.0f} of them dispatched to the "
        "thread pool",
        "",
        f"{'op':34s} {'per step':>8s} {'ms':>8s} {'share':>6s} {'pool':>5s}",
    ]
    for op, s in cost.by_op.items():
        share = s["ms"] / cost.kernel_ms if cost.kernel_ms else 0.0
        lines.append(
            f"{op:34s} {s['count']:8.0f} {s['ms']:8.2f} {share:6.1%} {s['dispatches']:5.0f}"
        )
    lines += ["", "slowest nodes (ms per step):"]
    lines += [f"  {ms:7.3f}  {name}" for name, ms in cost.top_nodes]
    return "\n".join(lines)


def parse_config(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> dict; raises ValueError naming a pair without '='."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes KEY=VALUE, not {pair!r}")
        config[key] = value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fermi.bench.step_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin", action="store_true", help="let intra-op threads spin")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="decode steps measured")
    parser.add_argument(
        "--config", action="append", default=[], help="onnxruntime session config KEY=VALUE"
    )
    parser.add_argument("--json", type=Path, help="also write the result here as JSON")
    args = parser.parse_args(argv)
    if not (args.artifact / "fermi.json").is_file():
        print(f"error: {args.artifact} is not a fermi artifact (no fermi.json)", file=sys.stderr)
        return 2
    if args.prompt < 1 or args.steps < 1 or args.threads < 1:
        print("error: --prompt, --steps and --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        config = parse_config(args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cost = measure(args.artifact, args.threads, args.spin, args.prompt, args.steps, config)
    print(render(cost))
    if args.json:
        args.json.write_text(json.dumps(asdict(cost), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
