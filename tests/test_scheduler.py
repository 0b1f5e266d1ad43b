"""The scheduler: batched decode equals one-at-a-time decode, prefix-cache hits equal fresh
prefills, cancellation lands within one chunk or step, n > 1 shares one prefill."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fermi.batching import WARM_UP_TOKENS, PooledRunner, SingleRunner, warm_up
from fermi.engine import Engine
from fermi.errors import InvalidRequest, QueueFull
from fermi.generate import generate_tokens
from fermi.kv_pool import GraphMover, HostMover, KVBlock, KVPool
from fermi.prefix_cache import PrefixCache
from fermi.requests import GenerationRequest, Message, SamplingParams, TextDelta
from fermi.runtime import Runtime
from fermi.sampling import Sampler, resolve_sampling
from fermi.scheduler import Done, Group, Scheduler, Sequence, Started, Token
from fermi.settings import Settings

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [
    list(range(3, 40)),
    [7, 8, 9],
    list(range(100, 400)),  # crosses the pool's first capacity step
    [11] * 17,
    list(range(50, 61)),
    [5],
]
LENGTHS = [20, 35, 8, 300, 12, 27]  # leave at different steps; one grows the pool


@pytest.fixture(scope="module")
def engine(tiny_cpu_artifact):
    return Engine(tiny_cpu_artifact, device="cpu", threads=1)


def greedy_sampler() -> Sampler:
    return Sampler(resolve_sampling(GREEDY, {}, False, None))


def alone(engine, prompt, count) -> list[int]:
    """The reference: batch 1 on a cache of its own (fermi/generate.py)."""
    steps = generate_tokens(
        engine,
        engine.new_cache(),
        prompt,
        prompt,
        greedy_sampler(),
        count,
        set(),
        threading.Event(),
    )
    return [t.id for t in steps]


class Signal:
    def __init__(self):
        self.reason = None

    def set(self):
        self.reason = "cancelled"

    def is_set(self):
        return self.reason is not None


def group_for(prompt, count, tenant="t", n=1, signal=None) -> Group:
    sequences = [Sequence(i, greedy_sampler(), count) for i in range(n)]
    return Group(tenant, list(prompt), sequences, set(), signal or Signal())


def collect(group: Group) -> tuple[dict[int, list[int]], dict[int, str], int]:
    """Token ids per choice, finish reason per choice, cached tokens."""
    tokens = {s.index: [] for s in group.sequences}
    reasons, cached = {}, 0
    while len(reasons) < len(group.sequences):
        message = group.outbox.get(timeout=120)
        if isinstance(message, Started):
            cached = message.cached_tokens
        elif isinstance(message, Token):
            tokens[message.index].append(message.token.id)
        elif isinstance(message, Done):
            reasons[message.index] = message.reason
        else:
            raise message.error
    return tokens, reasons, cached


def test_batched_decode_equals_sequential_with_joins_and_leaves(engine):
    scheduler = Scheduler(PooledRunner(engine, 4), PrefixCache(0), 4, 16)
    try:
        groups = [
            group_for(p, n, tenant=str(i))
            for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True))
        ]
        for group in groups[:3]:
            scheduler.submit(group)
        first = collect(groups[0])  # the rest join while others run, as rows free up
        for group in groups[3:]:
            scheduler.submit(group)
        results = [first] + [collect(g) for g in groups[1:]]
    finally:
        scheduler.stop()
    for prompt, count, (tokens, reasons, _) in zip(PROMPTS, LENGTHS, results, strict=True):
        assert tokens[0] == alone(engine, prompt, count)
        assert reasons[0] == "length"


def test_single_runner_matches_too(engine, tiny_artifact):
    """The one-at-a-time runner (portable and coreml graphs) behind the same scheduler."""
    portable = Engine(tiny_artifact, device="cpu", threads=1)
    assert portable.manifest.io_mode == "concat"
    scheduler = Scheduler(SingleRunner(portable, 3), PrefixCache(0), 3, 16)
    try:
        groups = [group_for(p, 10, tenant=str(i)) for i, p in enumerate(PROMPTS[:4])]
        for group in groups:
            scheduler.submit(group)
        results = [collect(g)[0][0] for g in groups]
    finally:
        scheduler.stop()
    assert results == [alone(portable, p, 10) for p in PROMPTS[:4]]


def test_prefix_cache_hit_equals_fresh_prefill(engine):
    cache = PrefixCache(1 << 30)
    scheduler = Scheduler(PooledRunner(engine, 2), cache, 2, 16)
    system = list(range(200, 290))
    try:
        first = group_for(system + [1, 2, 3], 6)
        scheduler.submit(first)
        collect(first)
        second = group_for(system + [4, 5], 9)
        scheduler.submit(second)
        tokens, _, cached = collect(second)
        other = group_for(system + [4, 5], 9, tenant="another key")
        scheduler.submit(other)
        _, _, other_cached = collect(other)
    finally:
        scheduler.stop()
    assert cached == len(system)  # the shared system prompt, nothing after it
    assert tokens[0] == alone(engine, system + [4, 5], 9)
    assert other_cached == 0  # tenants never share entries


def test_cancel_during_prefill_stops_within_one_chunk(engine):
    chunks = []

    class Counting(PooledRunner):
        def prefill(self, row, token_ids, last_only=True):
            chunks.append(len(token_ids))
            signal.set()  # the client leaves during the first chunk
            return super().prefill(row, token_ids, last_only)

    signal = Signal()
    scheduler = Scheduler(Counting(engine, 1), PrefixCache(0), 1, 4)
    try:
        group = group_for(list(range(3, 1500)), 50, signal=signal)
        scheduler.submit(group)
        tokens, reasons, _ = collect(group)
        after = group_for([1, 2, 3], 4)  # the engine is free again at once
        scheduler.submit(after)
        assert collect(after)[0][0] == alone(engine, [1, 2, 3], 4)
    finally:
        scheduler.stop()
    assert reasons == {0: "cancelled"} and tokens == {0: []}
    assert chunks[0] == 512 and len(chunks) == 2  # one chunk of the long prompt, then `after`


def test_cancel_while_decoding_stops_within_one_step(engine):
    """The client leaves during the fifth decode step: that step's token is the last."""
    steps = []

    class Counting(PooledRunner):
        def decode(self, rows, token_ids):
            steps.append(len(rows))
            if len(steps) == 5:
                signal.set()
            return super().decode(rows, token_ids)

    signal = Signal()
    scheduler = Scheduler(Counting(engine, 1), PrefixCache(0), 1, 4)
    try:
        group = group_for([1, 2, 3], 10_000, signal=signal)
        scheduler.submit(group)
        tokens, reasons, _ = collect(group)
    finally:
        scheduler.stop()
    assert reasons == {0: "cancelled"} and len(steps) == 5
    assert len(tokens[0]) == 6  # the prefill's token and one per decode step


def test_stop_request_and_cancel_while_decoding(engine):
    scheduler = Scheduler(PooledRunner(engine, 2), PrefixCache(0), 2, 4)
    try:
        stopped, cancelled = group_for([1, 2, 3], 10_000), group_for([4, 5, 6], 10_000)
        scheduler.submit(stopped)
        scheduler.submit(cancelled)
        assert isinstance(stopped.outbox.get(timeout=60), Started)
        assert isinstance(stopped.outbox.get(timeout=60), Token)
        stopped.sequences[0].stop_requested.set()  # a stop string seen by the reader
        cancelled.signal.set()
        assert collect(stopped)[1] == {0: "stop"}
        assert collect(cancelled)[1] == {0: "cancelled"}
        assert scheduler.running == 0
    finally:
        scheduler.stop()


def test_n_choices_share_one_prefill(engine):
    prefills = []

    class Counting(PooledRunner):
        def prefill(self, row, token_ids, last_only=True):
            prefills.append(len(token_ids))
            return super().prefill(row, token_ids, last_only)

    scheduler = Scheduler(Counting(engine, 4), PrefixCache(0), 4, 4)
    prompt = list(range(10, 60))
    try:
        group = group_for(prompt, 7, n=3)
        scheduler.submit(group)
        tokens, reasons, _ = collect(group)
    finally:
        scheduler.stop()
    assert prefills == [len(prompt)]  # one prefill; the others copied its KV
    expected = alone(engine, prompt, 7)
    assert tokens == {0: expected, 1: expected, 2: expected}
    assert reasons == {0: "length", 1: "length", 2: "length"}


@pytest.mark.parametrize("ending", ["length", "stop"])
def test_n_choices_whose_first_token_ends_the_first_one(engine, ending):
    """n = 2 where choice 0 ends on its first token (max_tokens 1, or its first token is an
    end token): its row is freed when it ends, after every choice has its copy of the prompt's
    KV; each choice gets its token, and a generation already running goes on."""
    prompt = list(range(10, 60))
    first = alone(engine, prompt, 1)[0]
    scheduler = Scheduler(PooledRunner(engine, 4), PrefixCache(0), 4, 4)
    try:
        running = group_for(list(range(5, 30)), 40, tenant="other")
        scheduler.submit(running)
        if ending == "length":
            group = group_for(prompt, 1, n=2)
        else:
            sequences = [Sequence(i, greedy_sampler(), 8) for i in range(2)]
            group = Group("t", list(prompt), sequences, {first}, Signal())
        scheduler.submit(group)
        tokens, reasons, _ = collect(group)
        other, other_reasons, _ = collect(running)
    finally:
        scheduler.stop()
    assert tokens[0][0] == tokens[1][0] == first
    assert reasons == {0: ending, 1: ending}
    assert other[0] == alone(engine, list(range(5, 30)), 40) and other_reasons[0] == "length"


def test_queue_bound_and_oversized_groups(engine):
    scheduler = Scheduler(PooledRunner(engine, 1), PrefixCache(0), 1, 1)
    try:
        with pytest.raises(InvalidRequest):
            scheduler.submit(group_for([1], 2, n=2))
        running = group_for([1, 2], 100_000)
        scheduler.submit(running)
        assert isinstance(running.outbox.get(timeout=60), Started)
        scheduler.submit(group_for([3], 2))  # waits
        with pytest.raises(QueueFull):
            scheduler.submit(group_for([4], 2))
        running.signal.set()
    finally:
        scheduler.stop()


@pytest.mark.parametrize("mover", ["host", "graph"])
def test_pool_moves_keep_every_value(mover):
    """Growing the pool, saving a row, loading a block and copying a row keep the values; the
    graph mover (the device path) does the same as numpy when run on the CPU."""
    if mover == "host":
        chosen, wrap = HostMover(), np.ascontiguousarray
    else:
        chosen = GraphMover(np.float32, ["CPUExecutionProvider"], "cpu")
        wrap = lambda v: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))  # noqa: E731
    pool = KVPool(2, 2, 8, np.float32, 4, 1024, chosen)
    pool.reserve(2, 10)
    rng = np.random.default_rng(0)
    wanted = [rng.standard_normal((1, 2, 10, 8)).astype(np.float32) for _ in range(4)]
    pool.load(1, KVBlock([wrap(v) for v in wanted], 10, 0), 10)
    pool.reserve(4, 600)  # rows and capacity grow
    assert (pool.rows, pool.capacity) == (4, 600)
    pool.copy_row(1, 3, 10)
    for row in (1, 3):
        for got, want in zip(pool.save(row, 10).values, wanted, strict=True):
            got = got if isinstance(got, np.ndarray) else got.numpy()
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("graph", ["cpu", "portable"])
def test_runtime_streams_run_in_one_batch_and_keep_their_own_text(
    graph, tiny_cpu_artifact, tiny_artifact
):
    """Through the runtime: concurrent requests decode together and each gets exactly what it
    gets alone; a stock client resending a conversation hits the prefix cache."""
    artifact = tiny_cpu_artifact if graph == "cpu" else tiny_artifact
    runtime = Runtime.load(Settings(model=str(artifact), device="cpu", engine_pool=4))
    questions = ["Tell me a story", "What is 2 + 2?", "Name a colour", "Say hi"]

    def ask(question, tenant):
        request = GenerationRequest(
            [Message("user", question)],
            max_new_tokens=24,
            sampling=GREEDY,
            thinking="off",
            ignore_eos=True,
            tenant=tenant,
        )
        return runtime.submit(request)

    try:
        alone_texts = []
        for i, q in enumerate(questions):
            events = list(ask(q, f"alone-{i}"))
            alone_texts.append("".join(e.text for e in events if isinstance(e, TextDelta)))
        generations = [ask(q, f"together-{i}") for i, q in enumerate(questions)]
        outputs = [[] for _ in questions]
        threads = [
            threading.Thread(target=lambda g=g, o=o: o.extend(g))
            for g, o in zip(generations, outputs, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        together = ["".join(e.text for e in o if isinstance(e, TextDelta)) for o in outputs]
        assert together == alone_texts
        again = list(ask(questions[0], "alone-0"))
        assert again[-1].usage.cached_tokens == again[-1].usage.prompt_tokens - 1
    finally:
        assert runtime.shutdown()


def test_prompts_prefilled_together_equal_alone(engine):
    """A burst of new prompts shares one padded prefill run (and the decode steps after it);
    each row's logits equal its prompt's run alone."""
    runner = PooledRunner(engine, 4)
    rows = [runner.acquire() for _ in range(3)]
    chunks = [PROMPTS[0], PROMPTS[1], PROMPTS[2][:64]]
    assert runner.can_prefill_together(rows)
    together = runner.prefill_together(rows, chunks)
    for chunk, logits in zip(chunks, together, strict=True):
        np.testing.assert_allclose(logits, engine.forward(chunk, engine.new_cache()), atol=1e-4)
    assert [r.length for r in rows] == [len(c) for c in chunks]
    assert not runner.can_prefill_together(rows)  # they have a past now
    stepped = runner.decode(rows, [1, 2, 3])
    for chunk, token, logits in zip(chunks, [1, 2, 3], stepped, strict=True):
        np.testing.assert_allclose(
            logits, engine.forward(chunk + [token], engine.new_cache()), atol=1e-4
        )


def test_runner_logits_stay_right_as_rows_and_the_pool_change_between_runs(engine):
    """The runner keeps one binding of the KV buffers across runs and reuses one logits buffer:
    every result still equals the engine's own run as the span of rows moves, the pool grows
    and shrinks, and what an earlier run returned is not overwritten by a later one."""
    runner = PooledRunner(engine, 4)

    def reference(ids):
        return engine.forward(ids, engine.new_cache())

    a, b = runner.acquire(), runner.acquire()
    first = runner.prefill(a, PROMPTS[0])
    kept = first.copy()
    np.testing.assert_allclose(first, reference(PROMPTS[0]), atol=1e-4)
    runner.prefill(b, PROMPTS[1])
    both = runner.decode([a, b], [1, 2])  # rows 0 and 1
    np.testing.assert_array_equal(first, kept)  # the prefill's logits survived two runs
    np.testing.assert_allclose(both[0], reference(PROMPTS[0] + [1]), atol=1e-4)
    np.testing.assert_allclose(both[1], reference(PROMPTS[1] + [2]), atol=1e-4)
    runner.release(a)
    alone_b = runner.decode([b], [3])  # the span starts at row 1 now
    np.testing.assert_allclose(alone_b[0], reference(PROMPTS[1] + [2, 3]), atol=1e-4)
    long = PROMPTS[2]  # crosses the pool's first capacity step: the buffers move
    version = runner.pool.version
    c = runner.acquire()
    runner.prefill(c, long)
    assert runner.pool.version != version
    step = runner.decode([c, b], [4, 5])
    np.testing.assert_allclose(step[0], reference(long + [4]), atol=1e-4)
    np.testing.assert_allclose(step[1], reference(PROMPTS[1] + [2, 3, 5]), atol=1e-4)
    every = runner.prefill(b, [6, 7], last_only=False)  # (2, V): a copy, not the buffer
    runner.decode([b], [8])
    np.testing.assert_allclose(
        every,
        [reference(PROMPTS[1] + [2, 3, 5, 6]), reference(PROMPTS[1] + [2, 3, 5, 6, 7])],
        atol=1e-4,
    )
    runner.release(b)
    grown, version = long + [4], runner.pool.version
    while runner.pool.version == version:  # the same span, until a decode step moves the pool
        logits = runner.decode([c], [9])[0]
        grown.append(9)
    np.testing.assert_allclose(logits, reference(grown), atol=1e-4)


def test_prefix_cache_lru_pins_and_tenants():
    from fermi.prefix_cache import PrefixCache

    def block(tokens):
        return KVBlock([], len(tokens), 100 * len(tokens))

    class Kept:
        stored = True

    cache = PrefixCache(max_bytes=2000)
    a = cache.insert("t", [1, 2, 3], block([1, 2, 3]))
    cache.insert("t", [1, 2, 3, 4, 5], block([1, 2, 3, 4, 5]))  # covers a: a is dropped
    assert a not in cache._entries and len(cache) == 1
    assert cache.lookup("t", [1, 2, 3, 9], 3)[1] == 3
    assert cache.lookup("u", [1, 2, 3, 9], 3) == (None, 0)  # another tenant sees nothing
    assert cache.lookup("t", [1, 2, 3, 4, 5, 6], 4)[1] == 4  # never more than the limit
    session = Kept()
    pinned = cache.insert("t", [7] * 10, block([7] * 10))
    cache.pin(pinned, session)
    cache.insert("t", [8] * 10, block([8] * 10))  # over budget: the oldest unpinned goes
    assert cache.lookup("t", [7] * 10, 9)[1] == 9 and cache.lookup("t", [1, 2, 3], 2)[1] == 0
    session.stored = False  # the session was evicted: its entry is an ordinary one now
    assert not pinned.pinned
    cache.insert("t", [9] * 10, block([9] * 10))
    cache.insert("t", [6] * 10, block([6] * 10))  # least recently used first: [8], then [7]
    assert cache.lookup("t", [7] * 10, 9)[1] == 0 and cache.lookup("t", [9] * 10, 9)[1] == 9


def test_a_burst_admitted_one_row_at_a_time_grows_the_pool_a_few_times():
    """Sixteen sequences taking rows one after another grow the pool 5 times (1, 2, 4, 8, 16
    rows), not 16 (each growth copies every row: a burst of 8 cost 1.2 s of copies on the
    Qwen3-0.6B shape before), and every row keeps its values."""
    grown = []

    class Counting(HostMover):
        def grow(self, buffer, rows, capacity, held=None):
            grown.append(rows)
            return super().grow(buffer, rows, capacity, held)

    pool = KVPool(1, 1, 8, np.float32, 16, 4096, Counting())
    rng = np.random.default_rng(0)
    wanted = [rng.standard_normal((1, 1, 5, 8)).astype(np.float32) for _ in range(16)]
    for row, value in enumerate(wanted):
        pool.reserve(row + 1, 5, held=[5] * row)
        pool.load(row, KVBlock([value, value], 5, 0), 5)
    assert sorted(set(grown)) == [2, 4, 8, 16] and pool.rows == 16
    for row, value in enumerate(wanted):
        np.testing.assert_array_equal(pool.save(row, 5).values[0], value)


@pytest.mark.parametrize("mover", ["host", "graph"])
def test_pool_growth_drops_rows_no_longer_in_use(mover):
    chosen = (
        HostMover() if mover == "host" else GraphMover(np.float32, ["CPUExecutionProvider"], "cpu")
    )
    pool = KVPool(1, 1, 8, np.float32, 16, 4096, chosen)
    pool.reserve(16, 20)  # a burst of 16 sequences
    wanted = np.arange(20 * 8, dtype=np.float32).reshape(1, 1, 20, 8)
    value = wanted if mover == "host" else ort.OrtValue.ortvalue_from_numpy(wanted)
    pool.load(0, KVBlock([value, value], 20, 0), 20)
    pool.reserve(1, 3000, held=[20])  # then one long sequence in row 0
    assert (pool.rows, pool.capacity) == (1, 3000)
    saved = pool.save(0, 20).values[0]
    np.testing.assert_array_equal(saved if mover == "host" else saved.numpy(), wanted)


def test_a_short_prompt_is_not_held_behind_a_long_prefill(engine):
    """Prefill turns alternate between the oldest prompt and the shortest: a short request
    that arrives during a long prompt's prefill gets its first token before that prefill ends."""
    order = []

    class Recording(PooledRunner):
        def prefill(self, row, token_ids, last_only=True):
            order.append((row.index, len(token_ids)))
            return super().prefill(row, token_ids, last_only)

    scheduler = Scheduler(Recording(engine, 2), PrefixCache(0), 2, 4)
    try:
        long = group_for([3 + i % 1000 for i in range(3000)], 1)
        scheduler.submit(long)
        assert isinstance(long.outbox.get(timeout=60), Started)
        short = group_for([1, 2, 3, 4], 1)
        scheduler.submit(short)
        tokens, _, _ = collect(short)
        long_chunks_before = sum(1 for index, _ in order if index == 0)
        collect(long)
    finally:
        scheduler.stop()
    assert tokens[0] == alone(engine, [1, 2, 3, 4], 1)
    assert long_chunks_before < 3000 // 512  # not after all of the long prompt


def test_an_engine_failure_ends_every_choice_and_the_runtime_keeps_serving(
    tiny_cpu_artifact, monkeypatch
):
    """A decode step that raises: the reader gets the engine's error, every choice still gets
    its Done (the reader does not sit out its drain timeout waiting for one), and the next
    request is served."""
    import fermi.runtime as runtime_module

    runtime = Runtime.load(Settings(model=str(tiny_cpu_artifact), device="cpu", engine_pool=4))
    drained = []
    real_drain = runtime_module._drain

    def recording_drain(outbox, done, entry, timeout_s=60.0):
        entry = real_drain(outbox, done, entry, timeout_s)
        drained.append(list(done))
        return entry

    monkeypatch.setattr(runtime_module, "_drain", recording_drain)
    decode = runtime.runner.decode
    calls = []

    def failing_decode(rows, token_ids):
        calls.append(len(rows))
        if len(calls) == 3:
            raise RuntimeError("injected engine failure")
        return decode(rows, token_ids)

    monkeypatch.setattr(runtime.runner, "decode", failing_decode)
    request = GenerationRequest([Message("user", "Tell me a story")], max_new_tokens=16,
                                sampling=GREEDY, ignore_eos=True, n=2)  # fmt: skip
    try:
        with pytest.raises(RuntimeError, match="injected engine failure"):
            list(runtime.submit(request))
        assert drained == [[True, True]]
        monkeypatch.setattr(runtime.runner, "decode", decode)
        events = list(runtime.submit(request))
        assert events[-1].usage.completion_tokens == 32
    finally:
        runtime.shutdown()


def test_the_pool_gives_memory_back_when_the_sequences_that_needed_it_leave(engine):
    """A long prompt grows every row to its length; once it leaves, the pool shrinks to what
    the sequences still running hold (their output unchanged by the move), and once none runs
    it is freed. It used to keep the longest request's length for good, so every later burst
    was sized to it."""
    runner = PooledRunner(engine, 4)
    scheduler = Scheduler(runner, PrefixCache(0), 4, 8)
    try:
        short = group_for([5, 6, 7], 400)  # decoding before, during and after the long one
        scheduler.submit(short)
        assert isinstance(short.outbox.get(timeout=60), Started)
        long = group_for([3 + i % 1000 for i in range(2000)], 1)
        scheduler.submit(long)
        collect(long)
        assert runner.pool.capacity < 2000 and runner.pool.rows <= 2  # read after it left
        tokens, _, _ = collect(short)
    finally:
        scheduler.stop()
    assert tokens[0] == alone(engine, [5, 6, 7], 400)
    assert (runner.pool.rows, runner.pool.capacity, runner.nbytes) == (0, 0, 0)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_rows_that_join_a_long_sequence_take_host_memory_for_what_they_hold():
    """One long sequence gives every row its capacity, but a row that joins takes host memory
    for the positions it holds: a growth copies only those, and the pages of the rest are never
    touched. It used to copy every row whole, so resident memory grew with rows x the longest
    sequence (here about 256 MiB for 16 rows)."""
    pool = KVPool(1, 4, 64, np.float32, 16, 20000, HostMover())  # 1 KiB a position and kind
    long = np.ones((1, 4, 16000, 64), np.float32)
    short = np.full((1, 4, 10, 64), 2.0, np.float32)
    held = [0]
    pool.reserve(1, 16001, held)
    pool.load(0, KVBlock([long, long], 16000, 0), 16000)
    held[0] = 16000
    before = rss_bytes()
    for row in range(1, 16):  # fifteen short sequences join, one at a time
        held.append(0)
        pool.reserve(row + 1, 11, held)
        pool.load(row, KVBlock([short, short], 10, 0), 10)
        held[row] = 10
    grown = rss_bytes() - before
    assert (pool.rows, pool.capacity) == (16, 16001)
    assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MiB"
    np.testing.assert_array_equal(pool.save(0, 16000).values[1], long)
    np.testing.assert_array_equal(pool.save(15, 10).values[0], short)


@pytest.mark.parametrize("mover", ["host", "graph"])
def test_fit_shrinks_the_pool_and_keeps_what_the_rows_hold(mover):
    chosen = (
        HostMover() if mover == "host" else GraphMover(np.float32, ["CPUExecutionProvider"], "cpu")
    )
    wrap = (lambda v: v) if mover == "host" else ort.OrtValue.ortvalue_from_numpy
    pool = KVPool(1, 1, 8, np.float32, 16, 4096, chosen)
    pool.reserve(8, 3000)
    wanted = np.arange(20 * 8, dtype=np.float32).reshape(1, 1, 20, 8)
    pool.load(1, KVBlock([wrap(wanted), wrap(wanted)], 20, 0), 20)
    pool.fit([0, 20, 0, 0, 0, 0, 0, 0])  # capacity far above need: shrinks
    assert (pool.rows, pool.capacity) == (8, 20 + 256)
    pool.fit([0, 20])  # 8 rows, 2 in use: shrinks
    assert (pool.rows, pool.capacity) == (2, 20 + 256)
    saved = pool.save(1, 20).values[0]
    np.testing.assert_array_equal(saved if mover == "host" else saved.numpy(), wanted)
    pool.fit([0, 200])  # within twice the need: left as it is
    assert (pool.rows, pool.capacity) == (2, 276)
    pool.fit([])
    assert (pool.rows, pool.capacity, pool.nbytes) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["pooled", "single"])
def test_warm_up_runs_a_prefill_and_a_decode_step_and_frees_its_row(engine, kind):
    """What the runtime runs at load so that the first request does not pay the session's
    first-run costs (docs/benchmarks.md, "Warm-up at load")."""
    calls = []
    base = PooledRunner if kind == "pooled" else SingleRunner

    class Counting(base):
        def prefill(self, row, token_ids, last_only=True):
            calls.append(("prefill", len(token_ids)))
            return super().prefill(row, token_ids, last_only)

        def decode(self, rows, token_ids):
            calls.append(("decode", len(rows)))
            return super().decode(rows, token_ids)

    runner = Counting(engine, 2)
    warm_up(runner)
    assert calls[0] == ("prefill", WARM_UP_TOKENS) and ("decode", 1) in calls
    assert runner.rows == [None, None] and runner.nbytes == 0


def test_an_entry_larger_than_the_cache_evicts_nothing():
    """A prompt whose KV is over FERMI_KV_CACHE_MB on its own used to push every entry out and
    then go itself, so one long request emptied the cache for every client."""
    cache = PrefixCache(max_bytes=1000)
    cache.insert("t", [1, 2, 3], KVBlock([], 3, 300))
    cache.insert("t", [1, 2, 3, 4] * 5, KVBlock([], 20, 2000))  # covers the first; too big
    assert cache.lookup("t", [1, 2, 3, 9], 3)[1] == 3 and cache.nbytes == 300


def test_the_batch_reports_the_kv_its_rows_hold_on_the_host(engine):
    """fermi_kv_cache_bytes counts what the rows hold, which is what they take in host memory,
    not rows x the longest row."""
    runner = PooledRunner(engine, 2)
    long, short = runner.acquire(), runner.acquire()
    runner.prefill(long, list(range(3, 303)))
    runner.prefill(short, [5, 6, 7])
    per_token = runner.pool.bytes_per_token
    assert runner.nbytes == 303 * per_token < runner.pool.nbytes


@contextmanager
def held_inside_a_turn(engine):
    """A scheduler of 4 rows and a queue of 2 whose loop is held inside the prefill of a first
    request (one busy row), as when requests arrive faster than the loop admits them. Yields
    (scheduler, first, release); `release()` lets the loop go on."""
    entered, release = threading.Event(), threading.Event()

    class Blocking(PooledRunner):
        def prefill(self, row, token_ids, last_only=True):
            entered.set()
            release.wait(60)  # the loop stays inside this turn while the test submits
            return super().prefill(row, token_ids, last_only)

    scheduler = Scheduler(Blocking(engine, 4), PrefixCache(0), 4, 2)
    try:
        first = group_for([1, 2, 3], 2)
        scheduler.submit(first)
        assert entered.wait(60)
        yield scheduler, first, release.set
    finally:
        release.set()
        scheduler.stop()


def test_groups_submitted_together_are_queued_all_or_none(engine):
    """The prompts of one completions batch: a batch that does not fit whole is refused and
    leaves nothing queued (a batch refused halfway used to hold places until the loop dropped
    them, refusing other requests meanwhile), and one that fits is queued whole. Here 4 rows,
    one busy, and a queue of 2: a batch of 6 is refused, a batch of 5 is taken, and then
    nothing more."""
    with held_inside_a_turn(engine) as (scheduler, first, release):
        with pytest.raises(QueueFull):
            scheduler.submit_all([group_for([4, 5, i], 2) for i in range(6)])
        assert scheduler.waiting == 0
        batch = [group_for([4, 5, i], 2) for i in range(5)]
        scheduler.submit_all(batch)
        assert scheduler.waiting == 5
        with pytest.raises(QueueFull):
            scheduler.submit(group_for([6, 7, 8], 2))
        release()
        for group in [first, *batch]:
            assert collect(group)[1] == {0: "length"}


def test_a_burst_fills_the_free_rows_before_the_queue_bound_counts(engine):
    """Requests that arrive faster than the loop admits them: those the free rows will take
    count against the rows, not against the queue (a burst of 100 on 16 free rows and a queue of
    64 refused 30 where 20 is the bound). Here 4 rows, one busy, and a queue of 2: 3 + 2 more
    are taken, the next is refused."""
    with held_inside_a_turn(engine) as (scheduler, first, release):
        burst = [group_for([4, 5, i], 2) for i in range(5)]
        for group in burst:
            scheduler.submit(group)
        with pytest.raises(QueueFull):
            scheduler.submit(group_for([6, 7, 8], 2))
        release()
        for group in [first, *burst]:
            assert collect(group)[1] == {0: "length"}
