"""The KV cache of every running sequence, as one batch: per layer and kind a buffer of shape
(rows, KV, capacity, D) whose row r is one sequence's cache. A decode step binds rows
[0, n) at once, so sequences that joined at different times, with different lengths, run in one
graph run (GroupQueryAttention reads row b up to its own `seqlens_k[b]`); a prefill chunk binds
one row. Rows are bound by pointer (IOBinding.bind_input/bind_output with a buffer address),
so nothing is copied per step.

What lies in a row past its sequence's length is never read, only overwritten, so a row that
takes no part in a decode step is given a placeholder token at its own length: harmless, and it
keeps the bound rows contiguous without moving any sequence.

Outside the batch a sequence's KV lives in a `KVBlock`: exactly its tokens, (1, KV, T, D) per
layer and kind. Blocks are what the prefix cache and sessions keep; a new sequence starts by
copying a cached block into its row. The copies (and growing the pool) are numpy on the host
and one-node onnxruntime graphs on a device (`GraphMover`), so a CUDA cache never visits the
host.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

STEP = 256  # the pool's capacity grows by at least this many positions, or a quarter of itself


@dataclass
class KVBlock:
    """A cached run of KV: `values[i]` is layer i // 2's key (even i) or value (odd i),
    (1, KV, length, D), a numpy array on the host or an OrtValue on a device."""

    values: list
    length: int  # tokens
    nbytes: int


class HostMover:
    """Copies between pool rows and blocks with numpy (host memory)."""

    def empty(self, shape: tuple, dtype: np.dtype):
        """An uninitialised buffer whose pages take memory only once written: anonymous
        mmap, in 4 KiB pages, marked MADV_NOHUGEPAGE. (numpy's own allocator advises huge pages
        for large arrays, and a 2 MiB page then backs a row's run of positions however few it
        holds; fermi/huge_pages.py leaves marked mappings alone.)"""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        memory = mmap.mmap(-1, nbytes)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(memory, dtype).reshape(shape)

    def pointer(self, buffer) -> int:
        return buffer.ctypes.data

    def grow(self, buffer, rows: int, capacity: int, held: list[int] | None = None):
        """A (rows, KV, capacity, D) buffer holding what fits of `buffer` (rows and capacity
        may shrink). `held`: the positions each row holds, the only ones copied; the pages of
        a new buffer stay untouched until written, so a row takes host memory for what it
        holds, not for the capacity every row shares."""
        grown = self.empty((rows, buffer.shape[1], capacity, buffer.shape[3]), buffer.dtype)
        kept = min(rows, buffer.shape[0])
        if held is None:
            length = min(capacity, buffer.shape[2])
            grown[:kept, :, :length] = buffer[:kept, :, :length]
            return grown
        for row, length in enumerate(held[:kept]):
            if length:
                grown[row, :, :length] = buffer[row, :, :length]
        return grown

    def save(self, buffer, row: int, length: int):
        return np.ascontiguousarray(buffer[row : row + 1, :, :length])

    def load(self, buffer, row: int, block_value, length: int) -> None:
        buffer[row, :, :length] = block_value[0, :, :length]

    def copy_row(self, buffer, source: int, target: int, length: int) -> None:
        buffer[target, :, :length] = buffer[source, :, :length]


class GraphMover:
    """The same copies on a device, as runs of one small onnxruntime graph:
    y = Pad(Slice(x, [0, length) on the position axis), pads). Rows are bound by pointer, so
    writing a row of the pool is an output bound inside the pool's buffer. Runs on any
    provider (the tests run it on the CPU)."""

    def __init__(self, dtype: np.dtype, providers: list, device: str):
        from onnx import TensorProto, helper  # import on first use: keeps load fast

        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        i64 = TensorProto.INT64
        graph = helper.make_graph(
            [
                helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["part"]),
                helper.make_node("Pad", ["part", "pads"], ["y"], mode="constant"),
            ],
            "kv_move",
            [
                helper.make_tensor_value_info("x", elem, ["b", "kv", "t", "d"]),
                helper.make_tensor_value_info("starts", i64, ["n"]),
                helper.make_tensor_value_info("ends", i64, ["n"]),
                helper.make_tensor_value_info("axes", i64, ["n"]),
                helper.make_tensor_value_info("pads", i64, [8]),
            ],
            [helper.make_tensor_value_info("y", elem, ["b2", "kv", "t2", "d"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10
        self.session = ort.InferenceSession(model.SerializeToString(), providers=providers)
        self.dtype = np.dtype(dtype)
        self.device = device

    def empty(self, shape: tuple, dtype: np.dtype):
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device)

    def pointer(self, buffer) -> int:
        return buffer.data_ptr()

    def _run(self, x, x_shape, x_ptr, length, pads, y_shape=None, y_ptr=None, rows=None):
        """y = x's first `length` positions (and first `rows` rows when given), padded."""
        binding = self.session.io_binding()
        if x_ptr is None:
            binding.bind_ortvalue_input("x", x)
        else:
            binding.bind_input("x", self.device, 0, self.dtype, list(x_shape), x_ptr)
        ends, axes = ([length], [2]) if rows is None else ([rows, length], [0, 2])
        binding.bind_cpu_input("starts", np.zeros(len(axes), np.int64))
        binding.bind_cpu_input("ends", np.array(ends, np.int64))
        binding.bind_cpu_input("axes", np.array(axes, np.int64))
        binding.bind_cpu_input("pads", np.array(pads, np.int64))
        if y_ptr is None:
            binding.bind_output("y", self.device)
        else:
            binding.bind_output("y", self.device, 0, self.dtype, list(y_shape), y_ptr)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0] if y_ptr is None else None

    def _row(self, buffer, row: int) -> tuple[tuple, int]:
        rows, kv, capacity, d = buffer.shape()
        shape = (1, kv, capacity, d)
        return shape, buffer.data_ptr() + row * kv * capacity * d * self.dtype.itemsize

    def grow(self, buffer, rows: int, capacity: int, held: list[int] | None = None):
        """HostMover.grow on the device: every kept row is copied whole (device memory is
        allocated when the buffer is, so copying less would save nothing)."""
        old_rows, _, old_capacity, _ = buffer.shape()
        kept, length = min(rows, old_rows), min(capacity, old_capacity)
        pads = [0, 0, 0, 0, rows - kept, 0, capacity - length, 0]
        return self._run(buffer, None, None, length, pads, rows=kept)

    def save(self, buffer, row: int, length: int):
        shape, ptr = self._row(buffer, row)
        return self._run(None, shape, ptr, length, [0] * 8)

    def load(self, buffer, row: int, block_value, length: int) -> None:
        shape, ptr = self._row(buffer, row)
        pads = [0, 0, 0, 0, 0, 0, shape[2] - length, 0]
        self._run(block_value, None, None, length, pads, shape, ptr)

    def copy_row(self, buffer, source: int, target: int, length: int) -> None:
        shape, source_ptr = self._row(buffer, source)
        _, target_ptr = self._row(buffer, target)
        pads = [0, 0, 0, 0, 0, 0, shape[2] - length, 0]
        self._run(None, shape, source_ptr, length, pads, shape, target_ptr)


class KVPool:
    """Per layer and kind one (rows, KV, capacity, D) buffer; row r belongs to one sequence at
    a time (the scheduler hands rows out and takes them back). Both dimensions grow on demand
    (one copy per growth), never beyond `max_rows` rows and `max_length` positions.
    Raises ValueError when a row would need more than `max_length` positions."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: np.dtype,
        max_rows: int,
        max_length: int,
        mover: HostMover | GraphMover,
    ):
        self.dtype = np.dtype(dtype)
        self.max_rows = max_rows
        self.max_length = max_length
        self.mover = mover
        self.kv_heads, self.head_dim = num_kv_heads, head_dim
        self.rows = 0
        self.capacity = 0
        self.version = 0  # counts reallocations: a binding of the buffers is stale when it moves
        self.buffers = [
            mover.empty((0, num_kv_heads, 0, head_dim), self.dtype) for _ in range(2 * num_layers)
        ]
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes allocated: rows x capacity x bytes per token."""
        return self.rows * self.capacity * self.bytes_per_token

    def reserve(self, rows: int, length: int, held: list[int] | None = None) -> None:
        """Make room for rows [0, rows) to hold `length` positions each. Capacity grows by a
        quarter or STEP positions, whichever is more (up to max_length), so decoding grows it
        rarely. Rows grow to at least twice what they were (up to max_rows), so a burst of
        sequences copies the pool a few times, not once per sequence. `held`: the positions
        each row in use holds, rows [0, len(held)), free ones 0 (default: every row is kept
        whole); a growth copies only those positions, and a growth of capacity alone drops
        the rows past them, so one long sequence after a burst does not carry the burst's
        rows at its length. Raises ValueError past max_length."""
        if length > self.max_length:
            raise ValueError(f"{length} positions exceed the context length {self.max_length}")
        if rows <= self.rows and length <= self.capacity:
            return
        capacity = self.capacity
        if length > capacity:
            capacity = min(self.max_length, max(length, capacity + max(STEP, capacity // 4)))
        if rows > self.rows:  # a burst is admitted one sequence at a time: double, so n
            rows = max(rows, min(self.max_rows, 2 * self.rows))  # sequences grow it log2(n) times
        keep = self.rows if held is None else len(held)
        self._resize(min(self.max_rows, max(rows, keep)), capacity, held)

    def fit(self, held: list[int]) -> None:
        """Give memory back once the sequences that needed it have left. `held`: as for
        `reserve`. With no row in use the buffers are freed; when the capacity is over twice
        what the longest held row needs (its positions plus STEP), or the rows over twice
        those in use, the buffers are reallocated at that size (one copy of what the rows
        hold). The factor of two keeps sequences that come and go from resizing the pool at
        every turn."""
        if not held:
            if self.rows or self.capacity:
                self._resize(0, 0, [])
            return
        capacity = min(self.max_length, max(held) + STEP)
        if self.capacity > 2 * capacity or self.rows > 2 * len(held):
            self._resize(len(held), min(capacity, self.capacity), held)

    def _resize(self, rows: int, capacity: int, held: list[int] | None) -> None:
        if self.rows and self.capacity and rows and capacity:
            self.buffers = [self.mover.grow(b, rows, capacity, held) for b in self.buffers]
        else:
            shape = (rows, self.kv_heads, capacity, self.head_dim)
            self.buffers = [self.mover.empty(shape, self.dtype) for _ in self.buffers]
        self.rows, self.capacity = rows, capacity
        self.version += 1

    def bind(self, binding, past_names, present_names, first: int, count: int, device: str):
        """Bind rows [first, first + count) as the graph's past and present (in place)."""
        shape = [count, self.kv_heads, self.capacity, self.head_dim]
        row_bytes = self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize
        for past, present, buffer in zip(past_names, present_names, self.buffers, strict=True):
            ptr = self.mover.pointer(buffer) + first * row_bytes
            binding.bind_input(past, device, 0, self.dtype, shape, ptr)
            binding.bind_output(present, device, 0, self.dtype, shape, ptr)

    def save(self, row: int, length: int) -> KVBlock:
        """A copy of the first `length` positions of `row`."""
        values = [self.mover.save(b, row, length) for b in self.buffers]
        return KVBlock(values, length, length * self.bytes_per_token)

    def load(self, row: int, block: KVBlock, length: int) -> None:
        """Copy the first `length` positions of `block` into `row` (reserve first)."""
        for buffer, value in zip(self.buffers, block.values, strict=True):
            self.mover.load(buffer, row, value, length)

    def copy_row(self, source: int, target: int, length: int) -> None:
        for buffer in self.buffers:
            self.mover.copy_row(buffer, source, target, length)
