"""A sequence's KV cache as onnxruntime values that stay where the engine put them.

The portable graph returns `present = concat(past, new)`; we keep those outputs and bind them as
the next step's past, so the cache never passes through numpy between steps (on CUDA it never
leaves the GPU). Only `trim` (reusing a prefix for a new turn) copies."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: np.dtype):
        self.num_layers = num_layers
        self.dtype = np.dtype(dtype)
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=self.dtype)  # (B, KV, T, D)
        self.values: list[ort.OrtValue] = [
            ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * num_layers)
        ]
        self._bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.dtype.itemsize
        self.offset = 0  # tokens held

    def update(self, presents: list[ort.OrtValue]) -> None:
        """Adopt the graph's present.* outputs (key, value per layer, in graph order)."""
        self.values = presents
        self.offset = presents[0].shape()[2]

    def trim(self, length: int) -> None:
        """Keep only the first `length` positions (the common prefix with a new prompt)."""
        if length >= self.offset:
            return
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
            for v in self.values
        ]
        self.offset = length

    @property
    def nbytes(self) -> int:
        return self.offset * self._bytes_per_token
