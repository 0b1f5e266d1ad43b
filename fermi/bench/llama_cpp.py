"""llama.cpp built natively for the benchmarks: the sources vendored in the llama-cpp-python
sdist, configured with cmake (Release, `GGML_NATIVE=ON`, its default OpenMP threading) and built
once into the fermi cache (`$FERMI_CACHE`, default ~/.cache/fermi); the GGUF files it runs
(F32 and llama-quantize's types); llama-bench's command line and JSON output; llama-server's
command line.

Threading: llama.cpp's CPU backend is built with OpenMP by default, and then each graph is an
`omp parallel` region whose barriers are `#pragma omp barrier` (ggml-cpu.c, `ggml_barrier`):
between and inside steps the worker threads spin or sleep as the OpenMP runtime's wait policy
says (libgomp spins a while by default). Its own `--poll` level only drives the threadpool of a
build without OpenMP. So "spinning off" is `OMP_WAIT_POLICY=PASSIVE` plus `--poll 0` (the
latter for a non-OpenMP build); the default is neither.

Only the standard library is imported at module level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from fermi.bench.config import THREADING

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
TOOLS = ("llama-bench", "llama-server", "llama-quantize", "llama-perplexity")
# Spinning off for llama.cpp: the OpenMP wait policy (see the module docstring).
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def cache_root() -> Path:
    """The fermi cache for built tools and derived files: $FERMI_CACHE or ~/.cache/fermi."""
    return Path(os.environ.get("FERMI_CACHE", Path.home() / ".cache" / "fermi"))


def log(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command`, echoed to stderr; raises CalledProcessError on a non-zero exit."""
    print("+", " ".join(map(str, command)), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, **kwargs)


# -- the build -----------------------------------------------------------------------------------


def machine_flags(cpuinfo: str | None = None) -> list[str]:
    """cmake flags for this CPU: native SIMD (`GGML_NATIVE=ON`), CPU backend only, and no AMX
    kernels where the CPU advertises AMX (in VMs that do not grant the AMX state they crash on
    the first quantized matmul). LLAMA_CPP_CMAKE_ARGS replaces these flags."""
    if os.environ.get("LLAMA_CPP_CMAKE_ARGS"):
        return os.environ["LLAMA_CPP_CMAKE_ARGS"].split()
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    args = ["-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_BLAS=OFF"]
    if "amx_tile" in cpuinfo.split():
        args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args


def configure_command(source: Path, build: Path, flags: list[str]) -> list[str]:
    """cmake's configure step: Release, static, tools and the server, no tests or examples."""
    return ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
            *flags]  # fmt: skip


def build_command(
    build: Path, tools: tuple[str, ...] = TOOLS, jobs: int | None = None
) -> list[str]:
    jobs = jobs or os.cpu_count() or 1
    return ["cmake", "--build", str(build), f"-j{jobs}", "--target", *tools]


def build_llama_cpp(cache: Path | None = None, tools: tuple[str, ...] = TOOLS) -> Path:
    """The bin directory holding `tools`, built once (5-10 minutes on 2 cores) and rebuilt when
    the machine flags change (the flags are kept in `build/fermi-flags.json`). LLAMA_CPP_BIN
    names a directory of tools built elsewhere instead (nothing is built then)."""
    if os.environ.get("LLAMA_CPP_BIN"):
        return Path(os.environ["LLAMA_CPP_BIN"])
    root = (cache or cache_root()) / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    build = root / "build"
    bin_dir = build / "bin"
    flags = machine_flags()
    stamp = build / "fermi-flags.json"
    same_flags = stamp.is_file() and json.loads(stamp.read_text()) == flags
    if same_flags and all((bin_dir / tool).is_file() for tool in tools):
        return bin_dir
    source = llama_cpp_source(root)
    log(f"building {', '.join(tools)} natively into {build} (minutes, once)")
    run(configure_command(source, build, flags))
    run(build_command(build, tools))
    stamp.write_text(json.dumps(flags))
    return bin_dir


def llama_cpp_source(root: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (pip download, nothing installed)."""
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    root.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)])  # fmt: skip
    with tarfile.open(root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as sdist:
        sdist.extractall(root, filter="data")
    return source


def source_dir(bin_dir: Path) -> Path:
    """The llama.cpp tree a bin directory was built from."""
    return bin_dir.parents[1] / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


# -- GGUF files ----------------------------------------------------------------------------------


def f32_from_checkpoint(bin_dir: Path, checkpoint: Path, target: Path) -> Path:
    """An F32 GGUF of an HF checkpoint, made once: fermi's writer for the architecture it maps
    (fermi.bench.gguf_export: it takes any byte-level BPE tokenizer, where llama.cpp's
    convert_hf_to_gguf.py refuses tokenizers it does not know by hash, as a random-weight
    checkpoint's), llama.cpp's own converter for any other."""
    if target.is_file():
        return target
    from fermi.bench import gguf_export

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") == gguf_export.ARCH:
        gguf_export.write_gguf(checkpoint, tmp)
    else:
        run([sys.executable, str(source_dir(bin_dir) / "convert_hf_to_gguf.py"), str(checkpoint),
             "--outtype", "f32", "--outfile", str(tmp)])  # fmt: skip
    tmp.rename(target)
    return target


def f32_from_gguf(source: Path, target: Path) -> Path:
    """A GGUF with every tensor dequantized to F32 (gguf.quants), its metadata kept; made once.
    Both engines then start from the same weights."""
    if not target.is_file():
        from export.bench_quality import f32_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        f32_gguf(source, tmp)
        tmp.rename(target)
    return target


def quantized(bin_dir: Path, f32: Path, kind: str, threads: int) -> Path:
    """`f32` quantized to `kind` (Q8_0, Q4_0, Q4_K_M ...: llama.cpp's own mix per type) by
    llama-quantize, next to it, made once; its log beside it."""
    if kind.upper() == "F32":
        return f32
    target = f32.with_name(f"model-{kind.upper()}.gguf")
    if not target.is_file():
        tmp = target.with_suffix(".tmp")
        done = run([str(bin_dir / "llama-quantize"), str(f32), str(tmp), kind.upper(),
                    str(threads)], capture_output=True, text=True)  # fmt: skip
        target.with_suffix(".log").write_text(done.stdout + done.stderr)
        tmp.rename(target)
    return target


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode step reads: every tensor of the GGUF, less the token embedding
    when a separate output matrix exists (a step then reads one embedding row)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


# -- llama-bench ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: `prompt` tokens prefilled (pp) or `gen` tokens decoded one at a
    time (tg) after `depth` tokens of context."""

    prompt: int = 0
    gen: int = 0
    depth: int = 0


def threading_env(threading: str) -> dict[str, str]:
    """Environment for llama.cpp's threads: nothing for its default (spin), else passive."""
    if threading not in THREADING:
        raise ValueError(f"threading must be one of {', '.join(THREADING)}, not {threading!r}")
    return {} if threading == "spin" else dict(PASSIVE_ENV)


def bench_command(
    bin_dir: Path,
    model: Path,
    test: BenchTest,
    threads: int,
    threading: str,
    reps: int,
    warmup: bool = True,
) -> list[str]:
    """llama-bench for one test, JSON on stdout. Spinning off adds `--poll 0` (its threadpool
    without OpenMP); the OpenMP wait policy comes from `threading_env`."""
    threading_env(threading)  # validates
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(test.prompt),
               "-n", str(test.gen), "-d", str(test.depth), "-t", str(threads),
               "-r", str(reps), "-o", "json"]  # fmt: skip
    if threading == "passive":
        command += ["--poll", "0"]
    if not warmup:
        command.append("--no-warmup")
    return command


def parse_bench(stdout: str) -> list[dict]:
    """llama-bench's `-o json` output -> one dict per test: prompt, gen, depth, seconds (each
    repetition's time, s), tokens_per_s (each repetition's rate), and the build it reports.
    Raises ValueError when the output holds no test."""
    try:
        tests = json.loads(stdout[stdout.index("[") :])
    except ValueError as e:
        raise ValueError(f"llama-bench printed no JSON test list: {stdout[-300:]!r}") from e
    if not tests:
        raise ValueError("llama-bench reported no test")
    return [
        {
            "prompt": t["n_prompt"],
            "gen": t["n_gen"],
            "depth": t.get("n_depth", 0),
            "seconds": [ns / 1e9 for ns in t["samples_ns"]],
            "tokens_per_s": list(t["samples_ts"]),
            "build": f"{t.get('build_number', '?')} ({t.get('build_commit', '?')})",
            "cpu": t.get("cpu_info", ""),
            "model_type": t.get("model_type", ""),
        }
        for t in tests
    ]


def bench(
    bin_dir: Path, model: Path, test: BenchTest, threads: int, threading: str, reps: int
) -> dict:
    """Run one llama-bench test; its parsed result (see `parse_bench`)."""
    command = bench_command(bin_dir, model, test, threads, threading, reps)
    done = run(
        command, capture_output=True, text=True, env={**os.environ, **threading_env(threading)}
    )
    return parse_bench(done.stdout)[0]


# -- llama-server --------------------------------------------------------------------------------


def server_command(
    bin_dir: Path,
    model: Path,
    port: int,
    parallel: int,
    context_per_slot: int,
    threads: int,
    threading: str = "spin",
) -> list[str]:
    """llama-server on 127.0.0.1 with `parallel` slots (continuous batching; `-c` is the total
    context, split between the slots), its chat template, no web UI."""
    threading_env(threading)
    command = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(parallel), "-c", str(parallel * context_per_slot),
               "-t", str(threads), "-tb", str(threads), "--jinja", "--no-webui"]  # fmt: skip
    if threading == "passive":
        command += ["--poll", "0"]
    return command
