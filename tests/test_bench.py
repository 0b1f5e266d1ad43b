"""`fermi bench` smoke test: the harness end to end on the tiny model, fermi engine only, one
repetition and a few tokens, in both thread modes. It checks the structure of the JSON and
markdown, never timings (peers are not part of the default test run; the native llama.cpp
engine is tested with stand-in tools in test_bench_llamacpp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fermi.artifact import load_manifest
from fermi.bench.config import BenchConfig, EngineId, parse_engines, prompt_ids
from fermi.bench.orchestrator import RunOptions, run
from fermi.bench.stats import percentile, summarize


def test_engine_selection_expands_families():
    engines = parse_engines("fermi,llamacpp:q4_0,ortgenai")
    assert [e.name for e in engines] == [
        "fermi:fp32",
        "fermi:int8",
        "fermi:int4",
        "llamacpp:q4_0",
        "ortgenai:fp32",
        "ortgenai:int4",
    ]
    with pytest.raises(ValueError, match="unknown engine"):
        parse_engines("vllm")
    with pytest.raises(ValueError, match="no variant"):
        parse_engines("llamacpp:q2_k")


def test_prompts_are_deterministic_and_exact():
    ids = prompt_ids(64, vocab=1000, seed=0)
    assert ids == prompt_ids(64, vocab=1000, seed=0) and len(ids) == 64
    assert all(0 <= i < 1000 for i in ids)


def test_summaries():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([]) is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)


def test_fermi_only_run_writes_json_and_markdown(tiny_artifact, tmp_path):
    config = BenchConfig(
        prompt_lengths=[8, 32],
        new_tokens=4,
        decode_prompt=16,
        reps=1,
        cold_reps=1,
        warmup_tokens=2,
        concurrency=[1, 2],
        server_tokens=3,
        server_prompt_words=5,
        threads=1,
        threading=["passive", "spin"],
    )
    engines = [EngineId("fermi", "fp32"), EngineId("fermi", "int4"), EngineId("ortgenai", "int4")]
    options = RunOptions(
        model=str(tiny_artifact),
        engines=engines,
        config=config,
        out=tmp_path,
        venvs={},
        bandwidth=False,
        chart=False,
        command="fermi bench --model tiny",
        nox_dir=tmp_path / "no-venvs",
    )  # peers skipped, venvs built or not
    run_dir = run(options)

    results = json.loads((run_dir / "results.json").read_text())
    assert {"machine", "model", "config", "engines", "server", "date", "command"} <= set(results)
    assert results["machine"]["logical_cores"] >= 1
    fermi, fermi_spin, int4, _, genai, _ = results["engines"]
    assert fermi["engine"] == "fermi:fp32" and fermi["status"] == "ok", fermi.get("note")
    assert (fermi["threading"], fermi["default_threading"]) == ("passive", True)
    assert (fermi_spin["threading"], fermi_spin["default_threading"]) == ("spin", False)
    assert fermi_spin["status"] == "ok" and fermi_spin["cold"]["cold_start_s"] == []
    assert set(fermi["ttft_s"]) == {"8", "32"} and len(fermi["decode_tok_s"]) == 1
    assert fermi["summary"]["decode_tok_s"]["n"] == 1
    assert len(fermi["cold"]["cold_start_s"]) == 1 and fermi["peak_rss_bytes"] > 0
    assert fermi["weight_bytes_per_token"] > 0 and fermi["versions"]["onnxruntime"]
    assert fermi["import_s"] >= 0 and "cpu_stall_share" in fermi
    assert fermi["extra"]["runtime_decode_tok_s"]
    assert genai["status"] == "skipped" and "nox -s bench_ortgenai" in genai["note"]
    # int4: the cpu target exported from the artifact's source into the run's cache
    assert int4["status"] == "ok", int4.get("note")
    int4_artifact = Path(int4["prepare"]["model_path"])
    assert (load_manifest(int4_artifact).precision, load_manifest(int4_artifact).target) == (
        "int4",
        "cpu",
    )
    assert int4["weight_bytes_per_token"] < fermi["weight_bytes_per_token"]
    levels = results["server"]["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    assert all(
        level["errors"] == 0 and level["requests"] == level["concurrency"] for level in levels
    )

    markdown = (run_dir / "results.md").read_text()
    header = "| engine | threads | import s | load s | cold start s | TTFT 8 s | TTFT 32 s |"
    assert header in markdown
    assert "| fermi:fp32 | passive (default) |" in markdown and "| fermi:fp32 | spin |" in markdown
    assert "ortgenai:int4, passive: skipped" in markdown
    assert "| streams | completion tok/s | TTFT p50 s | TTFT p95 s |" in markdown
