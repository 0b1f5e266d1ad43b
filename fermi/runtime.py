"""The shared session runtime that the CLI, the OpenAI server and the gRPC server sit on.

    runtime = Runtime.load(settings)
    gen = runtime.submit(request)   # validates, tokenizes, reserves session and queue place;
                                    # raises InvalidRequest, ContextLengthExceeded, SessionBusy,
                                    # QueueFull before anything runs
    for event in gen: ...           # TextDelta..., then one Finished (blocking)
    async for event in gen.aiter()  # the same from an event loop; leaving early cancels
    gen.cancel()                    # any thread; honoured within one decode step

Per request the data flows one way: messages -> chat template -> token ids -> session cache
reuse -> engine (prefill, decode) -> sampler -> detokenizer -> stop strings -> reasoning split.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from fermi.batching import runner_for, warm_up
from fermi.chat_template import (
    ChatTemplate,
    infer_reasoning_tags,
    infer_tool_call_tags,
    opens_think_block,
    resolve_thinking,
)
from fermi.constraints import Constraint, GrammarCompiler, constraint_for
from fermi.detokenizer import StreamingDetokenizer
from fermi.engine import Engine, pick_device
from fermi.errors import ContextLengthExceeded, InvalidRequest
from fermi.fim import fim_tokens
from fermi.model_info import describe
from fermi.models import resolve_artifact
from fermi.prefix_cache import Entry, PrefixCache
from fermi.requests import (
    Event,
    Finished,
    GenerationRequest,
    Message,
    PromptLogprobs,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from fermi.sampling import (
    MAX_LOGPROBS,
    ResolvedSampling,
    SampledToken,
    Sampler,
    log_softmax,
    resolve_sampling,
    top_entries,
)
from fermi.scheduler import Done, Failed, Group, Scheduler, Sequence, Started
from fermi.security import ANONYMOUS, short_id, validate_session_id
from fermi.sessions import Session, SessionLimits, SessionStore
from fermi.settings import Settings
from fermi.text_stream import OutputChannels, StopMatcher, channel_table
from fermi.token_text import TokenText
from fermi.tool_calls import (
    TOOL_CALL_FORMATS,
    HermesToolCalls,
    ToolFields,
    check_tool_results,
    id_list,
)
from fermi.tracing import GenerationTrace

# Editors send long stop lists for autocomplete (vLLM and llama-server set no limit). The stop
# matcher costs about 10 us a token with 128 short stops; the body limit bounds their text.
MAX_STOP_STRINGS = 128
MAX_CHOICES = 16  # n


@dataclass
class RuntimeStats:
    queue_depth: int
    running: int
    active_sessions: int
    kv_bytes: int


@dataclass
class Job:
    """A validated request, ready to run."""

    request: GenerationRequest
    session: Session
    conversation: list[Message]
    prompt_ids: list[int]
    max_new_tokens: int
    thinking: bool
    channel: str  # the output's first state in the channel table: reasoning, start or answer
    parse_tool_calls: bool
    constraint: Constraint | None  # the first choice's; each further choice builds its own
    sampling: ResolvedSampling
    dropped_turns: int
    signal: StopSignal
    trace: GenerationTrace = field(default_factory=GenerationTrace)  # parent: the submitter's
    # prompt logprobs, filled by the prefill: entry i scores prompt token i (none for token 0)
    prompt_entries: list[SampledToken | None] = field(default_factory=lambda: [None])
    group: Group | None = None


class Runtime:
    def __init__(self, settings: Settings, artifact: Path, device: str):
        self.settings = settings
        self.engine = Engine(
            artifact,
            device=device,
            threads=settings.threads,
            spin=settings.spin,
            huge_pages=settings.huge_pages,
        )
        self.manifest = self.engine.manifest
        self.tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
        self.template = ChatTemplate.from_dir(artifact, override=settings.chat_template)
        self.token_text = TokenText(self.tokenizer)
        self.fim = fim_tokens(self.tokenizer.get_vocab(with_added_tokens=True))
        config_path = artifact / "generation_config.json"
        self.generation_config = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        self.eos_ids = set(self.manifest.eos_token_ids)
        self._family_tags()
        self.grammars = GrammarCompiler(
            self.tokenizer, self.manifest.vocab_size, self.manifest.eos_token_ids
        )
        self.info = describe(settings, self.manifest, self.template.source)
        self.context_length = self.info.context_length  # --ctx-size caps the model's
        self.model_id = self.info.id
        self.sessions = SessionStore(
            SessionLimits(
                ttl_s=settings.session_ttl_s,
                max_sessions=settings.session_max,
                max_kv_bytes=settings.kv_cache_mb * 1024 * 1024,
                unclaimed_ttl_s=settings.session_unclaimed_ttl_s,
            )
        )
        self.sessions.start_reaper()
        self._live: set[Generation] = set()  # submitted and not yet released
        self._live_lock = threading.Lock()
        self._live_changed = threading.Condition(self._live_lock)
        self.prefix_cache = PrefixCache(settings.kv_cache_mb * 1024 * 1024)
        batch = max(1, settings.engine_pool)
        self.runner = runner_for(self.engine, batch)
        warm_up(self.runner)
        self.scheduler = Scheduler(self.runner, self.prefix_cache, batch, settings.max_queue)

    def _family_tags(self) -> None:
        """Reasoning and tool-call tags from the manifest, else inferred from the template."""
        manifest, source = self.manifest, self.template.source
        self.reasoning_tags = manifest.reasoning_tags or infer_reasoning_tags(
            source, bool(manifest.supports_thinking)
        )
        tags, fmt = manifest.tool_call_tags, manifest.tool_call_format
        if not tags:
            tags, fmt = infer_tool_call_tags(source)
        self.tool_call_tags = tags if fmt in TOOL_CALL_FORMATS else None

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        device = pick_device(settings.device)
        artifact = resolve_artifact(settings.model, settings.precision, settings)
        return cls(settings, artifact, device)

    # -- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Generation:
        """Validate and queue a request. Its session is looked up in the namespace of
        `request.tenant` only. A refused request (any exception raised here) leaves no session
        and no queue place behind."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Validate and queue requests together (the prompts of one /v1/completions batch):
        all are queued, or none is and the first refusal is raised, leaving no session and no
        queue place behind, so a refused batch never holds places a moment longer."""
        prepared: list[tuple[Session, Job]] = []
        try:
            for request in requests:
                prepared.append(self._admissible(request))
            self.scheduler.submit_all([job.group for _, job in prepared])
        except BaseException:
            for session, _ in prepared:
                self.sessions.release(session)
            raise
        generations = []
        for session, job in prepared:
            self.sessions.commit(session)
            generation = Generation(self, job)
            with self._live_lock:
                self._live.add(generation)
            generations.append(generation)
        return generations

    def _admissible(self, request: GenerationRequest) -> tuple[Session, Job]:
        """A request validated, its session acquired and its job prepared (prompt rendered and
        tokenized), ready to queue. Raises what a refusal raises, holding no session then."""
        _validate(request)
        self._check_vocab(request)
        sampling = resolve_sampling(
            request.sampling,
            self.generation_config,
            thinking := resolve_thinking(
                request.thinking, self.settings, self.manifest.supports_thinking
            ),
            self.manifest.sampling_advice,
        )
        session = self.sessions.acquire(
            request.session_id, tenant=request.tenant, mint=request.keep_session
        )
        try:
            job = self._prepare(request, session, thinking, sampling)
            job.group = self._group(job, job.signal)
        except BaseException:
            self.sessions.release(session)
            raise
        return session, job

    def _check_vocab(self, request: GenerationRequest) -> None:
        """logit_bias keys must be token ids of this model: in [0, vocab_size)."""
        vocab = self.manifest.vocab_size
        for token_id in request.sampling.logit_bias or {}:
            if isinstance(token_id, int) and not 0 <= token_id < vocab:
                raise InvalidRequest(
                    f"logit_bias token ids must be in [0, {vocab}), got {token_id}",
                    param="logit_bias",
                )

    def _ended(self, generation: Generation) -> None:
        with self._live_changed:
            self._live.discard(generation)
            self._live_changed.notify_all()

    def reset_session(self, session_id: str, tenant: str = ANONYMOUS) -> None:
        """Forget a session of `tenant`, its history and the KV it pinned; SessionNotFound
        when that tenant has none by this id (whether or not another tenant has one),
        SessionBusy while it generates. Prefixes other requests left in the cache stay."""
        validate_session_id(session_id)
        session = self.sessions.reset(session_id, tenant)
        if session.cache is not None:
            self.prefix_cache.remove(session.cache)
            session.cache = None

    def cancel_all(self) -> None:
        """Cancel every live generation (each stops within one decode step); any thread."""
        with self._live_lock:
            live = list(self._live)
        for generation in live:
            generation.cancel()

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """The process is ending: cancel every live generation and wait (up to `timeout_s`)
        until each has left the engine, so that no decode step is still running inside
        onnxruntime when the interpreter exits (which aborts the process). True when all
        ended in time."""
        self.sessions.stop_reaper()
        self.cancel_all()
        deadline = time.monotonic() + timeout_s
        with self._live_changed:
            while self._live and time.monotonic() < deadline:
                self._live_changed.wait(0.05)
            ended = not self._live
        return self.scheduler.stop(max(0.1, deadline - time.monotonic())) and ended

    def stats(self) -> RuntimeStats:
        return RuntimeStats(
            queue_depth=self.scheduler.waiting,
            running=self.scheduler.running,
            active_sessions=len(self.sessions),
            kv_bytes=self.prefix_cache.nbytes + self.runner.nbytes,
        )

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, add_special=False)

    def _prepare(
        self,
        request: GenerationRequest,
        session: Session,
        thinking: bool,
        sampling: ResolvedSampling,
    ) -> Job:
        if request.prompt is not None:
            thinking, prompt, conversation, dropped = False, "", [], 0
            prompt_ids = self._raw_prompt(request)
        else:
            if request.append:
                conversation = _merge(session.history, request.messages)
                _check_appended_tool_results(conversation, request.messages)
            else:
                conversation = list(request.messages)
            prompt, prompt_ids, conversation, dropped = self._fit(conversation, thinking, request)
        max_new = request.max_new_tokens
        if max_new is None:
            max_new = self.default_max_new_tokens(len(prompt_ids))
        # A raw prompt's output stays verbatim: never split into reasoning or tool calls.
        channel = self._first_channel(prompt, thinking) if request.prompt is None else "answer"
        parse_tool_calls = request.prompt is None and self._parses_tool_calls(request)
        constraint = self._constraint(request, channel, parse_tool_calls)
        timeout_ms = self.settings.timeout_ms
        return Job(
            request=request,
            session=session,
            conversation=conversation,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            thinking=thinking,
            channel=channel,
            parse_tool_calls=parse_tool_calls,
            constraint=constraint,
            sampling=sampling,
            dropped_turns=dropped,
            signal=StopSignal(time.monotonic() + timeout_ms / 1000 if timeout_ms > 0 else None),
        )

    def default_max_new_tokens(self, prompt_tokens: int) -> int:
        """What a request that sets no limit may generate: the rest of the context, as vLLM,
        llama-server (n_predict -1), Ollama (num_predict -1) and OpenAI allow, so that a long
        reasoning or a long file is not cut off; at most `max_new_tokens`
        (FERMI_MAX_NEW_TOKENS, --max-new-tokens) when the server sets a positive one. 0, the
        default, and -1 (llama.cpp's spelling) mean no cap. Every front end leaves this to
        the runtime: the request's `max_new_tokens` is None."""
        room = self.context_length - prompt_tokens
        cap = self.settings.max_new_tokens
        return min(cap, room) if cap > 0 else room

    def _first_channel(self, prompt: str, thinking: bool) -> str:
        """Reasoning when the prompt opened the block; "start" (the output may open one) when
        thinking is on; else the answer, never split."""
        if self.reasoning_tags and opens_think_block(prompt, self.reasoning_tags[0]):
            return "reasoning"
        return "start" if thinking and self.reasoning_tags else "answer"

    def _constraint(
        self, request: GenerationRequest, channel: str, parse_tool_calls: bool
    ) -> Constraint | None:
        return constraint_for(
            request,
            self.grammars,
            self.tool_call_tags if parse_tool_calls else None,
            self.reasoning_tags if channel != "answer" else None,
            {"reasoning": "reasoning", "start": "start"}.get(channel, "grammar"),
        )

    def _parses_tool_calls(self, request: GenerationRequest) -> bool:
        """Tool calls are parsed (and may be constrained) when the request offers tools it
        does not switch off and the model has a tool-call format; forcing a call needs one.
        Tools for a model whose chat template has no tool support (info.supports_tools) are
        refused rather than silently dropped, unless tool_choice is "none"."""
        if request.tool_choice not in ("auto", "none") and not self.tool_call_tags:
            raise InvalidRequest(
                "this model has no tool-call format, so tool_choice cannot force a call",
                param="tool_choice",
            )
        if request.tools and request.tool_choice != "none" and not self.info.supports_tools:
            raise InvalidRequest(
                "this model's chat template has no tool support (it renders no tools and has "
                'no tool-call format): send no tools, or tool_choice "none"',
                param="tools",
            )
        return bool(request.tools and request.tool_choice != "none" and self.tool_call_tags)

    def _raw_prompt(self, request: GenerationRequest) -> list[int]:
        """The completions path: the prompt's ids as given, or its text encoded with the
        tokenizer's special tokens (a BOS where the model has one); no chat template."""
        prompt = request.prompt
        ids = encode(self.tokenizer, prompt, True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        vocab = self.manifest.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        needed = request.max_new_tokens or 1
        if len(ids) + needed > self.context_length:
            error = ContextLengthExceeded(len(ids), needed, self.context_length)
            error.param = "prompt"
            raise error
        return ids

    def tokenize_messages(
        self, messages: list[Message], thinking: str | None = None, add_generation_prompt=True
    ) -> list[int]:
        """The ids of `messages` rendered by the chat template, as a request would prompt."""
        enabled = resolve_thinking(thinking, self.settings, self.manifest.supports_thinking)
        prompt = self.template.render(messages, enabled, add_generation_prompt)
        return self.encode(prompt)

    def encode_special(self, text: str, add_special: bool) -> list[int]:
        """Token ids of `text` (special tokens written in it are recognised), with the
        tokenizer's BOS/EOS added when `add_special`."""
        return encode(self.tokenizer, text, add_special)

    def decode(self, token_ids: list[int], param: str = "tokens") -> str:
        """Text of `token_ids`, special tokens included. Raises InvalidRequest naming `param`
        (the request field that holds them) for ids outside the vocabulary."""
        vocab = self.manifest.vocab_size
        if any(not 0 <= i < vocab for i in token_ids):
            raise InvalidRequest(f"{param}: token ids must be in [0, {vocab})", param=param)
        # decode_batch releases the GIL while it runs (see `encode`).
        return self.tokenizer.decode_batch([token_ids], skip_special_tokens=False)[0]

    def _fit(self, conversation: list[Message], thinking: bool, request: GenerationRequest):
        """Render the prompt; when it does not fit, drop the oldest turns (session history only,
        keeping system messages) or fail with both numbers."""
        needed = request.max_new_tokens or 1
        dropped = 0
        while True:
            prompt = self.template.render(
                conversation, enable_thinking=thinking, tools=request.tools
            )
            ids = self.encode(prompt)
            if len(ids) + needed <= self.context_length:
                return prompt, ids, conversation, dropped
            shorter = _drop_oldest_turn(conversation) if request.append else None
            if shorter is None:
                raise ContextLengthExceeded(len(ids), needed, self.context_length)
            dropped += len(conversation) - len(shorter)
            conversation = shorter

    # -- generation ----------------------------------------------------------------------------

    def _run(self, job: Job) -> Iterator[Event]:
        """Turn the tokens the scheduler posts for the job's choices into events. The n > 1
        choices decode in the same batch, so their events interleave (each carries its index).
        Leaving early (close, cancel, an error) stops the choices within one step."""
        request, group, n = job.request, job.group, job.request.n
        job.trace.queued()
        texts = [self._pipeline(job, i) for i in range(n)]
        reasons: list[str | None] = [None] * n  # decided by the reader or the scheduler
        done = [False] * n  # the choice has left the batch
        generated, reasoning = [0] * n, [0] * n
        cached, entry, first_token_at = 0, None, None
        wants_prompt = request.prompt_logprobs is not None
        eos = set() if request.ignore_eos else self.eos_ids
        try:
            while not all(done):
                message = group.outbox.get()
                if isinstance(message, Failed):
                    raise message.error
                i = message.index
                if isinstance(message, Started):
                    if i == 0:
                        cached = message.cached_tokens
                        job.trace.prefill(len(job.prompt_ids), cached)
                    continue
                if wants_prompt and len(job.prompt_entries) == len(job.prompt_ids):
                    yield PromptLogprobs(list(job.prompt_ids), job.prompt_entries)
                    wants_prompt = False
                if isinstance(message, Done):
                    done[i] = True
                    entry = message.entry if i == 0 else entry
                    if reasons[i] is None:
                        reasons[i] = message.reason
                        yield from texts[i].finish(cut=message.reason != "stop")
                    continue
                if reasons[i] is not None:  # asked to stop; the scheduler has not seen it yet
                    continue
                if not generated[i] and i == 0:
                    job.trace.decode()
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                generated[i] += 1
                if message.token.id in eos:
                    reasons[i] = "stop"
                    yield from texts[i].finish()
                    continue
                deltas, stopped = texts[i].add(message.token)
                reasoning[i] += texts[i].channels.last_kind == "reasoning"
                yield from deltas
                if stopped:
                    reasons[i] = "stop"
                    group.sequences[i].stop_requested.set()
                    yield from texts[i].finish()
        finally:
            if not all(done):
                job.signal.set()  # the reader left: stop the choices, wait for them to leave
                entry = _drain(group.outbox, done, entry)
            job.trace.end(**{"gen_ai.usage.output_tokens": sum(generated)})
            self._keep_cache(job.session, entry)
        for i, text in enumerate(texts):
            if reasons[i] == "stop" and text.tool_calls:
                reasons[i] = "tool_calls"
        if job.session.persistent:
            job.session.history = job.conversation + [texts[0].as_message()]
        yield self._finished(job, reasons, sum(generated), sum(reasoning), cached, first_token_at)

    def _keep_cache(self, session: Session, entry: Entry | None) -> None:
        """A kept session pins its latest prefix-cache entry; the one it held before becomes
        an ordinary entry (least recently used first)."""
        if entry is None or not session.persistent:
            return
        old, session.cache = session.cache, entry
        self.prefix_cache.pin(entry, session)
        if old is not None and old is not entry:
            self.prefix_cache.unpin(old)

    def _pipeline(self, job: Job, index: int) -> TextPipeline:
        return TextPipeline(
            StreamingDetokenizer(self.tokenizer),
            job.request.stop,
            OutputChannels(
                channel_table(
                    self.reasoning_tags, self.tool_call_tags if job.parse_tool_calls else None
                ),
                job.channel,
            ),
            HermesToolCalls(tuple(self.tool_call_tags)) if job.parse_tool_calls else None,
            index,
        )

    def _group(self, job: Job, signal: StopSignal) -> Group:
        """The scheduler's view of a job: one sequence per choice, each with its own sampler
        (choice i draws with seed + i) and constraint."""
        request = job.request
        sequences = []
        for index in range(request.n):
            constraint = (
                job.constraint
                if index == 0
                else self._constraint(request, job.channel, job.parse_tool_calls)
            )
            sampler = Sampler(
                job.sampling,
                _choice_seed(request.sampling.seed, index),
                request.logprobs,
                constraint=constraint,
            )
            sampler.reset(job.prompt_ids)
            sequences.append(Sequence(index, sampler, job.max_new_tokens))
        wants_prompt = request.prompt_logprobs is not None
        return Group(
            tenant=request.tenant,
            prompt_ids=job.prompt_ids,
            sequences=sequences,
            eos_ids=set() if request.ignore_eos else self.eos_ids,
            signal=signal,
            # Prompt logprobs need the logits of every prompt position: nothing from cache.
            reuse_prefix=not wants_prompt,
            on_logits=(
                _PromptScorer(job.prompt_ids, request.prompt_logprobs, job.prompt_entries)
                if wants_prompt
                else None
            ),
        )

    def _finished(
        self,
        job: Job,
        reasons: list[str],
        completion: int,
        reasoning: int,
        cached: int,
        first_token_at: float | None,
    ) -> Finished:
        usage = Usage(len(job.prompt_ids), completion, reasoning, cached)
        return Finished(
            reasons[-1], usage, job.session.id, job.thinking, job.dropped_turns, reasons,
            first_token_at,
        )  # fmt: skip


def encode(tokenizer: Tokenizer, text: str, add_special: bool) -> list[int]:
    """Token ids of `text`, with the tokenizer's BOS/EOS when `add_special`. Through
    `encode_batch`, which releases the GIL while it tokenizes (tokenizers' Python bindings run it
    under `allow_threads`; `encode` holds the GIL, 3 s for a 3.6 MB prompt), so a prompt
    tokenized in a worker thread does not stall the server's event loop or the decode loop."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special)[0].ids


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i draws with seed + i; no seed (or -1) means fresh entropy for each."""
    return None if seed is None or seed < 0 else seed + index


@dataclass
class _PromptScorer:
    """Prefill's `on_logits`: scores each prompt token under the raw logits of the position
    before it (the model's own distribution: no penalties, bias or temperature), appending a
    SampledToken per token to `entries`."""

    prompt_ids: list[int]
    k: int
    entries: list[SampledToken | None]

    def __call__(self, start: int, logits) -> None:
        next_ids = self.prompt_ids[start + 1 : start + 1 + len(logits)]  # (S,) or (S - 1,)
        for first in range(0, len(next_ids), 32):  # float64 rows, 32 at a time
            rows = log_softmax(logits[first : min(first + 32, len(next_ids))])  # (<=32, V)
            self.entries.extend(
                SampledToken(token, float(row[token]), tuple(top_entries(row, self.k)))
                for row, token in zip(rows, next_ids[first : first + 32], strict=True)
            )


class TextPipeline:
    """Token ids -> final text -> output channels (reasoning, answer, tool calls) -> stop strings
    on the answer only -> events. Stop strings never look inside reasoning or tool calls."""

    def __init__(
        self,
        detokenizer: StreamingDetokenizer,
        stops: list[str],
        channels: OutputChannels,
        tool_calls: HermesToolCalls | None = None,
        index: int = 0,
    ):
        self.detokenizer = detokenizer
        self.stops = StopMatcher(stops)
        self.channels = channels
        self.tool_parser = tool_calls
        self.index = index  # the choice (n > 1)
        self.pending: list[SampledToken] = []
        self.parts: dict[str, list[str]] = {"reasoning": [], "answer": []}
        self.stopped = False

    @property
    def tool_calls(self) -> list:
        return self.tool_parser.calls if self.tool_parser else []

    def add(self, token: SampledToken) -> tuple[list[Event], bool]:
        self.pending.append(token)
        events = self._events(self.channels.feed(self.detokenizer.add_token(token.id)))
        return events, self.stopped

    def finish(self, cut: bool = False) -> list[Event]:
        """The held text at the end of a choice; `cut`: it was cut off (length, cancelled,
        timeout), so an unfinished trailing character is dropped instead of shown as U+FFFD."""
        if self.stopped:
            return []
        pieces = self.channels.feed(self.detokenizer.finalize(cut)) + self.channels.flush()
        if self.channels.table[self.channels.state].closes:  # the output ended inside a call
            pieces.append(("tool_call_end", ""))  # no closing tag
        events = self._events(pieces)
        if not self.stopped:
            events += self._answer(self.stops.flush())
        if cut and any(t.logprob is not None for t in self.pending):
            # The dropped bytes' tokens still have logprobs (spelt `bytes:...`): an empty delta
            # carries them, so logprobs cover every generated token.
            kind = "reasoning" if self.channels.in_reasoning else "answer"
            ids, logprobs = self._take_pending()
            events.append(TextDelta("", kind, ids, logprobs, self.index))
        return events

    def _events(self, pieces) -> list[Event]:
        events: list[Event] = []
        for kind, piece in pieces:
            if self.stopped:
                break
            if kind == "reasoning":
                events += self._text("reasoning", piece)
            elif kind == "answer":
                safe, self.stopped = self.stops.feed(piece)
                events += self._answer(safe)
            else:
                events += self._answer(self.stops.flush())  # a tag ends held answer text
                events += self._tool_call(kind, piece)
        return events

    def _tool_call(self, kind: str, piece: str) -> list[Event]:
        if kind == "tool_call":
            calls, plain = self.tool_parser.feed(piece), None
        else:
            calls, plain = self.tool_parser.end(closed=bool(piece))
        events: list[Event] = [
            ToolCallDelta(c.index, c.id, c.name, c.arguments, self._take_pending()[0], self.index)
            for c in calls
        ]
        return events + self._answer(plain or "")

    def _answer(self, text: str) -> list[Event]:
        return self._text("answer", text)

    def _text(self, kind: str, text: str) -> list[Event]:
        if not text:
            return []
        self.parts[kind].append(text)
        ids, logprobs = self._take_pending()
        return [TextDelta(text, kind, ids, logprobs, self.index)]

    def _take_pending(self) -> tuple[list[int], list[SampledToken]]:
        """The ids of the tokens since the last event, and those with logprobs."""
        pending, self.pending = self.pending, []
        return [t.id for t in pending], [t for t in pending if t.logprob is not None]

    def as_message(self) -> Message:
        reasoning = "".join(self.parts["reasoning"]) or None
        calls = [c.as_openai() for c in self.tool_calls] or None
        return Message(
            "assistant",
            "".join(self.parts["answer"]),
            reasoning_content=reasoning,
            tool_calls=calls,
        )


class StopSignal:
    """Why a generation stops early: `set()` (a cancel, from any thread) or its deadline (a
    time.monotonic() value, settings.timeout_ms after submit) passing. The token loop, prefill
    and the slot queue poll `is_set()` (threading.Event's interface) between steps; the first
    cause seen is latched in `reason`: "cancelled" | "timeout" | None."""

    def __init__(self, deadline: float | None) -> None:
        self._event = threading.Event()
        self.deadline = deadline
        self.reason: str | None = None

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        if self.reason is None:
            if self._event.is_set():
                self.reason = "cancelled"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.reason = "timeout"
        return self.reason is not None


class Generation:
    """One submitted request: iterate it once (blocking or async), or cancel/close it.
    `choices`: how many it generates (its n)."""

    def __init__(self, runtime: Runtime, job: Job):
        self._runtime = runtime
        self._job = job
        self._cancel = job.signal
        self._started = False
        self._released = False
        self._lock = threading.Lock()
        self.session_id = job.session.id
        self.prompt_tokens = len(job.prompt_ids)
        self.choices = job.request.n
        self.thinking = job.thinking

    def __iter__(self) -> Iterator[Event]:
        with self._lock:
            if self._started or self._released:
                raise RuntimeError("a Generation can be iterated once")
            self._started = True
        try:
            yield from self._runtime._run(self._job)
        finally:
            self._release()

    async def aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone; the cancel below stops us anyway
                self.cancel()

        def pump() -> None:
            try:
                for event in self:
                    post(event)
            except BaseException as e:  # handed to the awaiting side, which re-raises it
                post(_Failure(e))
            post(_END)

        name = f"generate-{short_id(self.session_id)}"
        threading.Thread(target=pump, name=name, daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        with self._lock:
            if self._started:
                self.cancel()
                return
            self._started = True
        self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.cancel()  # if still queued or running (never read), it leaves at the next step
        self._runtime.sessions.release(self._job.session)
        self._runtime._ended(self)


@dataclass
class _Failure:
    error: BaseException


_END = object()


def _drain(outbox: queue.SimpleQueue, done: list[bool], entry, timeout_s: float = 60.0):
    """Wait (up to `timeout_s`) for the choices still in the batch to leave; returns the
    first choice's prefix-cache entry."""
    deadline = time.monotonic() + timeout_s
    while not all(done) and (left := deadline - time.monotonic()) > 0:
        try:
            message = outbox.get(timeout=left)
        except queue.Empty:
            break
        if isinstance(message, Done):
            done[message.index] = True
            entry = message.entry if message.index == 0 else entry
    return entry


def _validate(request: GenerationRequest) -> None:
    if request.prompt is None and not request.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be in [1, {MAX_CHOICES}], got {request.n}", param="n")
    if request.n > 1 and request.session_id is not None:
        raise InvalidRequest("n > 1 cannot continue a session: drop session_id", param="n")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(request, name)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", param=name)
    # 0 only scores an echoed raw prompt (/v1/completions echo + max_tokens 0, lm-eval's
    # loglikelihood): its prompt logprobs, no new token.
    scoring = request.prompt is not None and request.prompt_logprobs is not None
    if request.max_new_tokens is not None and request.max_new_tokens < (0 if scoring else 1):
        raise InvalidRequest("max_new_tokens must be greater than 0", param="max_tokens")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}", "stop"
        )
    if any(not s for s in request.stop):
        raise InvalidRequest("stop strings must not be empty", param="stop")
    validate_session_id(request.session_id)
    _validate_tools(request)


def _validate_tools(request: GenerationRequest) -> None:
    """tool_choice names a known function, or is auto / none / required (with tools); tools
    are for chat prompts (each of n choices parses, and may be forced into, its own calls)."""
    if request.tools and request.prompt is not None:
        raise InvalidRequest("tools need chat messages, not a raw prompt", param="tools")
    choice = request.tool_choice
    if choice in ("auto", "none"):
        return
    if not request.tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
    names = {t["function"]["name"] for t in request.tools}
    if choice != "required" and choice not in names:
        raise InvalidRequest(
            f"tool_choice names the function {choice!r}, which is not in tools",
            param="tool_choice",
        )


def _merge(history: list[Message], new: list[Message]) -> list[Message]:
    """Append new turns to a session's history; a new system message replaces the old one."""
    if any(m.role == "system" for m in new):
        history = [m for m in history if m.role != "system"]
        system = [m for m in new if m.role == "system"]
        return system + history + [m for m in new if m.role != "system"]
    return history + new


def _check_appended_tool_results(conversation: list[Message], new: list[Message]) -> None:
    """The tool results among `new`, turns appended to a session's history (they end the merged
    `conversation`, system messages aside), must answer the calls of the session's last turn,
    each once and all of them: the model's next turn follows them, so a result sent later
    would answer none (tool_calls.check_tool_results). A prompt sent without results is taken:
    the history cannot be edited, so a client that will not run the calls goes on with it.
    The results are named in the order sent, as gRPC's field: InvalidRequest on
    tool_results[j] or tool_results[j].tool_call_id, or on tool_results when calls are left
    unanswered."""
    first = len(conversation) - sum(m.role != "system" for m in new)
    names = {i: f"tool_results[{j}]" for j, i in enumerate(
        i for i in range(first, len(conversation)) if conversation[i].role == "tool"
    )}  # fmt: skip

    def unanswered(i: int, ks: list[int]) -> InvalidRequest:
        ids = id_list([conversation[i].tool_calls[k]["id"] for k in ks])
        return InvalidRequest(
            "tool_results: the results sent must answer every call of the session's last turn "
            f"(the model's next turn follows them); these tool_call_ids have none: {ids}",
            param="tool_results",
        )

    def where(i: int) -> str:
        return names.get(i, "the session's last turn")

    check_tool_results(conversation, ToolFields(where, unanswered), first)


def _drop_oldest_turn(conversation: list[Message]) -> list[Message] | None:
    """Remove the oldest user turn and the replies that follow it, keeping system messages and
    the last user turn. None when nothing can be dropped."""
    users = [i for i, m in enumerate(conversation) if m.role == "user"]
    if len(users) < 2:
        return None
    start, end = users[0], users[1]
    return conversation[:start] + conversation[end:]


def _common_prefix(cached: list[int], prompt: list[int], limit: int) -> int:
    n = 0
    for a, b in zip(cached, prompt[:limit], strict=False):
        if a != b:
            break
        n += 1
    return n
