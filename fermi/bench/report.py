"""The run's outputs: the decode ceiling per engine, a markdown table, a PNG chart, and the
results block of docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

from fermi.bench.stats import summarize

DOCS_BEGIN = "<!-- fermi-bench:results:begin -->"
DOCS_END = "<!-- fermi-bench:results:end -->"
STALL_NOTE = (
    "CPU stall: share of the engine's measuring time in which some runnable task waited for a "
    "CPU (/proc/pressure/cpu); near 0% on a quiet machine, high when other work competed for "
    "the cores (then its timings are the least trustworthy)."
)


def derive(results: dict) -> None:
    """Figures computed from the measurements: decode ceilings, and whether the server's TTFT
    is a first-token time for this model."""
    add_ceilings(results)
    server = results.get("server")
    fermi = next((e for e in results["engines"] if e["family"] == "fermi"), {})
    first_text = fermi.get("extra", {}).get("server_prompt_first_text_tokens")
    if server:
        server["ttft_measurable"] = first_text == 1
        server["first_text_tokens"] = first_text


def add_ceilings(results: dict) -> None:
    """Per engine: the bandwidth-bound decode rate (bandwidth with one reader per core / bytes
    of weights read per token) and the measured decode median as a fraction of it."""
    bandwidth = results.get("bandwidth_gb_s", {}).get("all_processes", {}).get("median")
    for entry in results["engines"]:
        per_token = entry.get("weight_bytes_per_token")
        decode = (entry.get("summary", {}).get("decode_tok_s") or {}).get("median")
        if not bandwidth or not per_token:
            continue
        entry["ceiling_tok_s"] = bandwidth * 1e9 / per_token
        if decode:
            entry["ceiling_fraction"] = decode / entry["ceiling_tok_s"]


# -- markdown ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    """Three significant figures or so: 0.0123, 1.23, 12.3, 123."""
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1 or value == 0:
        return f"{value:.{digits}f}"
    return f"{value:.2g}"


def _cell(summary: dict | None) -> str:
    """median (min–max) of the repetitions."""
    if not summary:
        return "–"
    if summary["n"] == 1:
        return _num(summary["median"])
    return f"{_num(summary['median'])} ({_num(summary['min'])}–{_num(summary['max'])})"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _mb(value: int | None) -> str:
    return "–" if not value else f"{value / 1e6:,.0f}"


def markdown(results: dict) -> str:
    config, machine = results["config"], results["machine"]
    model = results["model"]
    lines = [
        f"**{model['name']}** ({_shape(model)}), {results['date']}  ",
        f"{machine['cpu']}, {machine['logical_cores']} cores, {machine['memory_gb']} GB; "
        f"batch 1, {config['threads']} threads per engine, {config['reps']} repetitions "
        f"(median, min–max), greedy, {config['new_tokens']} new tokens after a "
        f"{config['decode_prompt']}-token prompt, eos ignored.  ",
    ]
    bandwidth = results.get("bandwidth_gb_s")
    if bandwidth:
        lines.append(_bandwidth_line(bandwidth))
    lines += ["", *_engine_table(results), "", STALL_NOTE, ""]
    notes = [
        f"- {engine_name(e)}: {e['status']}: {e.get('note', '')}"
        for e in results["engines"]
        if e["status"] != "ok"
    ]
    if notes:
        lines += ["Not measured:", *notes, ""]
    lines += _runtime_line(results)
    if results.get("server"):
        lines += [*_server_table(results["server"]), ""]
    lines += [
        "Versions: "
        + "; ".join(
            f"{e['engine']}: " + ", ".join(f"{k} {v}" for k, v in e.get("versions", {}).items())
            for e in {e["engine"]: e for e in results["engines"] if e.get("versions")}.values()
        )
    ]
    return "\n".join(lines) + "\n"


def _bandwidth_line(bandwidth: dict) -> str:
    """The ceiling's bandwidth, and the other readers' beside it (fermi.bench.bandwidth)."""
    reader = bandwidth.get("reader", "sum")
    line = (
        f"Memory read bandwidth ({reader} reader): "
        f"{_num(bandwidth['one_process']['median'], 1)} GB/s with one process, "
        f"{_num(bandwidth['all_processes']['median'], 1)} GB/s with {bandwidth['processes']} "
        "(the decode ceiling uses the latter)"
    )
    others = [
        f"{kind} {_num(figures['all_processes']['median'], 1)} GB/s"
        for kind, figures in bandwidth.get("readers", {}).items()
        if kind != reader
    ]
    return line + (
        f"; other readers with {bandwidth['processes']}: {', '.join(others)}." if others else "."
    )


def engine_name(entry: dict) -> str:
    """`family:variant`, with the thread mode when the run measured one (`, spin`)."""
    threading = entry.get("threading")
    return f"{entry['engine']}, {threading}" if threading else entry["engine"]


def _threads(entry: dict) -> str:
    if not entry.get("threading"):
        return "–"
    return entry["threading"] + (" (default)" if entry.get("default_threading") else "")


def _shape(model: dict) -> str:
    if not model.get("parameters"):
        return "shape unknown"
    count = model["parameters"]
    size = f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"
    return (
        f"{size} parameters, {model['num_hidden_layers']} layers, "
        f"hidden {model['hidden_size']}, vocab {model['vocab_size']}"
    )


def _engine_table(results: dict) -> list[str]:
    lengths = results["config"]["prompt_lengths"]
    header = (
        ["engine", "threads", "import s", "load s", "cold start s"]
        + [f"TTFT {n} s" for n in lengths]
        + ["decode tok/s", "ceiling tok/s", "of ceiling", "weights MB/token", "peak RSS MB"]
        + ["CPU stall"]
    )
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in results["engines"]:
        if e["status"] == "skipped":
            continue
        s = e.get("summary", {})
        fraction = e.get("ceiling_fraction")
        cells = (
            [
                e["engine"] + (" (failed)" if e["status"] == "failed" else ""),
                _threads(e),
                _cell(s.get("import_s")),
                _cell(s.get("load_s")),
                _cell(s.get("cold_start_s")),
            ]
            + [_cell(s.get("ttft_s", {}).get(str(n))) for n in lengths]
            + [
                _cell(s.get("decode_tok_s")),
                _num(e.get("ceiling_tok_s"), 1),
                f"{fraction:.0%}" if fraction else "–",
                _mb(e.get("weight_bytes_per_token")),
                _mb(e.get("peak_rss_bytes")),
                _share(e.get("cpu_stall_share")),
            ]
        )
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _server_table(server: dict) -> list[str]:
    measurable = server.get("ttft_measurable", True)
    rows = [
        f"fermi OpenAI server ({server['engine']}, engine pool {server['engine_pool']}, "
        f"{server['max_tokens']} tokens per streamed request, peak RSS "
        f"{_mb(server.get('peak_rss_bytes'))} MB, CPU stall "
        f"{_share(server.get('cpu_stall_share'))}):",
        "",
        "| streams | completion tok/s | TTFT p50 s | TTFT p95 s | requests | errors |",
        "|---|---|---|---|---|---|",
    ]
    for level in server["levels"]:
        p50, p95 = (
            (_num(level["ttft_p50_s"]), _num(level["ttft_p95_s"])) if measurable else ("n/a",) * 2
        )
        rows.append(
            f"| {level['concurrency']} | {_cell(level['tokens_per_s'])} | {p50} | {p95} | "
            f"{level['requests']} | {level['errors']} |"
        )
    if not measurable:
        first = server.get("first_text_tokens")
        when = f"only with token {first}" if first else "with none of the tokens"
        rows += [
            "",
            f"TTFT n/a: on this prompt the model's text arrives {when} (greedy ids outside its "
            "tokenizer decode to nothing), so a streaming client cannot see when the first "
            "token was made.",
        ]
    return rows


def _runtime_line(results: dict) -> list[str]:
    fermi = next((e for e in results["engines"] if e["family"] == "fermi"), {})
    rates = fermi.get("extra", {}).get("runtime_decode_tok_s")
    if not rates:
        return []
    return [
        f"fermi through `Runtime.submit` (chat template, detokenizer, stop and reasoning "
        f"handling included): decode {_cell(summarize(rates))} tok/s.",
        "",
    ]


def update_docs(path: Path, table: str, command: str) -> None:
    """Replace the block between the results markers of `path` with this run's table."""
    text = path.read_text()
    block = f"{DOCS_BEGIN}\nProduced by:\n\n```\n{command}\n```\n\n{table}{DOCS_END}"
    pattern = re.compile(re.escape(DOCS_BEGIN) + ".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {DOCS_BEGIN} ... {DOCS_END} block to replace")
    path.write_text(pattern.sub(lambda _: block, text))


# -- chart ---------------------------------------------------------------------------------------


def chart(results: dict, path: Path) -> Path | None:
    """Decode tokens/s (bar, min–max whiskers, ceiling tick) and TTFT per prompt length per
    engine. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    engines = [e for e in results["engines"] if e.get("summary", {}).get("decode_tok_s")]
    if not engines:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.5 * len(engines) + 3))
    _decode_panel(left, engines)
    _ttft_panel(right, engines, results["config"]["prompt_lengths"])
    figure.suptitle(
        f"fermi bench: {results['model']['name']} on {results['machine']['cpu']} "
        f"({results['machine']['logical_cores']} cores)",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _decode_panel(axis, engines: list[dict]) -> None:
    names = [engine_name(e) for e in engines]
    stats = [e["summary"]["decode_tok_s"] for e in engines]
    medians = [s["median"] for s in stats]
    errors = [
        [m - s["min"] for m, s in zip(medians, stats, strict=True)],
        [s["max"] - m for m, s in zip(medians, stats, strict=True)],
    ]
    y = range(len(engines))
    colors = ["tab:red" if e["family"] == "fermi" else "tab:blue" for e in engines]
    axis.barh(list(y), medians, xerr=errors, color=colors, alpha=0.8, capsize=3)
    for i, e in enumerate(engines):
        if e.get("ceiling_tok_s"):
            axis.plot([e["ceiling_tok_s"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        axis.text(stats[i]["max"], i - 0.25, f" {medians[i]:.1f}", va="center", fontsize=8)
    axis.set_yticks(list(y), names)
    axis.invert_yaxis()
    axis.set_xlabel("decode tokens/s (bar: median, whiskers: min–max; black tick: ceiling)")
    axis.set_title("decode throughput, batch 1")


def _ttft_panel(axis, engines: list[dict], lengths: list[int]) -> None:
    width = 0.8 / max(1, len(lengths))
    for j, length in enumerate(lengths):
        values = [
            (e["summary"]["ttft_s"].get(str(length)) or {}).get("median") or 0 for e in engines
        ]
        axis.barh(
            [i + (j - (len(lengths) - 1) / 2) * width for i in range(len(engines))],
            values,
            height=width,
            label=f"{length}-token prompt",
        )
    axis.set_yticks(range(len(engines)), [engine_name(e) for e in engines])
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("time to first token, s (median, log scale)")
    axis.set_title("time to first token")
    axis.legend(fontsize=8)


def rerender(run_dir: Path, docs: Path | None = None) -> str:
    """Rebuild results.md, chart.png (and the docs block) of a finished run from its JSON."""
    import json

    results = json.loads((run_dir / "results.json").read_text())
    derive(results)
    table = markdown(results)
    (run_dir / "results.md").write_text(table)
    chart(results, run_dir / "chart.png")
    if docs:
        update_docs(docs, table, results["command"])
    return table


if __name__ == "__main__":  # python -m fermi.bench.report RUN_DIR [DOCS]
    import sys

    print(rerender(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
