"""A local Hugging Face checkpoint directory: config.json plus safetensors weights, read one tensor
at a time so that export never holds more than a tensor or two in memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  registers bfloat16, which safetensors' numpy reader returns
import numpy as np
from safetensors import SafetensorError, safe_open

from fermi.errors import ModelNotFound

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFound(
            f"{path.parent} is not a Hugging Face checkpoint: {path.name} is missing"
        ) from None
    except ValueError as e:
        raise ModelNotFound(f"{path} is not valid JSON: {e}") from None


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (tensor name -> dtype, shape, data_offsets) and where data starts.
    Raises ModelNotFound when the file is not safetensors or is shorter than its header says
    (a truncated download or copy)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = 8 + length + max((t["data_offsets"][1] for t in header.values()), default=0)
        size = path.stat().st_size
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as e:
        raise ModelNotFound(f"{path} is not a readable safetensors file: {e}") from None
    if size < end:
        raise ModelNotFound(
            f"{path} is truncated: {size} bytes, its header says {end} (download it again)"
        )
    return header, 8 + length


def _shard_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        return {name: directory / shard for name, shard in weight_map.items()}
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ModelNotFound(
            f"{directory} has no *.safetensors weights (fermi reads safetensors only)"
        )
    return {name: shard for shard in shards for name in read_header(shard)[0]}


class Checkpoint:
    """Config and weights of one checkpoint directory; use as a context manager."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.config = read_json(self.directory / "config.json")
        self._shard_of = _shard_map(self.directory)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        """The number of tensors in the checkpoint."""
        return len(self._shard_of)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor in the checkpoint's dtype (bf16 as ml_dtypes.bfloat16), read by
        safetensors' own numpy reader. Raises ModelNotFound when the file cannot be read."""
        path = self._shard_of[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="np")
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelNotFound(f"cannot read {name} from {path}: {e}") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
