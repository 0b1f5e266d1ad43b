"""The native llama.cpp side of the benchmarks (fermi.bench.llama_cpp, the `fermi bench` engine,
the serving benchmark) and the bandwidth readers. Nothing here builds llama.cpp or asserts a
timing: the tools are stand-in scripts that print what the real ones print (LLAMA_CPP_BIN)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from fermi.bench import bandwidth, llama_cpp, serving
from fermi.bench.config import BenchConfig

# llama-bench -o json for one tg test, as build 0.3.36's vendored tree prints it (trimmed).
BENCH_JSON = """[
  {
    "build_commit": "4227c9b",
    "build_number": 1,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "model_filename": "model-Q4_0.gguf",
    "model_type": "llama ?B Q4_0",
    "n_threads": 2,
    "poll": 0,
    "type_k": "f16",
    "n_prompt": 0,
    "n_gen": 64,
    "n_depth": 128,
    "avg_ns": 640000000,
    "avg_ts": 100.0,
    "samples_ns": [ 600000000, 680000000 ],
    "samples_ts": [ 106.7, 94.1 ]
  }
]
"""

FAKE_BENCH = """#!{python}
import json, os, sys
args = sys.argv[1:]
value = lambda flag: int(args[args.index(flag) + 1])
prompt, gen, depth, reps = value("-p"), value("-n"), value("-d"), value("-r")
with open({log!r}, "a") as log:
    omp = os.environ.get("OMP_WAIT_POLICY")
    log.write(json.dumps({{"args": args, "omp": omp}}) + "\\n")
samples = [0.01 * (prompt + gen) + i * 0.001 for i in range(reps)]
print(json.dumps([{{"build_commit": "fake", "build_number": 0, "cpu_info": "cpu",
    "model_type": "fake", "n_prompt": prompt, "n_gen": gen, "n_depth": depth,
    "samples_ns": [int(s * 1e9) for s in samples],
    "samples_ts": [(prompt + gen) / s for s in samples]}}]))
"""

FAKE_QUANTIZE = """#!{python}
import shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
print("quant size = 1.00 MiB (4.50 BPW)")
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """A bin directory whose llama-bench and llama-quantize are stand-ins; their calls are
    logged to calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    _script(bin_dir / "llama-bench", FAKE_BENCH.format(python=sys.executable, log=str(calls)))
    _script(bin_dir / "llama-quantize", FAKE_QUANTIZE.format(python=sys.executable))
    monkeypatch.setenv("LLAMA_CPP_BIN", str(bin_dir))
    return bin_dir, calls


# -- the build -----------------------------------------------------------------------------------


def test_build_is_native_release_with_server_and_bench(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_CMAKE_ARGS", raising=False)
    flags = llama_cpp.machine_flags(cpuinfo="flags : fpu avx2 avx512f")
    assert "-DGGML_NATIVE=ON" in flags and not any("AMX" in f for f in flags)
    assert any("GGML_AMX_TILE=OFF" in f for f in llama_cpp.machine_flags("flags : amx_tile avx2"))
    configure = llama_cpp.configure_command(tmp_path / "src", tmp_path / "build", flags)
    assert configure[:5] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "build")]
    assert "-DCMAKE_BUILD_TYPE=Release" in configure and "-DLLAMA_BUILD_SERVER=ON" in configure
    assert not any("OPENMP" in arg for arg in configure)  # its default threading: OpenMP
    build = llama_cpp.build_command(tmp_path / "build", jobs=2)
    assert build[:4] == ["cmake", "--build", str(tmp_path / "build"), "-j2"]
    assert {"llama-server", "llama-bench", "llama-quantize"} <= set(build[5:])
    monkeypatch.setenv("LLAMA_CPP_CMAKE_ARGS", "-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    assert llama_cpp.machine_flags() == ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"]


def test_prebuilt_tools_are_used_without_building(fake_tools):
    bin_dir, _ = fake_tools
    assert llama_cpp.build_llama_cpp() == bin_dir


def test_bench_command_line_per_threading_mode(tmp_path):
    test = llama_cpp.BenchTest(gen=64, depth=128)
    spin = llama_cpp.bench_command(tmp_path, tmp_path / "m.gguf", test, 2, "spin", 3)
    assert spin[0] == str(tmp_path / "llama-bench")
    assert spin[spin.index("-n") + 1] == "64" and spin[spin.index("-d") + 1] == "128"
    assert spin[spin.index("-t") + 1] == "2" and spin[spin.index("-r") + 1] == "3"
    assert spin[spin.index("-o") + 1] == "json" and "--poll" not in spin
    passive = llama_cpp.bench_command(tmp_path, tmp_path / "m.gguf", test, 2, "passive", 3, False)
    assert passive[passive.index("--poll") + 1] == "0" and "--no-warmup" in passive
    assert llama_cpp.threading_env("spin") == {}
    assert llama_cpp.threading_env("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="threading"):
        llama_cpp.threading_env("busy")


def test_parse_bench_output():
    (result,) = llama_cpp.parse_bench("build: 1 (4227c9b)\n" + BENCH_JSON)
    assert (result["prompt"], result["gen"], result["depth"]) == (0, 64, 128)
    assert result["seconds"] == [0.6, 0.68] and result["tokens_per_s"] == [106.7, 94.1]
    assert result["build"] == "1 (4227c9b)" and result["model_type"] == "llama ?B Q4_0"
    with pytest.raises(ValueError, match="no JSON"):
        llama_cpp.parse_bench("error: failed to load model")
    with pytest.raises(ValueError, match="no test"):
        llama_cpp.parse_bench("[]")


def test_qwen3_checkpoint_becomes_an_f32_gguf_without_llama_cpps_converter(tmp_path):
    import gguf

    from export import tiny
    from fermi.settings import load_settings

    checkpoint = Path(tiny.checkpoint_path(load_settings()))
    target = tmp_path / "model-F32.gguf"
    # the bin directory has no converter next to it: fermi's own writer must be the one used
    assert llama_cpp.f32_from_checkpoint(tmp_path / "bin", checkpoint, target) == target
    reader = gguf.GGUFReader(str(target))
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert {t.tensor_type for t in reader.tensors} <= {gguf.GGMLQuantizationType.F32}
    assert llama_cpp.gguf_bytes_per_token(target) > 0
    assert not target.with_suffix(".tmp").exists()


def test_server_command(tmp_path):
    command = llama_cpp.server_command(tmp_path, tmp_path / "m.gguf", 8080, 4, 512, 2)
    assert command[0] == str(tmp_path / "llama-server")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("-np") + 1] == "4" and command[command.index("-c") + 1] == "2048"
    assert "--poll" not in command
    passive = llama_cpp.server_command(tmp_path, tmp_path / "m.gguf", 8080, 1, 512, 2, "passive")
    assert passive[passive.index("--poll") + 1] == "0"


# -- the `fermi bench` engine --------------------------------------------------------------------


def _spec(tmp_path: Path, spin: bool) -> dict:
    config = BenchConfig(prompt_lengths=[8, 32], new_tokens=4, decode_prompt=16, reps=2, spin=spin)
    return {
        "engine": {"family": "llamacpp", "variant": "q4_0"},
        "config": config.to_dict(),
        "cache": str(tmp_path / "cache"),
        "checkpoint": None,
        "gguf": str(tmp_path / "source.gguf"),
    }


def test_engine_measures_with_llama_bench(fake_tools, tmp_path):
    from fermi.bench.engines import llamacpp

    _, calls = fake_tools
    spec = _spec(tmp_path, spin=False)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "model-F32.gguf").write_bytes(b"GGUF f32")  # made once, kept
    prepared = llamacpp.prepare(spec)
    assert Path(prepared["model_path"]).name == "model-Q4_0.gguf" and prepared["model_bytes"] > 0

    model = llamacpp.load(spec)
    assert model.label == "llama.cpp Q4_0 (native)"
    result = model.measure()
    assert set(result["ttft_s"]) == {"8", "32"} and len(result["ttft_s"]["32"]) == 2
    assert len(result["decode_tok_s"]) == 2 and result["build"] == "0 (fake)"
    cold = model.cold()
    assert cold["cold_start_s"] >= cold["load_s"] and cold["import_s"] == 0.0

    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert all(call["omp"] == "PASSIVE" and "--poll" in call["args"] for call in logged)
    tests = [(c["args"][c["args"].index("-p") + 1], c["args"][c["args"].index("-d") + 1])
             for c in logged]  # fmt: skip
    assert tests == [("8", "0"), ("32", "0"), ("0", "16"), ("16", "0")]  # pp, pp, tg at 16, cold


def test_engine_spinning_is_llama_cpps_default(fake_tools, tmp_path, monkeypatch):
    from fermi.bench.engines import llamacpp

    _, calls = fake_tools
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    spec = _spec(tmp_path, spin=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "model-Q4_0.gguf").write_bytes(b"GGUF q4_0")
    llamacpp.load(spec).measure()
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert all(call["omp"] is None and "--poll" not in call["args"] for call in logged)


def test_bench_threading_modes_are_validated():
    assert BenchConfig().threading == ["spin", "passive"]
    with pytest.raises(ValueError, match="threading"):
        BenchConfig(threading=["busy"])


# -- bandwidth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", bandwidth.READERS)
def test_readers_read_every_byte(kind):
    data, one_pass = bandwidth.make_reader(kind, 1 << 20)
    assert data.nbytes == 1 << 20
    one_pass()
    with pytest.raises(ValueError, match="unknown reader"):
        bandwidth.make_reader("memcpy", 1 << 20)


def test_bandwidth_measure_reports_every_reader():
    result = bandwidth.measure(processes=2, repeats=1, seconds=0.05, nbytes=4 << 20)
    assert set(result["readers"]) == set(bandwidth.READERS) == {"matvec", "sum"}
    best = result["readers"][result["reader"]]["all_processes"]
    assert result["all_processes"] == best  # the ceiling takes the fastest reader
    assert all(
        best["median"] >= figures["all_processes"]["median"]
        for figures in result["readers"].values()
    )
    assert all(
        figures[key]["median"] > 0 for figures in result["readers"].values()
        for key in ("one_process", "all_processes")
    )  # fmt: skip
    assert "OPENBLAS_NUM_THREADS" not in os.environ or os.environ["OPENBLAS_NUM_THREADS"] != "1"


# -- the serving benchmark -----------------------------------------------------------------------


def test_serving_pairs_and_request():
    pairs = serving.parse_pairs("fp32:f32, int4:Q4_0")
    assert pairs == [serving.Pair("fp32", "F32"), serving.Pair("int4", "Q4_0")]
    with pytest.raises(ValueError, match="PRECISION:GGUF_TYPE"):
        serving.parse_pairs("int4")
    body = serving.request_body("hi", 64)
    assert body["max_tokens"] == 64 and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True}


def test_serving_table_and_docs_block(tmp_path):
    def row(engine, level, rate):
        return {"pair": "fermi int4 / llama.cpp Q4_0", "engine": engine, "concurrency": level,
                "completion_tokens_per_s": rate, "ttft_p50_ms": 20.0, "ttft_p95_ms": 40.0,
                "errors": 0, "cpu_stall_share": 0.25}  # fmt: skip

    results = {
        "model": "smollm2-135m",
        "date": "2026-11-30T05:00:00+00:00",
        "machine": {"cpu": "Xeon", "logical_cores": 2, "memory_gb": 23.5},
        "threads": 2,
        "max_tokens": 64,
        "requests_per_client": 2,
        "rows": [row("fermi", 1, 100.0), row("llama.cpp", 1, 125.0), row("fermi", 4, 90.0)],
    }
    table = serving.markdown(results)
    assert "| streams | fermi int4: tok/s | TTFT p50 / p95 ms | CPU stall | llama.cpp Q4_0" in table
    assert "| 1 | 100.0 | 20 / 40 | 25% | 125.0 | 20 / 40 | 25% | 0.80 |" in table
    assert "| 4 | 90.0 | 20 / 40 | 25% | – | – | – | – |" in table
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"before\n{serving.DOCS_BEGIN}\nold\n{serving.DOCS_END}\nafter\n")
    serving.update_docs(docs, table, "python -m fermi.bench.serving")
    text = docs.read_text()
    assert "old" not in text and "| 1 | 100.0 |" in text and text.endswith("after\n")
    (tmp_path / "empty.md").write_text("nothing")
    with pytest.raises(ValueError, match="no <!-- fermi-bench:serving:begin -->"):
        serving.update_docs(tmp_path / "empty.md", table, "x")


def test_serving_arguments_are_checked(capsys):
    args = serving.parse_args(["--concurrency", "1,4,8,16", "--pairs", "int4:Q4_0"])
    assert args.concurrency == [1, 4, 8, 16] and args.max_tokens == 64
    for bad in (["--pairs", "int4"], ["--concurrency", "0"], ["--concurrency", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            serving.parse_args(bad)
        assert exit_info.value.code == 2


# -- the fast-graph benchmark (export/bench_variants.py) -----------------------------------------


def test_fast_graph_benchmark_runs_llama_cpp_natively(fake_tools, tmp_path):
    from export import bench_variants

    _, calls = fake_tools
    gguf = tmp_path / "model-Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    decode = bench_variants.measure("llama-q4_0", str(gguf), "decode", 2, spin=True)
    assert decode["step_s"] > 0 and decode["peak_rss_gb"] > 0
    ttft = bench_variants.measure("llama-q4_0", str(gguf), "ttft", 2, spin=False)
    assert ttft["first_token_s"] > 0 and ttft["step_s"] is None
    cold = bench_variants.measure("llama-q4_0", str(gguf), "cold", 2, spin=False)
    assert cold["cold_s"] >= cold["load_s"]
    rss = bench_variants.measure("llama-q4_0", str(gguf), "rss", 2, spin=False)
    assert rss["step_s"] > 0
    logged = [json.loads(line)["args"] for line in calls.read_text().splitlines()]
    tests = [(a[a.index("-p") + 1], a[a.index("-n") + 1], a[a.index("-d") + 1]) for a in logged]
    assert tests == [("0", "32", "128"), ("1024", "0", "0"), ("16", "0", "0"), ("0", "16", "4096")]
    assert "--no-warmup" in logged[2] and "--poll" not in logged[0] and "--poll" in logged[1]


def test_fast_graph_report_has_a_row_per_thread_mode():
    from export import bench_variants

    def run(engine, threading, step):
        return {"engine": engine, "threading": threading, "scenario": "decode", "round": 0,
                "step_s": step}  # fmt: skip

    results = {
        "bandwidth_gb_s": [40.0],
        "runs": [run("fermi-int4", "spin", 0.030), run("fermi-int4", "passive", 0.032),
                 run("llama-q4_0", "spin", 0.016), run("llama-q4_0", "passive", 0.030)],
    }  # fmt: skip
    table = bench_variants.report(results, {"fermi-int4": 400_000_000, "llama-q4_0": 400_000_000})
    assert "| engine | threads | decode tok/s (prompt 128) |" in table
    assert "| fermi-int4 | passive (default) | 31.25 | 31% (100.0) |" in table
    assert "| llama-q4_0 | spin (default) | 62.50 | 62% (100.0) |" in table
    assert "| fermi-int4 | spin | 33.33 |" in table


def test_llama_cpp_starts_from_a_built_in_models_gguf(smollm2_gguf):
    from fermi.bench.orchestrator import gguf_source

    assert gguf_source("smollm2-135m") == smollm2_gguf
    assert gguf_source("tiny-qwen3") is None  # a checkpoint directory: converted instead
