"""`fermi` command line: thin adapters over export and the runtime. Heavy imports stay inside
the commands so that `fermi --help` is instant and serving never imports torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fermi import __version__
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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fermi {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = None,
) -> None:
    """Export Qwen3 models to ONNX and serve them with onnxruntime."""


@app.command()
def export(
    model: Annotated[
        str,
        typer.Argument(
            help="HF hub id, local checkpoint dir, .gguf file, or a built-in model "
            "(smollm2-135m, tiny-qwen3)"
        ),
    ],
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32, fp16, int8 or int4",
            show_default="fp32 on CPU, fp16 on CUDA/CoreML; a quantized GGUF: int4/int8 with "
            "its blocks carried over",
        ),
    ] = None,
    gguf_file: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="the GGUF file to export from a hub repo (or directory)"),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="artifact dir")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if a valid artifact exists")] = False,
    target: Annotated[
        str,
        typer.Option(
            help="graph variant: auto (this machine's device, as FERMI_DEVICE picks it), cpu, "
            "cuda, coreml or portable"
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
            help="int4 weights: gptq (mix, rounded with AWQ scales and GPTQ on a calibration "
            "text), mix (zero points, searched scales, sensitive matmuls at int8), "
            "asym (no int8), plain (symmetric, llama.cpp's Q4_0 rule)"
        ),
    ] = "mix",
) -> None:
    """Export a Qwen3/Qwen2/Llama checkpoint or GGUF file to an ONNX artifact with KV-cache
    inputs.

    With no options: the artifact `fermi chat/serve --model MODEL` loads on this machine."""
    from export.exporter import export_model
    from export.variants import GraphOptions
    from fermi.engine import pick_device
    from fermi.settings import load_settings

    try:
        settings = load_settings()
        if target == "auto":
            target = pick_device(settings.device)
        path = export_model(
            model,
            precision=precision,
            output=output,
            revision=revision,
            force=force,
            settings=settings,
            target=target,
            options=GraphOptions(block_size=block_size, head=head, int4=int4),
            gguf_file=gguf_file,
        )
    except FermiError as e:
        raise fail(str(e)) from None
    _say_where_the_gguf_is(model)
    typer.echo(str(path))


def _say_where_the_gguf_is(model: str) -> None:
    """On a terminal, a built-in model fetched from the package index names the GGUF file kept
    in the Hugging Face cache (stderr; stdout stays the artifact path alone, for scripts)."""
    from export.builtin import REGISTRY

    cached_file = getattr(REGISTRY.get(model), "cached_file", None)
    if cached_file is not None and sys.stderr.isatty() and (gguf := cached_file()):
        typer.echo(f"source GGUF kept in the Hugging Face cache: {gguf}", err=True)


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="artifact directory (with fermi.json)")],
) -> None:
    """Check an artifact against its manifest: every file's sha256 and size, and the graph's
    inputs and outputs. Exit 0 when it is intact, 2 with a one-line reason otherwise."""
    from fermi.verify import verify_artifact

    try:
        manifest, done = verify_artifact(artifact)
    except FermiError as e:
        raise fail(str(e)) from None
    typer.echo(
        f"ok: {artifact} ({manifest.source}, {manifest.precision}, {manifest.target}): "
        f"{done.files} files, {done.bytes_hashed / 1e6:.1f} MB hashed in {done.seconds:.1f}s"
    )


def main() -> None:
    """Run the CLI; a usage error (unknown flag, bad value) is one line on stderr, exit 2."""
    try:  # typer 0.2x vendors click: its exceptions are reachable only from there
        from typer._click import exceptions as click
    except ImportError:  # older typer runs on click itself
        from click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # the help is already printed
        sys.exit(e.exit_code)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "fermi"
        typer.echo(f"error: {e.format_message()} (try '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


# Options that feed a setting: each reads its FERMI_* variable too (flag > env > fermi.toml).
# Names follow llama-server and vLLM; where they differ, both spellings are accepted.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", envvar="FERMI_MODEL", show_default="Qwen/Qwen3-1.7B", metavar="MODEL",
        help="artifact dir, HF checkpoint dir, .gguf file, hub id, smollm2-135m or tiny-qwen3",
    ),
]  # fmt: skip
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FERMI_DEVICE",
        show_default="auto",
        metavar="DEVICE",
        help="auto, cpu, cuda or coreml",
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FERMI_PRECISION",
        show_default="the export default",
        metavar="PRECISION",
        help="fp32, fp16, int8 or int4: which export of the model to load (made on first use)",
    ),
]
HostOpt = Annotated[
    str | None, typer.Option(help="bind address (env: FERMI_OPENAI_ADDR / FERMI_GRPC_ADDR)")
]


def _check_port(port: int | None) -> int | None:
    """A TCP port, 0 (any free one) to 65535; checked by hand so that --help stays narrow."""
    if port is not None and not 0 <= port <= 65535:
        raise typer.BadParameter(f"{port} is not a port (0 to 65535)")
    return port


PortOpt = Annotated[
    int | None,
    typer.Option(callback=_check_port, help="port (env: FERMI_OPENAI_ADDR / FERMI_GRPC_ADDR)"),
]
ChatTemplateOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="FERMI_CHAT_TEMPLATE", exists=True, dir_okay=False, metavar="FILE",
        help="a Jinja chat template used instead of the model's own",
    ),
]  # fmt: skip
CtxSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx-size", "-c", "--max-model-len", envvar="FERMI_CTX_SIZE", min=0, metavar="TOKENS",
        show_default="the model's context", help="tokens of context (prompt + answer), at most "
        "the model's; also --max-model-len",
    ),
]  # fmt: skip
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", "-t", envvar="FERMI_THREADS", min=0, show_default="one per core", metavar="N",
        help="onnxruntime intra-op threads",
    ),
]  # fmt: skip
TlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="FERMI_GRPC_TLS_CERT", show_default="none (plaintext)", metavar="FILE",
        help="PEM certificate chain: serve gRPC over TLS (with --tls-key)",
    ),
]  # fmt: skip
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="FERMI_GRPC_TLS_KEY", show_default="none", metavar="FILE",
        help="PEM private key of --tls-cert",
    ),
]  # fmt: skip
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FERMI_API_KEY", show_default="none", metavar="KEY",
        help="the key clients must send (HTTP: `Authorization: Bearer KEY` on /v1 routes)",
    ),
]  # fmt: skip
ServedNameOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--served-model-name", "--alias", envvar="FERMI_SERVED_MODEL_NAME", metavar="NAME",
        show_default="the model's id", help="a name the model answers to; repeat it or separate "
        "names with commas; the first is the one reported; also --alias",
    ),
]  # fmt: skip
PoolOpt = Annotated[
    int | None,
    typer.Option(
        "--max-num-seqs", "--parallel", envvar="FERMI_ENGINE_POOL", min=1, show_default="16",
        metavar="N",
        help="the batch limit: sequences decoded together (each choice of n counts)",
    ),
]  # fmt: skip
QueueOpt = Annotated[
    int | None,
    typer.Option(
        envvar="FERMI_MAX_QUEUE", min=0, show_default="64", metavar="N",
        help="requests that may wait for a free sequence; more are refused",
    ),
]  # fmt: skip
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FERMI_LOG_FORMAT", show_default="plain", metavar="plain|json",
        help="log lines (the access log included) as text or as one JSON object each",
    ),
]  # fmt: skip
MaxNewTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens", "-n", "--n-predict", envvar="FERMI_MAX_NEW_TOKENS", metavar="N",
        show_default="0", help="most tokens a request that sets no limit generates; 0 or -1: "
        "no cap, it runs to the end of the context",
    ),
]  # fmt: skip
TimeoutOpt = Annotated[
    int | None,
    typer.Option(
        envvar="FERMI_TIMEOUT_MS", min=0, metavar="MS", show_default="0 = none",
        help="longest generation, in milliseconds",
    ),
]  # fmt: skip
DefaultThinkingOpt = Annotated[
    str | None,
    typer.Option(
        envvar="FERMI_DEFAULT_THINKING", metavar="on|off|auto", show_default="off",
        help="thinking for requests that do not say",
    ),
]  # fmt: skip
SessionTtlOpt = Annotated[
    float | None,
    typer.Option(
        envvar="FERMI_SESSION_TTL_S", min=0, metavar="SECONDS", show_default="1800",
        help="idle sessions (and their KV cache) expire after this",
    ),
]  # fmt: skip
SessionMaxOpt = Annotated[
    int | None,
    typer.Option(
        envvar="FERMI_SESSION_MAX", min=1, metavar="N", show_default="256",
        help="most sessions kept",
    ),
]  # fmt: skip
KvCacheOpt = Annotated[
    int | None,
    typer.Option(
        envvar="FERMI_KV_CACHE_MB", min=0, metavar="MB", show_default="4096",
        help="most KV cache memory idle sessions keep",
    ),
]  # fmt: skip
CorsOpt = Annotated[
    str | None,
    typer.Option(
        "--cors-origins", "--allowed-origins", envvar="FERMI_CORS_ORIGINS", metavar="ORIGINS",
        show_default="none", help="comma-separated origins browsers may call from, or *; also "
        "--allowed-origins",
    ),
]  # fmt: skip
MaxBodyOpt = Annotated[
    int | None,
    typer.Option(
        envvar="FERMI_MAX_BODY_BYTES", min=1, metavar="BYTES", show_default="4194304",
        help="largest request body; larger ones get 413",
    ),
]  # fmt: skip


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="artifact dir, checkpoint dir or tiny-qwen3")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="peers' input", show_default="the source")
    ] = None,
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
    threads: Annotated[
        int | None, typer.Option(min=1, help="per engine", show_default="one per core")
    ] = None,
    threading: Annotated[
        str, typer.Option(help="thread modes, each engine in each: spin,passive")
    ] = "spin,passive",
    server: Annotated[bool, typer.Option(help="measure the OpenAI server")] = True,
    bandwidth: Annotated[bool, typer.Option(help="measure the decode ceiling")] = True,
    chart: Annotated[bool, typer.Option(help="write chart.png")] = True,
    venv: Annotated[list[str] | None, typer.Option(help="FAMILY=PYTHON for a peer")] = None,
    out: Annotated[Path, typer.Option(help="results folder")] = Path("bench-results"),
    timeout: Annotated[float, typer.Option(help="seconds per engine subprocess")] = 3600.0,
    docs: Annotated[Path | None, typer.Option(help="update this file's results block")] = None,
) -> None:
    """Benchmark fermi beside peer engines (native llama.cpp; the others each in its nox venv)
    on the same checkpoint."""
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
    precision: PrecisionOpt = None,
    chat_template: ChatTemplateOpt = None,
    ctx_size: CtxSizeOpt = None,
    threads: ThreadsOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    repeat_penalty: Annotated[
        float | None, typer.Option(help="1.0 = off; unset: the model's default")
    ] = None,
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
    from fermi.models import check_precision
    from fermi.requests import SamplingParams
    from fermi.runtime import Runtime
    from fermi.sampling import validate_sampling
    from fermi.settings import check_settings, load_settings

    try:
        settings = check_settings(
            load_settings().replace(
                model=model,
                device=device,
                precision=precision,
                chat_template=str(chat_template) if chat_template else None,
                ctx_size=ctx_size,
                threads=threads,
                max_new_tokens=max_new_tokens,
            )
        )
        options = chat_module.ChatOptions(
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
        validate_sampling(options.sampling)  # before the model loads, not after
        check_precision(settings.model, settings.precision)
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
    if not port.isdigit() or int(port) > 65535:
        raise InvalidRequest(f"address {addr!r} is not HOST:PORT (a port from 0 to 65535)")
    return host or "127.0.0.1", int(port)


def _serve(kind: str, host: str | None, port: int | None, flags: dict, run=None) -> None:
    """Check the settings, then `run(settings, host, port)` (default: fermi.<kind>_server's)."""
    from importlib import import_module

    from fermi.models import check_precision
    from fermi.security import exposure_warning, keys_from_settings
    from fermi.settings import check_settings, load_settings

    names = flags.pop("served_model_name") or []
    if flags.get("chat_template") is not None:
        flags["chat_template"] = str(flags["chat_template"])
    try:
        settings = check_settings(
            load_settings().replace(served_model_name=",".join(names) or None, **flags)
        )
        check_precision(settings.model, settings.precision)  # before the port is bound
        default_host, default_port = _split_addr(getattr(settings, f"{kind}_addr"))
        host = host or default_host
        # Said at once, before the model loads; the ready line repeats it.
        if warning := exposure_warning(host, keys_from_settings(settings)):
            typer.echo(warning, err=True)
        run = run or import_module(f"fermi.{kind}_server.server").run
        run(settings, host, port or default_port)
    except FermiError as e:
        raise fail(str(e)) from None


@serve_app.command("openai")
def serve_openai(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: ApiKeyOpt = None,
    served_model_name: ServedNameOpt = None,
    chat_template: ChatTemplateOpt = None,
    ctx_size: CtxSizeOpt = None,
    engine_pool: PoolOpt = None,
    max_queue: QueueOpt = None,
    threads: ThreadsOpt = None,
    log_format: LogFormatOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    timeout_ms: TimeoutOpt = None,
    default_thinking: DefaultThinkingOpt = None,
    session_ttl_s: SessionTtlOpt = None,
    session_max: SessionMaxOpt = None,
    kv_cache_mb: KvCacheOpt = None,
    cors_origins: CorsOpt = None,
    max_body_bytes: MaxBodyOpt = None,
) -> None:
    """OpenAI-compatible HTTP server (default 127.0.0.1:8000, FERMI_OPENAI_ADDR)."""
    flags = dict(locals())
    host, port = flags.pop("host"), flags.pop("port")
    _serve("openai", host, port, flags)


@serve_app.command("ray")
def serve_ray(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    replicas: Annotated[
        int | None,
        typer.Option(min=1, show_default="autoscaled", help="a fixed number of replicas"),
    ] = None,
    min_replicas: Annotated[int, typer.Option(min=0, help="autoscaling: fewest replicas")] = 1,
    max_replicas: Annotated[
        int | None,
        typer.Option(min=1, show_default="--min-replicas", help="autoscaling: most replicas"),
    ] = None,
    replica_cpus: Annotated[
        float, typer.Option(min=0.01, help="CPUs Ray reserves per replica (its threads)")
    ] = 1.0,
    replica_gpus: Annotated[float, typer.Option(min=0, help="GPUs per replica")] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            show_default="a local instance",
            metavar="ADDRESS",
            help="join this Ray cluster (auto, HOST:6379 or ray://HOST:10001)",
        ),
    ] = None,  # fmt: skip
    num_cpus: Annotated[
        int | None,
        typer.Option(min=1, show_default="all cores", help="the local Ray instance's CPUs"),
    ] = None,
    api_key: ApiKeyOpt = None,
    served_model_name: ServedNameOpt = None,
    chat_template: ChatTemplateOpt = None,
    ctx_size: CtxSizeOpt = None,
    engine_pool: PoolOpt = None,
    max_queue: QueueOpt = None,
    threads: ThreadsOpt = None,
    log_format: LogFormatOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    timeout_ms: TimeoutOpt = None,
    default_thinking: DefaultThinkingOpt = None,
    session_ttl_s: SessionTtlOpt = None,
    session_max: SessionMaxOpt = None,
    kv_cache_mb: KvCacheOpt = None,
    cors_origins: CorsOpt = None,
    max_body_bytes: MaxBodyOpt = None,
) -> None:
    """The OpenAI server as Ray Serve replicas behind one endpoint, with cache-aware routing
    (needs the `ray` extra; default 127.0.0.1:8000, FERMI_OPENAI_ADDR)."""
    flags = dict(locals())
    host, port = flags.pop("host"), flags.pop("port")
    names = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus")
    fixed, low, high, cpus, gpus = (flags.pop(name) for name in names)
    where = {name: flags.pop(name) for name in ("ray_address", "num_cpus")}

    def run(settings, host: str, port: int) -> None:
        from fermi.ray_serve.run import RayOptions
        from fermi.ray_serve.run import run as run_ray
        from fermi.ray_serve.scale import ScaleOptions

        high_or_low = high if high is not None else max(low, 1)
        scale = ScaleOptions(fixed, low, high_or_low, None, cpus, gpus).check()
        run_ray(settings, scale, host, port, RayOptions(where["ray_address"], where["num_cpus"]))

    _serve("openai", host, port, flags, run)


@serve_app.command("grpc")
def serve_grpc(
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: ApiKeyOpt = None,
    served_model_name: ServedNameOpt = None,
    chat_template: ChatTemplateOpt = None,
    ctx_size: CtxSizeOpt = None,
    engine_pool: PoolOpt = None,
    max_queue: QueueOpt = None,
    threads: ThreadsOpt = None,
    log_format: LogFormatOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    timeout_ms: TimeoutOpt = None,
    default_thinking: DefaultThinkingOpt = None,
    session_ttl_s: SessionTtlOpt = None,
    session_max: SessionMaxOpt = None,
    kv_cache_mb: KvCacheOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Token-streaming gRPC server (default 127.0.0.1:50051, FERMI_GRPC_ADDR)."""
    flags = dict(locals())
    host, port = flags.pop("host"), flags.pop("port")
    cert, key = (flags.pop(name) for name in ("tls_cert", "tls_key"))
    flags.update(grpc_tls_cert=str(cert) if cert else None, grpc_tls_key=str(key) if key else None)
    _serve("grpc", host, port, flags)


if __name__ == "__main__":
    main()
