"""`fermi` command line: thin adapters over export and the runtime. Heavy imports stay inside
the commands so that `fermi --help` is instant and serving never imports torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fermi.errors import FermiError, InvalidRequest

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Export Qwen3 models to ONNX and serve them with onnxruntime.",
)
serve_app = typer.Typer(no_args_is_help=True, help="Run a server on the shared runtime.")
app.add_typer(serve_app, name="serve")


def fail(message: str, code: int = 2) -> typer.Exit:
    """One line on stderr, no traceback, exit code 2 (bad input or missing model)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="HF hub id, local checkpoint dir, or tiny-qwen3")],
    precision: Annotated[
        str | None,
        typer.Option(help="fp32, fp16, int8 or int4 [default: fp32 on CPU, fp16 on CUDA/CoreML]"),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="artifact dir")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if a valid artifact exists")] = False,
    target: Annotated[
        str,
        typer.Option(
            help="graph variant: auto (this device [env FERMI_DEVICE]), cpu, cuda, "
            "coreml or portable"
        ),
    ] = "auto",
    block_size: Annotated[int, typer.Option(help="int4/int8 quantization block")] = 32,
    head: Annotated[
        str,
        typer.Option(
            help="int4/int8: precision of lm_head and a tied embedding: int8, int4 or fp32"
        ),
    ] = "int8",
    int4: Annotated[
        str,
        typer.Option(
            help="int4 weights: mix (zero points, searched scales, sensitive matmuls at int8), "
            "asym (no int8), plain (symmetric, llama.cpp's Q4_0 rule)"
        ),
    ] = "mix",
) -> None:
    """Export a Qwen3/Qwen2 checkpoint to an ONNX artifact with KV-cache inputs. The defaults
    make the artifact that `fermi chat/serve --model MODEL` would load on this machine."""
    from export.exporter import export_model
    from export.variants import GraphOptions
    from fermi.engine import PRECISION, pick_device
    from fermi.settings import load_settings

    try:
        settings = load_settings()
        if target == "auto":
            target = pick_device(settings.device)
        if precision is None:  # the precision of the device that will run it
            precision = PRECISION.get(target) or PRECISION[pick_device(settings.device)]
        path = export_model(
            model,
            precision=precision,
            output=output,
            revision=revision,
            force=force,
            settings=settings,
            target=target,
            options=GraphOptions(block_size=block_size, head=head, int4=int4),
        )
    except FermiError as e:
        raise fail(str(e)) from None
    typer.echo(str(path))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


ModelOpt = Annotated[
    str | None,
    typer.Option(help="artifact dir, HF checkpoint dir, hub id or tiny-qwen3 [env FERMI_MODEL]"),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto|cpu|cuda|coreml [env FERMI_DEVICE]")]
HostOpt = Annotated[str | None, typer.Option(help="bind address")]
PortOpt = Annotated[int | None, typer.Option(help="port")]


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="artifact dir, checkpoint dir or tiny-qwen3")],
    checkpoint: Annotated[Path | None, typer.Option(help="peers' input [default: source]")] = None,
    engines: Annotated[str, typer.Option(help="fermi,transformers,llamacpp[:q4_0],ortgenai")] = (
        "fermi,transformers,llamacpp,ortgenai"
    ),
    quick: Annotated[bool, typer.Option(help="short prompts, 64 tokens, 2 reps")] = False,
    reps: Annotated[int | None, typer.Option(min=1)] = None,
    cold_reps: Annotated[int | None, typer.Option(min=0)] = None,
    prompt_lengths: Annotated[str | None, typer.Option(help="e.g. 128,1024,4096")] = None,
    new_tokens: Annotated[int | None, typer.Option(min=2)] = None,
    concurrency: Annotated[str | None, typer.Option(help="server streams, e.g. 1,4,16")] = None,
    server_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="per engine [default: cores]")] = None,
    spin: Annotated[
        bool, typer.Option(help="let every engine's threads spin (idle machine only)")
    ] = False,
    server: Annotated[bool, typer.Option(help="measure the OpenAI server")] = True,
    bandwidth: Annotated[bool, typer.Option(help="measure the decode ceiling")] = True,
    chart: Annotated[bool, typer.Option(help="write chart.png")] = True,
    venv: Annotated[list[str] | None, typer.Option(help="FAMILY=PYTHON for a peer")] = None,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench-results"),
    timeout: Annotated[float, typer.Option(help="seconds per engine subprocess")] = 3600.0,
    docs: Annotated[Path | None, typer.Option(help="update this file's results block")] = None,
) -> None:
    """Benchmark fermi beside peer engines (each in its nox venv) on the same checkpoint."""
    arguments = dict(locals())
    from fermi.bench.cli import bench_command

    try:
        run_dir = bench_command(**arguments)
    except (FermiError, ValueError) as e:
        raise fail(str(e)) from None
    typer.echo(str(run_dir))


@app.command("eval")
def eval_command(
    artifact: Annotated[Path, typer.Argument(help="artifact dir to score")],
    text: Annotated[Path, typer.Option(help="UTF-8 text file (e.g. a licence text)")],
    reference: Annotated[
        Path | None, typer.Option(help="fp32 artifact of the same model: adds KL-divergence")
    ] = None,
    ctx: Annotated[int, typer.Option(help="tokens per chunk (llama-perplexity -c)")] = 512,
    chunks: Annotated[int | None, typer.Option(min=1, help="score only the first N")] = None,
    threads: Annotated[int, typer.Option(min=0, help="0 = onnxruntime's default")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Perplexity (and KL-divergence against a reference) with llama-perplexity's protocol:
    chunks of --ctx tokens, the second half of each scored."""
    import json

    from fermi.eval import evaluate, format_rows

    try:
        result = evaluate(artifact, text, reference, n_ctx=ctx, max_chunks=chunks, threads=threads)
    except FermiError as e:
        raise fail(str(e)) from None
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for label, value in format_rows(result):
        table.add_row(label, value)
    Console().print(table)


@app.command()
def chat(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    repeat_penalty: Annotated[float, typer.Option(help="1.0 = off")] = 1.0,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    thinking: Annotated[str | None, typer.Option(help="on|off|auto")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """Chat in the terminal (or answer one prompt per stdin line when piped)."""
    from fermi import chat as chat_module
    from fermi.chat_template import parse_thinking
    from fermi.requests import SamplingParams
    from fermi.runtime import Runtime
    from fermi.settings import load_settings

    try:
        settings = load_settings().replace(model=model, device=device)
        options = chat_module.ChatOptions(
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repeat_penalty,
                seed=seed,
            ),
            thinking=parse_thinking(thinking) if thinking is not None else None,
            system=system,
        )
        typer.echo(f"loading {settings.model} ...", err=True)
        runtime = Runtime.load(settings)
        typer.echo(
            f"ready: {runtime.model_id} on {runtime.engine.device} "
            f"(load {runtime.engine.load_seconds:.1f} s)",
            err=True,
        )
        raise typer.Exit(chat_module.main(runtime, options))
    except FermiError as e:
        raise fail(str(e)) from None


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise InvalidRequest(f"address {addr!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


def _serve(kind: str, model: str | None, device: str | None, host: str | None, port: int | None):
    from importlib import import_module

    from fermi.settings import load_settings

    try:
        settings = load_settings().replace(model=model, device=device)
        default_host, default_port = _split_addr(getattr(settings, f"{kind}_addr"))
        server = import_module(f"fermi.{kind}_server.server")
        server.run(settings, host or default_host, port or default_port)
    except FermiError as e:
        raise fail(str(e)) from None


@serve_app.command("openai")
def serve_openai(
    model: ModelOpt = None, device: DeviceOpt = None, host: HostOpt = None, port: PortOpt = None
) -> None:
    """OpenAI-compatible HTTP server (default 0.0.0.0:8000, FERMI_OPENAI_ADDR)."""
    _serve("openai", model, device, host, port)


@serve_app.command("grpc")
def serve_grpc(
    model: ModelOpt = None, device: DeviceOpt = None, host: HostOpt = None, port: PortOpt = None
) -> None:
    """Token-streaming gRPC server (default 0.0.0.0:50051, FERMI_GRPC_ADDR)."""
    _serve("grpc", model, device, host, port)


if __name__ == "__main__":
    main()
