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
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from fermi.chat_template import ChatTemplate, opens_think_block, resolve_thinking
from fermi.detokenizer import StreamingDetokenizer
from fermi.engine import Engine, pick_device
from fermi.errors import ContextLengthExceeded, InvalidRequest
from fermi.generate import generate_tokens
from fermi.models import resolve_artifact
from fermi.requests import Event, Finished, GenerationRequest, Message, TextDelta, Usage
from fermi.sampling import ResolvedSampling, Sampler, resolve_sampling
from fermi.sessions import Session, SessionLimits, SessionStore
from fermi.settings import Settings
from fermi.slots import Slots, Ticket
from fermi.text_stream import ReasoningSplitter, StopMatcher

MAX_STOP_STRINGS = 16


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
    ticket: Ticket
    conversation: list[Message]
    prompt_ids: list[int]
    max_new_tokens: int
    thinking: bool
    opens_think: bool
    sampling: ResolvedSampling
    dropped_turns: int


class Runtime:
    def __init__(self, settings: Settings, artifact: Path, device: str):
        self.settings = settings
        self.engine = Engine(artifact, device=device, threads=settings.threads, spin=settings.spin)
        self.manifest = self.engine.manifest
        self.tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
        self.template = ChatTemplate.from_dir(artifact)
        config_path = artifact / "generation_config.json"
        self.generation_config = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        self.eos_ids = set(self.manifest.eos_token_ids)
        self.context_length = self.manifest.context_length
        source = self.manifest.source
        self.model_id = Path(source).name if Path(source).is_absolute() else source
        self.sessions = SessionStore(
            SessionLimits(
                ttl_s=settings.session_ttl_s,
                max_sessions=settings.session_max,
                max_kv_bytes=settings.kv_cache_mb * 1024 * 1024,
            )
        )
        self.slots = Slots(capacity=max(1, settings.engine_pool), max_waiting=settings.max_queue)

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        device = pick_device(settings.device)
        artifact = resolve_artifact(settings.model, None, settings)
        return cls(settings, artifact, device)

    # -- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Generation:
        _validate(request)
        sampling = resolve_sampling(
            request.sampling,
            self.generation_config,
            thinking := resolve_thinking(
                request.thinking, self.settings, self.model_id, self.manifest.supports_thinking
            ),
        )
        session = self.sessions.acquire(request.session_id)
        try:
            job = self._prepare(request, session, thinking, sampling)
        except BaseException:
            self.sessions.release(session)
            raise
        return Generation(self, job)

    def reset_session(self, session_id: str) -> None:
        self.sessions.reset(session_id)

    def stats(self) -> RuntimeStats:
        return RuntimeStats(
            queue_depth=self.slots.waiting,
            running=self.slots.running,
            active_sessions=len(self.sessions),
            kv_bytes=self.sessions.kv_bytes,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _prepare(
        self,
        request: GenerationRequest,
        session: Session,
        thinking: bool,
        sampling: ResolvedSampling,
    ) -> Job:
        conversation = (
            _merge(session.history, request.messages) if request.append else list(request.messages)
        )
        prompt, prompt_ids, conversation, dropped = self._fit(conversation, thinking, request)
        room = self.context_length - len(prompt_ids)
        max_new = request.max_new_tokens or min(self.settings.max_new_tokens, room)
        ticket = self.slots.reserve()
        return Job(
            request=request,
            session=session,
            ticket=ticket,
            conversation=conversation,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            thinking=thinking,
            opens_think=opens_think_block(prompt),
            sampling=sampling,
            dropped_turns=dropped,
        )

    def _fit(self, conversation: list[Message], thinking: bool, request: GenerationRequest):
        """Render the prompt; when it does not fit, drop the oldest turns (session history only,
        keeping system messages) or fail with both numbers."""
        needed = request.max_new_tokens or 1
        dropped = 0
        while True:
            prompt = self.template.render(conversation, enable_thinking=thinking)
            ids = self.encode(prompt)
            if len(ids) + needed <= self.context_length:
                return prompt, ids, conversation, dropped
            shorter = _drop_oldest_turn(conversation) if request.append else None
            if shorter is None:
                raise ContextLengthExceeded(len(ids), needed, self.context_length)
            dropped += len(conversation) - len(shorter)
            conversation = shorter

    # -- generation ----------------------------------------------------------------------------

    def _run(self, job: Job, cancel: threading.Event) -> Iterator[Event]:
        session = job.session
        if not self.slots.wait(job.ticket, cancel):
            yield self._finished(job, "cancelled", 0, 0, 0)
            return
        engine = self.engine
        cache = session.cache if session.cache is not None else engine.new_cache()
        reused = _common_prefix(session.tokens, job.prompt_ids, len(job.prompt_ids) - 1)
        cache.trim(reused)
        text = TextPipeline(StreamingDetokenizer(self.tokenizer), job.request.stop, job.opens_think)
        sampler = Sampler(job.sampling, job.request.sampling.seed)
        eos = set() if job.request.ignore_eos else self.eos_ids
        generated: list[int] = []
        reasoning_tokens = 0
        finish = "length"
        steps = generate_tokens(
            engine,
            cache,
            job.prompt_ids[reused:],
            job.prompt_ids,
            sampler,
            job.max_new_tokens,
            eos,
            cancel,
        )
        try:
            for token in steps:
                generated.append(token)
                if token in eos:
                    finish = "stop"
                    break
                deltas, stopped = text.add(token)
                reasoning_tokens += text.splitter.last_kind == "reasoning"
                yield from deltas
                if stopped:
                    finish = "stop"
                    break
            else:
                if cancel.is_set():
                    finish = "cancelled"
            yield from text.finish()
        finally:
            steps.close()
            # The engine advances the cache only after a step succeeds, so whatever happened
            # (done, cancelled, abandoned, failed) it holds exactly these tokens.
            session.cache = cache
            session.tokens = (job.prompt_ids + generated)[: cache.offset]
        if session.persistent:
            session.history = job.conversation + [text.as_message()]
        yield self._finished(job, finish, len(generated), reasoning_tokens, reused)

    def _finished(
        self, job: Job, reason: str, completion: int, reasoning: int, cached: int
    ) -> Finished:
        usage = Usage(len(job.prompt_ids), completion, reasoning, cached)
        return Finished(reason, usage, job.session.id, job.thinking, job.dropped_turns)


class TextPipeline:
    """Token ids -> final text -> stop strings -> reasoning/answer deltas."""

    def __init__(self, detokenizer: StreamingDetokenizer, stops: list[str], in_reasoning: bool):
        self.detokenizer = detokenizer
        self.stops = StopMatcher(stops)
        self.splitter = ReasoningSplitter(start_in_reasoning=in_reasoning)
        self.pending: list[int] = []
        self.parts = {"reasoning": [], "answer": []}
        self.stopped = False

    def add(self, token: int) -> tuple[list[TextDelta], bool]:
        self.pending.append(token)
        safe, self.stopped = self.stops.feed(self.detokenizer.add_token(token))
        return self._deltas(self.splitter.feed(safe)), self.stopped

    def finish(self) -> list[TextDelta]:
        if not self.stopped:
            safe, self.stopped = self.stops.feed(self.detokenizer.finalize())
            tail = safe if self.stopped else safe + self.stops.flush()
            return self._deltas(self.splitter.feed(tail) + self.splitter.flush())
        return self._deltas(self.splitter.flush())

    def _deltas(self, pieces) -> list[TextDelta]:
        deltas = []
        for kind, piece in pieces:
            if not piece:
                continue
            self.parts[kind].append(piece)
            deltas.append(TextDelta(piece, kind, self.pending))
            self.pending = []
        return deltas

    def as_message(self) -> Message:
        reasoning = "".join(self.parts["reasoning"]) or None
        return Message("assistant", "".join(self.parts["answer"]), reasoning_content=reasoning)


class Generation:
    """One submitted request: iterate it once (blocking or async), or cancel/close it."""

    def __init__(self, runtime: Runtime, job: Job):
        self._runtime = runtime
        self._job = job
        self._cancel = threading.Event()
        self._started = False
        self._released = False
        self._lock = threading.Lock()
        self.session_id = job.session.id
        self.prompt_tokens = len(job.prompt_ids)
        self.thinking = job.thinking

    def __iter__(self) -> Iterator[Event]:
        with self._lock:
            if self._started or self._released:
                raise RuntimeError("a Generation can be iterated once")
            self._started = True
        try:
            yield from self._runtime._run(self._job, self._cancel)
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

        threading.Thread(target=pump, name=f"generate-{self.session_id[:8]}", daemon=True).start()
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
        self._runtime.slots.release(self._job.ticket)
        self._runtime.sessions.release(self._job.session)


@dataclass
class _Failure:
    error: BaseException


_END = object()


def _validate(request: GenerationRequest) -> None:
    if not request.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    if request.max_new_tokens is not None and request.max_new_tokens <= 0:
        raise InvalidRequest("max_new_tokens must be greater than 0", param="max_tokens")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if any(not s for s in request.stop):
        raise InvalidRequest("stop strings must not be empty", param="stop")


def _merge(history: list[Message], new: list[Message]) -> list[Message]:
    """Append new turns to a session's history; a new system message replaces the old one."""
    if any(m.role == "system" for m in new):
        history = [m for m in history if m.role != "system"]
        system = [m for m in new if m.role == "system"]
        return system + history + [m for m in new if m.role != "system"]
    return history + new


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
