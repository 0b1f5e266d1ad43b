"""fermi.bench.step_cost: the decode step split by onnxruntime's profiler."""

from __future__ import annotations

import json

import pytest

from fermi.artifact import load_manifest
from fermi.bench import step_cost


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory):
    """tiny-qwen3 in the cpu graph (fused ops, MatMulNBits): what fermi runs on a CPU."""
    from export.exporter import export_model

    out = tmp_path_factory.mktemp("step") / "tiny-int4"
    return export_model("tiny-qwen3", "int4", out, target="cpu")


def kernel(name: str, op: str, ts: int, dur: int, pool: bool) -> dict:
    stats = {"main_thread": {"block_size": [1] if pool else []}}
    return {
        "cat": "Node",
        "name": f"{name}_kernel_time",
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op, "thread_scheduling_stats": stats},
    }


def test_profile_summary_counts_kernels_time_and_dispatches_of_the_last_runs():
    events = [
        {"name": "model_run", "ts": 0, "dur": 1000},  # the prefill: left out
        kernel("prefill_matmul", "MatMulNBits", 10, 900, True),
        {"name": "model_run", "ts": 2000, "dur": 500},
        kernel("l0/MatMulNBits", "MatMulNBits", 2010, 300, True),
        kernel("l0/Reshape", "Reshape", 2320, 20, False),
        {"name": "model_run", "ts": 3000, "dur": 700},
        kernel("l0/MatMulNBits", "MatMulNBits", 3010, 500, True),
        kernel("l0/Reshape", "Reshape", 3520, 40, False),
    ]
    summary = step_cost.summarize_profile(events, runs=2)
    assert summary["kernels"] == 2
    assert summary["dispatches"] == 1
    assert summary["profiled_step_ms"] == (500 + 700) / 2 / 1e3
    assert summary["kernel_ms"] == (300 + 20 + 500 + 40) / 2 / 1e3
    assert summary["executor_ms"] == (500 + 700 - 860) / 2 / 1e3
    assert list(summary["by_op"]) == ["MatMulNBits", "Reshape"]  # slowest first
    assert summary["by_op"]["MatMulNBits"] == {"count": 1, "ms": 0.4, "dispatches": 1}
    assert summary["top_nodes"][0] == ("l0/MatMulNBits", 0.4)


def test_measure_splits_a_real_decode_step(cpu_artifact):
    cost = step_cost.measure(cpu_artifact, threads=2, prompt_tokens=8, steps=4)
    layers = load_manifest(cpu_artifact).num_layers
    assert cost.by_op["MatMulNBits"]["count"] > 0
    assert cost.by_op["GroupQueryAttention"]["count"] == layers  # one per layer, every step
    assert sum(s["count"] for s in cost.by_op.values()) == cost.kernels
    assert abs(sum(s["ms"] for s in cost.by_op.values()) - cost.kernel_ms) < 1e-6
    assert 0 < cost.dispatches <= cost.kernels
    assert cost.profiled_step_ms >= cost.kernel_ms > 0
    assert cost.step_ms > 0 and cost.cpu_ms > 0
    assert "GroupQueryAttention" in step_cost.render(cost)


def test_cli_writes_json_and_applies_config(cpu_artifact, tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = [str(cpu_artifact), "--steps", "2", "--prompt", "4", "--threads", "1"]
    argv += ["--config", "session.intra_op.spin_duration_us=100", "--json", str(out)]
    assert step_cost.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 1
    assert result["config"] == {"session.intra_op.spin_duration_us": "100"}
    assert result["kernels"] > 0
    assert "kernels per step" in capsys.readouterr().out


def test_cli_rejects_bad_input_with_exit_2(tiny_artifact, tmp_path, capsys):
    assert step_cost.main([str(tmp_path / "missing")]) == 2
    assert "not a fermi artifact" in capsys.readouterr().err
    assert step_cost.main([str(tiny_artifact), "--config", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert step_cost.main([str(tiny_artifact), "--steps", "0"]) == 2
