"""What the run ran on, and the shape of the model it measured."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path


def _proc_value(path: str, key: str) -> str | None:
    file = Path(path)
    if not file.is_file():
        return None
    for line in file.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def cpu_stall_us() -> int | None:
    """Microseconds in which some runnable task waited for a CPU (Linux pressure stall
    information, /proc/pressure/cpu), since boot; None where the kernel does not report it."""
    pressure = Path("/proc/pressure/cpu")
    if not pressure.is_file():
        return None
    for line in pressure.read_text().splitlines():
        if line.startswith("some "):
            return int(line.rsplit("total=", 1)[1])
    return None


class StallMeter:
    """The share of wall time in which something waited for a CPU, over a stretch of the run:
    other work on the machine competing with the engine being measured (0 on a quiet one)."""

    def __init__(self) -> None:
        self.start_us = cpu_stall_us()
        self.start_s = time.monotonic()

    def share(self) -> float | None:
        end = cpu_stall_us()
        if end is None or self.start_us is None:
            return None
        elapsed_us = (time.monotonic() - self.start_s) * 1e6
        return (end - self.start_us) / elapsed_us if elapsed_us > 0 else None


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    cores, physical = set(), "0"
    for line in cpuinfo.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "physical id":
            physical = value.strip()
        elif name.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def describe() -> dict:
    memory = _proc_value("/proc/meminfo", "MemTotal")
    versions = {}
    for package in ("onnxruntime", "numpy", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "hostname": socket.gethostname(),
        "cpu": _proc_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_gb": round(int(memory.split()[0]) / 1024**2, 1) if memory else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "orchestrator_versions": versions,
    }


def checkpoint_shape(directory: Path) -> dict:
    """Layer sizes and parameter count from config.json (a tied embedding counted once)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    )
    shape = {k: config.get(k) for k in keys}
    try:
        shape["parameters"] = parameter_count(config)
    except (KeyError, TypeError):
        pass
    return shape


def parameter_count(config: dict) -> int:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden + 2 * head_dim
    embeddings = config["vocab_size"] * hidden
    if not config.get("tie_word_embeddings", True):
        embeddings *= 2
    return config["num_hidden_layers"] * per_layer + embeddings + hidden
