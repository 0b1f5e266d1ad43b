"""Steps for many sequences on one Engine: a prefill chunk for one sequence, a decode step for
all of them at once. The scheduler (fermi/scheduler.py) decides what runs; this module only knows
how a sequence's KV is held and how a step is fed.

Two ways, chosen by the artifact's `io_mode`:
- `PooledRunner` ("shared", the cpu and cuda graphs): every sequence owns a row of one KVPool
  (fermi/kv_pool.py) and a decode step is one graph run over rows [0, n), batch n.
- `SingleRunner` ("concat", the portable graph; "window", the coreml graph): each sequence keeps
  a cache of its own and a decode step runs them one after another, batch 1. The coreml graph is
  static (batch 1 in its window and masks); the portable graph would need padded attention masks.

Both hand out `Row`s, save a row's KV as a `KVBlock` and load a block into a row, so the
prefix cache and the scheduler work the same on every target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fermi.engine import Engine, providers_for
from fermi.kv_pool import GraphMover, HostMover, KVBlock, KVPool


@dataclass
class Row:
    """A sequence's place in the engine: `length` tokens of KV held."""

    index: int
    length: int = 0
    cache: object = field(default=None, repr=False)  # SingleRunner: the sequence's own cache


class PooledRunner:
    def __init__(self, engine: Engine, max_rows: int):
        m = engine.manifest
        self.engine = engine
        device = engine._ort_device
        mover = (
            HostMover()
            if device == "cpu"
            else GraphMover(engine.kv_dtype, providers_for(engine.device), device)
        )
        self.pool = KVPool(
            m.num_layers,
            m.num_kv_heads,
            m.head_dim,
            engine.kv_dtype,
            max_rows,
            m.context_length,
            mover,
        )
        self.rows: list[Row | None] = [None] * max_rows  # row i's holder
        # One IOBinding kept across runs: binding the 2 x layers KV buffers costs about 0.3 ms
        # (a few % of a small model's decode step), so they are bound again only when the span
        # of rows or the pool's buffers change; the logits of small runs land in one reused
        # host buffer, (max_rows, V), instead of a new allocation per step.
        self._binding = engine.session.io_binding()
        self._bound: tuple | None = None  # (first, count, pool version) of the bound KV
        self._logits = np.empty((max_rows, m.vocab_size), np.float32)

    @property
    def nbytes(self) -> int:
        """The batch's KV memory: on the host, the positions the rows hold (the pool's pages
        are taken as they are written, fermi/kv_pool.py); on a device, the buffers allocated."""
        if isinstance(self.pool.mover, HostMover):
            return sum(self._held()) * self.pool.bytes_per_token
        return self.pool.nbytes

    def acquire(self) -> Row:
        """The lowest free row (keeps the rows a decode step binds few). Raises RuntimeError
        when every row is taken: the scheduler admits no more sequences than rows."""
        for i, holder in enumerate(self.rows):
            if holder is None:
                row = self.rows[i] = Row(i)
                return row
        raise RuntimeError("no free KV row")

    def release(self, row: Row) -> None:
        """Free the row; the pool gives back what the rows still in use no longer need
        (KVPool.fit: all of it when none is)."""
        self.rows[row.index] = None
        self.pool.fit(self._held())

    def load(self, row: Row, block: KVBlock, length: int) -> None:
        """Start `row` with the first `length` tokens of a cached block."""
        self.pool.reserve(row.index + 1, length + 1, self._held())
        self.pool.load(row.index, block, length)
        row.length = length

    def save(self, row: Row) -> KVBlock:
        return self.pool.save(row.index, row.length)

    def fork(self, source: Row, target: Row) -> None:
        """`target` starts with a copy of `source`'s KV (n > 1: the prompt's)."""
        self.pool.reserve(target.index + 1, source.length + 1, self._held())
        self.pool.copy_row(source.index, target.index, source.length)
        target.length = source.length

    def prefill(self, row: Row, token_ids: list[int], last_only: bool = True) -> np.ndarray:
        """Run `token_ids` after the row's KV; returns float32 logits, (V,) for the last
        position or (S, V) for every one, and advances the row."""
        seq = len(token_ids)
        total = row.length + seq
        self.pool.reserve(row.index + 1, total, self._held())
        index = [seq - 1] if last_only else list(range(seq))
        logits = self._run(row.index, [token_ids], [total - 1], total, index)  # (1, N, V)
        row.length = total
        out = logits[0, -1] if last_only else logits[0]
        return out.copy() if np.may_share_memory(out, self._logits) else out

    def decode(self, rows: list[Row], token_ids: list[int]) -> np.ndarray:
        """One token for each of `rows`, in one graph run over the rows from the lowest to the
        highest index; returns logits (len(rows), V). Rows in that range that take no part
        get a placeholder token at their own length, which nothing reads (fermi/kv_pool.py);
        GroupQueryAttention places row b's token at its own seqlens_k[b]."""
        first, count = self._span(rows)
        held = self.rows[first : first + count]
        lengths = [h.length if h is not None else 0 for h in held]
        ids = [[0] for _ in range(count)]
        for row, token in zip(rows, token_ids, strict=True):
            ids[row.index - first] = [token]
        self.pool.reserve(first + count, max(lengths) + 1, self._held())
        logits = self._run(first, ids, lengths, max(lengths) + 1, [0])  # (count, 1, V)
        for row in rows:
            row.length += 1
        return logits[[r.index - first for r in rows], 0]

    def can_prefill_together(self, rows: list[Row]) -> bool:
        """Whether `rows` can start their prompts in one run: GroupQueryAttention batches
        prompt tokens only when no row in the run has a past, so every row from the lowest to
        the highest index must be empty (fresh or free)."""
        first, count = self._span(rows)
        return all(h is None or h.length == 0 for h in self.rows[first : first + count])

    def prefill_together(self, rows: list[Row], chunks: list[list[int]]) -> np.ndarray:
        """The first chunk of several prompts in one run (see `can_prefill_together`):
        right-padded to the longest, each row's length in seqlens_k (onnxruntime's GQA
        prompt-with-padding mode); returns each row's last-position logits, (len(rows), V)."""
        first, count = self._span(rows)
        seq = max(len(c) for c in chunks)
        ids = [[0] * seq for _ in range(count)]
        seqlens = [0] * count
        for row, chunk in zip(rows, chunks, strict=True):
            ids[row.index - first] = chunk + [0] * (seq - len(chunk))
            seqlens[row.index - first] = len(chunk) - 1
        self.pool.reserve(first + count, seq, self._held())
        positions = sorted({len(c) - 1 for c in chunks})
        logits = self._run(first, ids, seqlens, seq, positions)  # (count, P, V)
        for row, chunk in zip(rows, chunks, strict=True):
            row.length = len(chunk)
        return np.stack(
            [
                logits[r.index - first, positions.index(len(c) - 1)]
                for r, c in zip(rows, chunks, strict=True)
            ]
        )

    def _held(self) -> list[int]:
        """The positions each row holds, up to the highest row in use (free rows 0)."""
        occupied = 1 + max((i for i, h in enumerate(self.rows) if h is not None), default=-1)
        return [h.length if h is not None else 0 for h in self.rows[:occupied]]

    def _span(self, rows: list[Row]) -> tuple[int, int]:
        first = min(r.index for r in rows)
        return first, 1 + max(r.index for r in rows) - first

    def _run(self, first: int, ids, seqlens, total: int, index) -> np.ndarray:
        """One graph run over rows [first, first + len(ids)); returns the logits at `index`,
        (len(ids), len(index), V). When that fits in `max_rows` rows of V, the array is a view
        of the runner's logits buffer, overwritten by the next run: callers copy what they
        keep."""
        e = self.engine
        binding = self._binding
        count = len(ids)
        bound = (first, count, self.pool.version)
        if bound != self._bound:
            self.pool.bind(binding, e.past_names, e.present_names, first, count, e._ort_device)
            self._bound = bound
        binding.bind_cpu_input("input_ids", np.asarray(ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.asarray(seqlens, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_cpu_input("logits_index", np.asarray(index, dtype=np.int64))
        rows = count * len(index)
        if rows <= len(self._logits):
            shape = (count, len(index), self._logits.shape[1])
            logits = self._logits[:rows].reshape(shape)
            binding.bind_output("logits", "cpu", 0, np.float32, shape, logits.ctypes.data)
            e.session.run_with_iobinding(binding)
            return logits
        binding.bind_output("logits", "cpu")
        e.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()


class SingleRunner:
    def __init__(self, engine: Engine, max_rows: int):
        self.engine = engine
        self.rows: list[Row | None] = [None] * max_rows

    @property
    def nbytes(self) -> int:
        return sum(r.cache.nbytes for r in self.rows if r is not None)

    def acquire(self) -> Row:
        for i, holder in enumerate(self.rows):
            if holder is None:
                row = self.rows[i] = Row(i, cache=self.engine.new_cache())
                return row
        raise RuntimeError("no free KV row")

    def release(self, row: Row) -> None:
        self.rows[row.index] = None
        row.cache = None

    def load(self, row: Row, block: KVBlock, length: int) -> None:
        row.cache.load(block.values, length)
        row.length = length

    def save(self, row: Row) -> KVBlock:
        values = row.cache.save(row.length)
        return KVBlock(values, row.length, sum(v.nbytes for v in values))

    def fork(self, source: Row, target: Row) -> None:
        self.load(target, self.save(source), source.length)

    def prefill(self, row: Row, token_ids: list[int], last_only: bool = True) -> np.ndarray:
        row.cache.reserve(row.length + len(token_ids))
        logits = self.engine.forward(token_ids, row.cache, last_only)
        row.length += len(token_ids)
        return logits

    def decode(self, rows: list[Row], token_ids: list[int]) -> np.ndarray:
        """One row after another (these graphs run batch 1); logits (len(rows), V)."""
        return np.stack(
            [self.prefill(row, [token]) for row, token in zip(rows, token_ids, strict=True)]
        )

    def can_prefill_together(self, rows: list[Row]) -> bool:
        return False


WARM_UP_TOKENS = 16


def warm_up(runner: PooledRunner | SingleRunner) -> None:
    """A short prefill (WARM_UP_TOKENS tokens) and one decode step on a throwaway row, then
    freed, before the first request, as llama-server warms up by default. The first runs of a
    session fault in the memory-mapped weights and size onnxruntime's buffers for several rows
    and for one; that cost is paid here, at load, instead of by the first request: 15-60 ms
    (fp32, files in the page cache) and up to seconds when the files are read from disk
    (docs/benchmarks.md, "Warm-up at load")."""
    row = runner.acquire()
    try:
        runner.prefill(row, [0] * WARM_UP_TOKENS)
        runner.decode([row], [0])
    finally:
        runner.release(row)


def runner_for(engine: Engine, max_rows: int) -> PooledRunner | SingleRunner:
    """The batched runner where the graph can batch (io_mode "shared"), else one at a time."""
    if engine.manifest.io_mode == "shared":
        return PooledRunner(engine, max_rows)
    return SingleRunner(engine, max_rows)
