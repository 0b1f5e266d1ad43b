"""The `fermi bench` run: resolve the model files, measure the bandwidth ceiling, then every
engine in its own subprocesses (prepare, cold starts, the warm measurement), then the fermi
OpenAI server under concurrent streams; write JSON, markdown and a chart."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fermi.bench import bandwidth, machine, report, server
from fermi.bench.config import LOCAL_FAMILIES, BenchConfig, EngineId, prompt_ids
from fermi.bench.stats import summarize

REPO_ROOT = Path(__file__).resolve().parents[2]  # puts `fermi.bench` on a peer's sys.path


@dataclass
class RunOptions:
    model: str  # artifact dir, checkpoint dir or tiny-qwen3
    engines: list[EngineId]
    config: BenchConfig
    out: Path = Path("bench-results")
    checkpoint: Path | None = None  # the peers' input; default: the artifact's source
    venvs: dict[str, Path] = field(default_factory=dict)  # family -> python
    nox_dir: Path = REPO_ROOT / ".nox"  # where the peers' venvs are found by default
    server: bool = True
    bandwidth: bool = True
    chart: bool = True
    timeout_s: float = 3600.0  # per worker subprocess
    command: str = ""
    docs: Path | None = None  # rewrite the results block of this markdown file


@dataclass
class Models:
    artifact: Path
    checkpoint: Path | None
    cache: Path
    name: str
    vocab: int  # ordinary (non-added) tokens: the range prompt ids are drawn from
    gguf: Path | None = None  # a GGUF source (a built-in model): what llama.cpp starts from


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(options: RunOptions) -> Path:
    """Measure everything `options` asks for; returns the directory holding the outputs."""
    models = resolve_models(options)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = options.out / f"{stamp}-{models.name}"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    results = {
        "schema": 1,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": options.command,
        "machine": machine.describe(),
        "model": {
            "name": models.name,
            "artifact": str(models.artifact),
            "checkpoint": str(models.checkpoint) if models.checkpoint else None,
            **machine.checkpoint_shape(models.checkpoint or models.artifact),
        },
        "config": options.config.to_dict(),
        "engines": [],
    }
    if options.bandwidth:
        log(f"memory bandwidth with 1 and {options.config.threads} readers")
        results["bandwidth_gb_s"] = bandwidth.measure(options.config.threads)
    prompts = make_prompts(options.config, models.vocab)
    for engine in options.engines:
        for threading in options.config.threading:
            stalls = machine.StallMeter()
            entry = run_engine(engine, options, models, prompts, run_dir, threading)
            results["engines"].append(entry | {"cpu_stall_share": stalls.share()})
            write(results, run_dir, options)
    if options.server and any(e.family == "fermi" for e in options.engines):
        log("fermi OpenAI server: concurrent streams " + str(options.config.concurrency))
        stalls = machine.StallMeter()
        results["server"] = server.measure(models.artifact, options.config, run_dir / "logs")
        results["server"]["cpu_stall_share"] = stalls.share()
    report.derive(results)
    write(results, run_dir, options, final=True)
    return run_dir


def write(results: dict, run_dir: Path, options: RunOptions, final: bool = False) -> None:
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not final:
        return
    markdown = report.markdown(results)
    (run_dir / "results.md").write_text(markdown)
    if options.chart:
        chart = report.chart(results, run_dir / "chart.png")
        if chart is None:
            log("no chart: matplotlib is missing (pip install 'fermi[bench]')")
    if options.docs:
        report.update_docs(options.docs, markdown, options.command)
    log(f"results in {run_dir}")


# -- model files ---------------------------------------------------------------------------------


def resolve_models(options: RunOptions) -> Models:
    """The fermi artifact (exported fp32 into the cache when given a checkpoint) and the
    checkpoint the peers convert."""
    from fermi.artifact import load_manifest
    from fermi.models import is_artifact

    checkpoint = options.checkpoint or checkpoint_of(options.model)
    cache = options.out / "cache" / cache_key(checkpoint or Path(options.model))
    if is_artifact(options.model):
        artifact = Path(options.model)
        checkpoint = checkpoint or source_checkpoint(load_manifest(artifact).source)
    else:
        from export.exporter import export_model

        log(f"exporting {options.model} to fp32 for fermi (cached in {cache})")
        artifact = export_model(
            options.model, precision="fp32", target="cpu", output=cache / "fermi-fp32-cpu"
        )
    gguf = None if checkpoint else gguf_source(load_manifest(artifact).source)
    name = (checkpoint or gguf or artifact).name
    return Models(artifact, checkpoint, cache, name, base_vocab(artifact), gguf)


def gguf_source(source: str) -> Path | None:
    """The GGUF file a manifest source (a built-in model, a .gguf path) resolves to, if any."""
    from export.source import resolve
    from fermi.errors import FermiError
    from fermi.settings import load_settings

    try:
        return resolve(source, None, load_settings()).gguf_file
    except FermiError:
        return None


def checkpoint_of(model: str) -> Path | None:
    from fermi.models import is_artifact

    if is_artifact(model):
        return None
    return source_checkpoint(model)


def source_checkpoint(source: str) -> Path | None:
    """A manifest source (or --model) as a local checkpoint directory, when it is one."""
    from export import tiny

    if source == tiny.NAME:
        from fermi.settings import load_settings

        return Path(tiny.checkpoint_path(load_settings()))
    path = Path(source).expanduser()
    return path.resolve() if (path / "config.json").is_file() else None


def cache_key(checkpoint: Path) -> str:
    """Derived files (GGUF, builder output, fermi export) are reused while the checkpoint's
    config and weight files (names, sizes, times) stay the same."""
    digest = hashlib.sha256(str(checkpoint.resolve()).encode())
    if checkpoint.is_dir():
        for path in sorted(checkpoint.iterdir()):
            if path.suffix in (".json", ".safetensors", ".data", ".onnx"):
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{checkpoint.name}-{digest.hexdigest()[:10]}"


def base_vocab(artifact: Path) -> int:
    from tokenizers import Tokenizer

    from fermi.artifact import load_manifest

    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    return min(
        tokenizer.get_vocab_size(with_added_tokens=False), load_manifest(artifact).vocab_size
    )


def make_prompts(config: BenchConfig, vocab: int) -> dict[str, list[int]]:
    prompts = {str(n): prompt_ids(n, vocab, config.seed) for n in config.prompt_lengths}
    prompts["decode"] = prompt_ids(config.decode_prompt, vocab, config.seed + 1)
    prompts["cold"] = prompt_ids(16, vocab, config.seed + 2)
    return prompts


# -- engines -------------------------------------------------------------------------------------


def engine_python(engine: EngineId, options: RunOptions) -> Path | None:
    """fermi and native llama.cpp run on this interpreter; a peer on its nox venv's (or the
    --venv override)."""
    if engine.family in LOCAL_FAMILIES:
        return Path(sys.executable)
    if engine.family in options.venvs:
        return options.venvs[engine.family]
    python = options.nox_dir / engine.venv_name / "bin" / "python"
    return python if python.exists() else None


def run_engine(
    engine: EngineId,
    options: RunOptions,
    models: Models,
    prompts: dict[str, list[int]],
    run_dir: Path,
    threading: str,
) -> dict:
    """One engine in one thread mode: prepare, cold starts (in the first mode only: threads do
    not wait before the first token), then the warm measurement."""
    entry: dict = {
        "engine": engine.name,
        "family": engine.family,
        "variant": engine.variant,
        "threading": threading,
        "default_threading": threading == default_threading(engine.family),
    }
    python = engine_python(engine, options)
    if python is None:
        return entry | {
            "status": "skipped",
            "note": f"no venv: run `nox -s {engine.venv_name}` first",
        }
    convertible = models.checkpoint or (engine.family == "llamacpp" and models.gguf)
    if engine.family != "fermi" and not convertible:
        return entry | {"status": "skipped", "note": "no local checkpoint to convert"}
    config = options.config.replace(spin=threading == "spin")
    spec = {
        "engine": {"family": engine.family, "variant": engine.variant},
        "config": config.to_dict(),
        "artifact": str(models.artifact.resolve()),
        "checkpoint": str(models.checkpoint) if models.checkpoint else None,
        "gguf": str(models.gguf) if models.gguf else None,
        "cache": str((models.cache / engine.family).resolve()),
        "prompts": prompts,
    }
    name = f"{engine.name.replace(':', '-')}-{threading}"
    worker = Worker(python, spec, run_dir, name, options.timeout_s)
    first_mode = threading == options.config.threading[0]
    try:
        log(f"{engine.name}: prepare")
        entry["prepare"] = worker.run("prepare")
        reps = options.config.cold_reps if first_mode else 0
        entry["cold"] = cold_starts(worker, reps, engine)
        log(f"{engine.name}, threads {threading}: measure")
        measured = worker.run("measure")
    except WorkerFailed as e:
        log(f"{engine.name}: failed: {e}")
        entry |= {"status": "failed", "note": str(e), **e.partial}
    else:
        entry |= {"status": "ok", **measured}
    return entry | {"summary": summaries(entry)}


def default_threading(family: str) -> str:
    """Each engine's own default: fermi's threads wait passively (FERMI_SPIN off), the peers'
    spin (OpenMP's default wait policy, onnxruntime's intra-op spinning)."""
    return "passive" if family == "fermi" else "spin"


def cold_starts(worker: Worker, reps: int, engine: EngineId) -> dict:
    """Process start to first token, the imports and the load alone, in `reps` fresh
    processes."""
    first_token, imports, load = [], [], []
    for i in range(reps):
        log(f"{engine.name}: cold start {i + 1}/{reps}")
        started = time.time()
        result = worker.run("cold")
        first_token.append(result.get("cold_start_s", result["first_token_at"] - started))
        imports.append(result["import_s"])
        load.append(result["load_s"])
    return {"cold_start_s": first_token, "import_s": imports, "load_s": load}


class WorkerFailed(Exception):
    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


@dataclass
class Worker:
    python: Path
    spec: dict
    run_dir: Path
    name: str
    timeout_s: float

    def run(self, task: str) -> dict:
        spec_path = self.run_dir / "logs" / f"{self.name}.spec.json"
        out = self.run_dir / "logs" / f"{self.name}.{task}.json"
        log_path = self.run_dir / "logs" / f"{self.name}.{task}.log"
        spec_path.write_text(json.dumps(self.spec))
        out.unlink(missing_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
        if not self.spec["config"]["spin"]:
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # llama.cpp's OpenMP workers
        command = [str(self.python), "-m", "fermi.bench.worker", task, str(spec_path), str(out)]
        with log_path.open("ab") as log_file:
            try:
                code = subprocess.run(
                    command,
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        partial = json.loads(out.read_text()) if out.is_file() else {}
        if code != 0:
            why = "timed out" if code is None else f"exit {code}"
            raise WorkerFailed(f"{task} {why}: {_tail(log_path)}", partial)
        return partial


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])[-600:]


def summaries(entry: dict) -> dict:
    """Medians/min/max of an engine's raw repetitions (the JSON keeps both)."""
    cold = entry.get("cold", {})
    return {
        "import_s": summarize(cold.get("import_s") or _single(entry, "import_s")),
        "load_s": summarize(cold.get("load_s") or _single(entry, "load_s")),
        "cold_start_s": summarize(cold.get("cold_start_s", [])),
        "ttft_s": {k: summarize(v) for k, v in entry.get("ttft_s", {}).items()},
        "decode_tok_s": summarize(entry.get("decode_tok_s", [])),
    }


def _single(entry: dict, key: str) -> list[float]:
    return [entry[key]] if key in entry else []
