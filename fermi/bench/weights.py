"""Bytes of weights an ONNX decoder reads per generated token.

Every initializer is read once per decode step, except tables consumed only by gather ops (the
input embedding: one row per token). A tied embedding that is also the head's matrix is read in
full, as the head. Sizes come from the graph's external-data records (or the tensor's shape), so
the weights themselves are never loaded."""

from __future__ import annotations

import math
from pathlib import Path

GATHERS = {"Gather", "GatherBlockQuantized"}


def onnx_bytes_per_token(model_file: Path) -> int:
    import onnx
    from onnx import helper

    model = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    _collect_consumers(model.graph, consumers)
    total = 0
    for tensor in model.graph.initializer:
        ops = consumers.get(tensor.name, set())
        if ops and ops <= GATHERS:
            continue
        total += _tensor_bytes(tensor, helper)
    return total


def _collect_consumers(graph, consumers: dict[str, set[str]]) -> None:
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
        for attribute in node.attribute:  # subgraphs (If/Loop bodies) read outer initializers
            for sub in [attribute.g, *attribute.graphs]:
                if sub is not None and len(sub.node):
                    _collect_consumers(sub, consumers)


def _tensor_bytes(tensor, helper) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = math.prod(tensor.dims)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return count * itemsize


def directory_bytes(path: Path, suffixes: tuple[str, ...] = ()) -> int:
    """Total size of the files under `path` (only those ending in `suffixes`, when given)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not suffixes or p.name.endswith(suffixes))
