"""Read a checkpoint's safetensors as float32 numpy arrays, tensor by tensor (memory-mapped), with
no framework: bfloat16 is widened by shifting its bits into the high half of a float32."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

RAW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_tensors(checkpoint: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of every *.safetensors file in `checkpoint`."""
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        yield from _read_file(path)


def _read_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in RAW:
            raise ValueError(f"{path.name}: {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        raw = data[start:end].view(RAW[entry["dtype"]]).reshape(entry["shape"])
        yield name, _to_float32(raw, entry["dtype"])


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)
