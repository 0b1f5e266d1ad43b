"""One loop owns the engine: it admits sequences, prefills them in chunks and decodes every
running sequence in one batched step (continuous batching, as in Orca (Yu et al., OSDI 2022),
vLLM and llama-server: sequences join and leave at any step).

    scheduler = Scheduler(runner, prefix_cache, max_running=8, max_waiting=64)
    scheduler.submit(group)       # raises QueueFull past the bound; never blocks
    ... group.outbox gets Started, Token..., Done per sequence (or Failed)

Each loop turn:
1. drops waiting groups and running sequences whose request was cancelled, timed out or asked
   to stop (a stop string seen by its reader), so a stop lands within one step or one chunk;
2. admits waiting groups first come, first served while rows are free; a sequence starts from
   the longest cached prefix of its tenant (fermi/prefix_cache.py);
3. runs one prefill chunk (PREFILL_CHUNK tokens): of every new prompt at once when they can
   share a run, else of the oldest prompt and of the one closest to its end in turn, so a long
   prompt delays the others' next token by one chunk at most and a short request does not wait
   for the whole of it;
4. runs one decode step over every decoding sequence, batched; samples each sequence's next
   token with its own sampler (penalties, logit_bias, grammar masks) and posts it.
A finished sequence's KV (prompt and generated tokens) goes to the prefix cache.

The loop never waits for readers: tokens queue in each group's outbox, and the readers (the
runtime's text pipelines, on the transports' threads) turn them into text.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fermi.batching import PooledRunner, Row, SingleRunner
from fermi.errors import InvalidRequest, QueueFull
from fermi.generate import PREFILL_CHUNK, SCORED_CHUNK
from fermi.prefix_cache import Entry, PrefixCache
from fermi.sampling import SampledToken, Sampler

RIDE_TOKENS = 8  # a prompt this close to its end, after a cached prefix, rides the decode steps


@dataclass
class Started:
    index: int
    cached_tokens: int


@dataclass
class Token:
    index: int
    token: SampledToken


@dataclass
class Done:
    """A sequence ended: `reason` is stop (eos or asked to stop), length, cancelled or timeout;
    `entry` is the prefix-cache entry of its KV (None when nothing was kept)."""

    index: int
    reason: str
    entry: Entry | None


@dataclass
class Failed:
    error: BaseException


@dataclass(eq=False)
class Sequence:
    """One choice of a request, as the loop runs it."""

    index: int
    sampler: Sampler
    max_new_tokens: int
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # the loop's state
    row: Row | None = None
    fed: list[int] = field(default_factory=list)  # ids whose KV is in the row
    pending: int | None = None  # sampled, not yet fed
    generated: int = 0
    state: str = "waiting"  # waiting, prefill, decode, done


@dataclass(eq=False)
class Group:
    """A request's sequences: they share the prompt, whose KV the first prefills and the
    others copy (n > 1). `signal` is the request's StopSignal (cancel or deadline);
    `on_logits(start, (S, V) logits)` gets every prompt position's logits (prompt logprobs:
    no cached prefix is used then)."""

    tenant: str
    prompt_ids: list[int]
    sequences: list[Sequence]
    eos_ids: set[int]
    signal: object  # is_set() and reason, like fermi.runtime.StopSignal
    reuse_prefix: bool = True
    on_logits: Callable[[int, np.ndarray], None] | None = None
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


class Scheduler:
    def __init__(
        self,
        runner: PooledRunner | SingleRunner,
        prefix_cache: PrefixCache,
        max_running: int,
        max_waiting: int,
    ):
        self.runner = runner
        self.prefix_cache = prefix_cache
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._waiting: deque[Group] = deque()
        self._running: list[Sequence] = []
        self._groups: dict[Sequence, Group] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._prefill_turns = 0
        self._thread = threading.Thread(target=self._loop, name="fermi-scheduler", daemon=True)
        self._thread.start()

    # -- the readers' side -----------------------------------------------------------------------

    def submit(self, group: Group) -> None:
        """Queue a group (`submit_all` of one)."""
        self.submit_all([group])

    def submit_all(self, groups: list[Group]) -> None:
        """Queue groups together: all of them, or none. Raises QueueFull when, counted after
        those already queued and each other, `max_waiting` groups would wait beyond those the
        free rows will take at the loop's next turn (a burst arrives faster than the loop admits
        it: 100 requests at once on 16 free rows and a queue of 64 take 80), and InvalidRequest
        when a group has more sequences than ever run at once."""
        for group in groups:
            if len(group.sequences) > self.max_running:
                raise InvalidRequest(
                    f"n={len(group.sequences)} is more than the {self.max_running} sequences "
                    "this server runs at once (its batch limit: --max-num-seqs, "
                    "FERMI_ENGINE_POOL)",
                    param="n",
                )
        if len(groups) > 1 and self._beyond(self.max_running, groups) > self.max_waiting:
            raise InvalidRequest(
                f"{len(groups)} requests together are more than this server ever takes at once "
                f"(with {len(groups[0].sequences)} sequences each: its batch limit "
                f"{self.max_running} plus {self.max_waiting} waiting); send fewer together",
                param="prompt",
            )
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            for i, group in enumerate(groups):
                ahead = self._queued_ahead(group, groups[:i])
                if ahead is not None and ahead >= self.max_waiting:
                    raise QueueFull(
                        f"the server is at capacity ({len(self._running)} running, "
                        f"{len(self._waiting)} waiting); retry shortly"
                    )
            self._waiting.extend(groups)
            self._wake.notify()

    @staticmethod
    def _beyond(rows: int, groups: list[Group]) -> int:
        """How many of `groups`, queued in order on `rows` free rows, the rows do not take at
        the loop's next turn (it stops at the first that does not fit)."""
        beyond = 0
        for group in groups:
            if beyond == 0 and len(group.sequences) <= rows:
                rows -= len(group.sequences)
            else:
                beyond += 1
        return beyond

    def _queued_ahead(self, group: Group, before: list[Group]) -> int | None:
        """None when `group`, queued after the waiting groups and `before`, will run at the
        loop's next turn (the free rows take it and every group before it: admission is first
        come, first served and stops at the first group that does not fit); else how many
        groups ahead of it the free rows will not take. Holds the lock."""
        rows = self.max_running - len(self._running)
        queued = [*self._waiting, *before]
        beyond = self._beyond(rows, queued)
        if beyond == 0 and self._beyond(rows, [*queued, group]) == 0:
            return None
        return beyond

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """End the loop: what still waits or runs is finished as cancelled. True when the loop
        left within `timeout_s` (no step still inside onnxruntime)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception as error:  # an engine failure: fail what ran, keep serving
                self._fail_running(error)
        self._shut()

    def _turn(self) -> None:
        self._drop_stopped()
        self._admit()
        self._prefill_chunk()
        self._decode_step()

    def _drop_stopped(self) -> None:
        with self._lock:
            waiting = [g for g in self._waiting if g.signal.is_set()]
            for group in waiting:
                self._waiting.remove(group)
        for group in waiting:
            for seq in group.sequences:
                seq.state = "done"
                group.outbox.put(Done(seq.index, group.signal.reason or "cancelled", None))
        for seq in list(self._running):
            group = self._groups[seq]
            if group.signal.is_set():
                self._finish(seq, group.signal.reason or "cancelled")
            elif seq.stop_requested.is_set():
                self._finish(seq, "stop")

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                group = self._waiting[0]
                if self.max_running - len(self._running) < len(group.sequences):
                    return
                self._waiting.popleft()
                for seq in group.sequences:
                    seq.row = self.runner.acquire()
                    seq.state = "prefill" if seq is group.sequences[0] else "fork"
                    self._running.append(seq)
                    self._groups[seq] = group
            self._start(group)

    def _start(self, group: Group) -> None:
        """Load the longest cached prefix into the first sequence's row."""
        first = group.sequences[0]
        cached = 0
        if group.reuse_prefix:
            entry, cached = self.prefix_cache.lookup(
                group.tenant, group.prompt_ids, len(group.prompt_ids) - 1
            )
            if cached:
                self.runner.load(first.row, entry.block, cached)
        first.fed = list(group.prompt_ids[:cached])
        for seq in group.sequences:
            group.outbox.put(Started(seq.index, cached))

    def _prefill_chunk(self) -> None:
        """One prefill run: the first chunk of every new prompt at once when they can share a
        run (a burst of new requests), else the next chunk of the oldest prompt."""
        waiting = [s for s in self._running if s.state == "prefill" and not self._rides(s)]
        if not waiting:
            return
        if self._groups[waiting[0]].on_logits is not None:
            self._prefill_scored(waiting[0])
            return
        fresh = [s for s in waiting if not s.fed and self._groups[s].on_logits is None]
        if len(fresh) > 1 and self.runner.can_prefill_together([s.row for s in fresh]):
            size = max(16, PREFILL_CHUNK // len(fresh))
            chunks = [self._groups[s].prompt_ids[:size] for s in fresh]
            logits = self.runner.prefill_together([s.row for s in fresh], chunks)
            for seq, chunk, row_logits in zip(fresh, chunks, logits, strict=True):
                seq.fed.extend(chunk)
                self._prefilled(seq, row_logits)
            return
        # Turns alternate between the oldest prompt and the one closest to its end, so a
        # short request is not held behind the whole of a long prompt's prefill.
        self._prefill_turns += 1
        seq = waiting[0]
        if self._prefill_turns % 2 == 0:
            seq = min(waiting, key=lambda s: len(self._groups[s].prompt_ids) - len(s.fed))
        chunk = self._groups[seq].prompt_ids[len(seq.fed) : len(seq.fed) + PREFILL_CHUNK]
        logits = self.runner.prefill(seq.row, chunk)
        seq.fed.extend(chunk)
        self._prefilled(seq, logits)

    def _prefill_scored(self, seq: Sequence) -> None:
        """A chunk of a prompt whose every position's logits go to `on_logits`."""
        group = self._groups[seq]
        start = len(seq.fed)
        chunk = group.prompt_ids[start : start + SCORED_CHUNK]
        every = self.runner.prefill(seq.row, chunk, last_only=False)
        group.on_logits(start, every)
        seq.fed.extend(chunk)
        self._prefilled(seq, every[-1].copy())

    def _prefilled(self, seq: Sequence, logits: np.ndarray) -> None:
        """After a chunk: once the whole prompt is in, every choice samples its first token.
        The others copy the prompt's KV first, all of them before any samples: a choice that
        ends on its first token (max_tokens 1, an end token) frees its row."""
        group = self._groups[seq]
        if len(seq.fed) < len(group.prompt_ids):
            return
        for sibling in group.sequences:
            if sibling is not seq and sibling.row is not None:
                self.runner.fork(seq.row, sibling.row)
                sibling.fed = list(seq.fed)
        for sibling in group.sequences:
            if sibling.state != "done":
                self._sample(sibling, logits, group)

    def _rides(self, seq: Sequence) -> bool:
        """A prompt whose last few tokens follow a cached prefix goes through the decode steps
        a token at a time (GroupQueryAttention batches only one new token per row when rows
        have a past), instead of a prefill run of its own."""
        group = self._groups[seq]
        left = len(group.prompt_ids) - len(seq.fed)
        return bool(seq.fed) and left <= RIDE_TOKENS and group.on_logits is None

    def _decode_step(self) -> None:
        """One batched step: the next token of every decoding sequence, and the next prompt
        token of every prompt riding along."""
        batch = [s for s in self._running if s.state == "decode"]
        riders = [s for s in self._running if s.state == "prefill" and self._rides(s)]
        if not batch and not riders:
            return
        tokens = [s.pending for s in batch]
        tokens += [self._groups[s].prompt_ids[len(s.fed)] for s in riders]
        logits = self.runner.decode([s.row for s in batch + riders], tokens)
        for seq, row_logits in zip(batch, logits[: len(batch)], strict=True):
            seq.fed.append(seq.pending)
            seq.pending = None
            self._sample(seq, row_logits, self._groups[seq])
        for seq, token, row_logits in zip(
            riders, tokens[len(batch) :], logits[len(batch) :], strict=True
        ):
            seq.fed.append(token)
            self._prefilled(seq, row_logits)

    def _sample(self, seq: Sequence, logits: np.ndarray, group: Group) -> None:
        if seq.max_new_tokens <= 0:  # scoring a prompt only
            self._finish(seq, "length")
            return
        try:
            token = seq.sampler.sample_token(logits)
        except Exception as error:  # a sampler or grammar failure ends this sequence only
            group.outbox.put(Failed(error))
            self._finish(seq, "stop")
            return
        seq.generated += 1
        group.outbox.put(Token(seq.index, token))
        if token.id in group.eos_ids:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_new_tokens:
            self._finish(seq, "length")
        else:
            seq.pending = token.id
            seq.state = "decode"

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Leave the batch: keep the row's KV in the prefix cache (the first choice's only:
        the others share its prompt), free the row, tell the reader."""
        group = self._groups.pop(seq)
        entry = None
        try:
            if seq.index == 0 and seq.row.length and seq.state != "fork":
                block = self.runner.save(seq.row)
                entry = self.prefix_cache.insert(group.tenant, seq.fed, block)
        finally:
            self.runner.release(seq.row)
            seq.row = None
            seq.state = "done"
            with self._lock:
                self._running.remove(seq)
            group.outbox.put(Done(seq.index, reason, entry))

    def _fail_running(self, error: Exception) -> None:
        """An engine run failed: every running sequence ends with the error, then Done (the
        reader raises at Failed and waits for each choice's Done before it returns)."""
        for seq in list(self._running):
            group = self._groups.pop(seq)
            self.runner.release(seq.row)
            seq.state = "done"
            with self._lock:
                self._running.remove(seq)
            group.outbox.put(Failed(error))
            group.outbox.put(Done(seq.index, "error", None))

    def _shut(self) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for group in waiting:
            for seq in group.sequences:
                group.outbox.put(Done(seq.index, "cancelled", None))
        for seq in list(self._running):
            self._finish(seq, "cancelled")
