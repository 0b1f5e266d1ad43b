"""`fermi bench` options -> a RunOptions -> the run (the typer command stays in fermi/cli.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from fermi.bench.config import BenchConfig, parse_engines
from fermi.bench.orchestrator import RunOptions, run


def _ints(text: str | None, option: str) -> list[int] | None:
    """'128,512' -> [128, 512]; ValueError naming `option` for anything else."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes a comma list of positive integers, not {text!r}")
    return values


def _venvs(items: list[str] | None) -> dict[str, Path]:
    venvs = {}
    for item in items or []:
        family, sep, python = item.partition("=")
        if not sep:
            raise ValueError(f"--venv takes FAMILY=PYTHON, not {item!r}")
        venvs[family] = Path(python)
    return venvs


def bench_command(
    *,
    model: str,
    checkpoint: Path | None,
    engines: str,
    quick: bool,
    reps: int | None,
    cold_reps: int | None,
    prompt_lengths: str | None,
    new_tokens: int | None,
    concurrency: str | None,
    server_tokens: int | None,
    threads: int | None,
    threading: str,
    server: bool,
    bandwidth: bool,
    chart: bool,
    venv: list[str] | None,
    out: Path,
    timeout: float,
    docs: Path | None,
) -> Path:
    if server:  # checked before anything runs, not after the engine measurements
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise ValueError(
                "the server measurement needs httpx: pip install 'fermi[bench]' (or -e "
                "'.[bench]'), or pass --no-server"
            ) from None
    base = BenchConfig.quick() if quick else BenchConfig()
    config = base.replace(
        reps=reps,
        cold_reps=cold_reps,
        prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"),
        new_tokens=new_tokens,
        concurrency=_ints(concurrency, "--concurrency"),
        server_tokens=server_tokens,
        threads=threads,
        threading=[mode.strip() for mode in threading.split(",") if mode.strip()],
    )
    options = RunOptions(
        model=model,
        engines=parse_engines(engines),
        config=config,
        out=out,
        checkpoint=checkpoint.resolve() if checkpoint else None,
        venvs=_venvs(venv),
        server=server,
        bandwidth=bandwidth,
        chart=chart,
        timeout_s=timeout,
        command=shlex.join(["fermi", *sys.argv[1:]]),
        docs=docs,
    )
    return run(options)
