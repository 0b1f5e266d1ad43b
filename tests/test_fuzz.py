"""Schema-driven fuzzing of both servers, live on 127.0.0.1, bounded and deterministic
(hypothesis, derandomized, no example database).

HTTP: chat and responses bodies built field by field from the request schemas the server
parses (fermi/openai_server/schemas.py): each field either a value of its type, a value just
outside its range, or any JSON at all; plus valid bodies with random bytes flipped. gRPC:
GenerateRequests with every field drawn from its proto type, extreme floats included.

Every request must get an answer (none lost), with the right status: 200 with a body that the
official `openai` types accept (or a well-formed SSE stream), 400/404 in OpenAI's error shape;
never a 5xx. gRPC: OK or INVALID_ARGUMENT, never INTERNAL or UNKNOWN. The server must still be
healthy afterwards. Figures (cases, statuses) are printed at the end of each test (`-s`) and
recorded in docs/security.md."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from fermi.grpc_server import fermi_pb2 as pb
from fermi.grpc_server import fermi_pb2_grpc as pb_grpc
from fermi.grpc_server.server import GrpcServer
from fermi.openai_server.loadtest import serve
from fermi.runtime import Runtime
from fermi.settings import Settings

MODEL = "tiny-qwen3"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENV = {
    "FERMI_API_KEY": "",
    "FERMI_ENGINE_POOL": "1",
    "FERMI_MAX_NEW_TOKENS": "4",  # a body without a limit still ends quickly
    "FERMI_MAX_BODY_BYTES": "65536",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with serve(str(tiny_artifact), env=ENV) as running:
        yield running
        assert running.process.poll() is None, "the server died during the fuzzing"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


# -- strategies ------------------------------------------------------------------------------

# Text, and now and then any text at all, lone surrogates and NUL included (json.dumps
# escapes them as \ud800, \u0000).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
TEXT = st.one_of(*[st.text(max_size=30)] * 4, ANY_TEXT)
SMALL_INT = st.integers(-100, 100)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | SMALL_INT | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


def field(*good):
    """A schema field: mostly values of its type (or just outside its range), sometimes
    anything at all."""
    return st.one_of(*(good * 4), ANY_JSON)


PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "input_text", "output_text", "image_url", "bogus"])},
    optional={"text": field(TEXT)},
)
CONTENT = field(TEXT, st.lists(PART, max_size=3))
MESSAGE = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
        "content": CONTENT,
    },
    optional={"reasoning_content": field(TEXT), "name": field(TEXT)},
)
MESSAGES = field(st.lists(MESSAGE, min_size=1, max_size=3))
SAMPLING = {
    "temperature": field(st.floats(-1, 3)),
    "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(-2, 50)),
    "min_p": field(st.floats(-0.5, 1.5)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "seed": field(st.integers(-(2**70), 2**70)),
}
COMMON = {
    "model": field(st.sampled_from([MODEL, "tiny-qwen3-other", ""])),
    "stream": field(st.booleans()),
    "session_id": field(TEXT, st.sampled_from(["fuzz-a", "fuzz-b"])),
    **SAMPLING,
}
CHAT = st.fixed_dictionaries(
    {"messages": MESSAGES},
    optional={
        **COMMON,
        "max_tokens": field(st.integers(-2, 6), st.just(10**9)),
        "max_completion_tokens": field(st.integers(-2, 6)),
        "stop": field(TEXT, st.lists(TEXT, max_size=3)),
        "n": field(st.integers(0, 3)),
        "thinking": field(st.sampled_from(["on", "off", "auto", "maybe"])),
        "reasoning_effort": field(st.sampled_from(["none", "low", "high", "max"])),
        "chat_template_kwargs": field(
            st.fixed_dictionaries({"enable_thinking": field(st.booleans())})
        ),
        "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
        "repetition_penalty": field(st.floats(-1, 3)),
        "user": field(TEXT),
    },
)
RESPONSES = st.fixed_dictionaries(
    {"input": field(TEXT, st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={
        **COMMON,
        "instructions": field(TEXT),
        "max_output_tokens": field(st.integers(-2, 6)),
        "reasoning": field(st.fixed_dictionaries({"effort": field(st.sampled_from(["low", "x"]))})),
    },
)
VALID_CHAT = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
).encode()


# -- checks ----------------------------------------------------------------------------------


def check_error(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


def check_chat_stream(text: str) -> None:
    frames = text.rstrip("\n").split("\n\n")
    assert frames[-1] == "data: [DONE]", frames[-3:]
    for frame in frames[:-1]:
        payload = json.loads(frame.removeprefix("data: "))
        assert "error" not in payload, payload
        ChatCompletionChunk.model_validate(payload)


def check_responses_stream(text: str) -> None:
    events = [f for f in text.rstrip("\n").split("\n\n") if f]
    last = json.loads(events[-1].split("data: ", 1)[1])
    assert last["type"] == "response.completed", last["type"]
    Response.model_validate(last["response"])


def send(http: httpx.Client, path: str, body: bytes, tally: Counter) -> None:
    """One request; it must be answered (an exception here is a lost request)."""
    headers = {"Content-Type": "application/json"}
    response = http.post(path, content=body, headers=headers)
    tally[response.status_code] += 1
    assert response.status_code in (200, 400, 404), response.text[:500]
    if response.status_code != 200:
        return check_error(response)
    if response.headers["content-type"].startswith("text/event-stream"):
        return (check_chat_stream if "chat" in path else check_responses_stream)(response.text)
    data = response.json()
    (ChatCompletion if "chat" in path else Response).model_validate(data)


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \ud800


def report(name: str, tally: Counter) -> None:
    print(f"\n{name}: {sum(tally.values())} cases, statuses {dict(sorted(tally.items()))}")


def assert_healthy(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"


# -- HTTP ------------------------------------------------------------------------------------


def test_fuzz_chat_completions(http):
    tally: Counter = Counter()

    @FUZZ
    @given(CHAT)
    def case(body):
        send(http, "/v1/chat/completions", encode(body), tally)

    case()
    report("chat.completions", tally)
    assert tally[200] > 0 and tally[400] > 0  # both paths were exercised
    assert_healthy(http)


def test_fuzz_responses(http):
    tally: Counter = Counter()

    @FUZZ
    @given(RESPONSES)
    def case(body):
        send(http, "/v1/responses", encode(body), tally)

    case()
    report("responses", tally)
    assert tally[200] > 0 and tally[400] > 0
    assert_healthy(http)


def test_fuzz_flipped_bytes(http):
    """A valid body with bytes replaced: invalid JSON, invalid UTF-8, control characters..."""
    tally: Counter = Counter()

    @FUZZ
    @given(
        st.lists(st.tuples(st.integers(0, len(VALID_CHAT) - 1), st.integers(0, 255)), max_size=4)
    )
    def case(flips):
        body = bytearray(VALID_CHAT)
        for offset, value in flips:
            body[offset] = value
        send(http, "/v1/chat/completions", bytes(body), tally)

    case()
    report("flipped bytes", tally)
    assert_healthy(http)


# -- gRPC ------------------------------------------------------------------------------------

FLOATS = st.floats(width=32)  # NaN and infinities included
LEGACY_FLOAT = st.one_of(st.just(0.0), st.just(0.0), st.just(0.0), FLOATS)  # 0 = default
SAMPLING_MESSAGE = st.builds(
    pb.Sampling,
    temperature=st.none() | st.floats(0, 2) | FLOATS,
    top_p=st.none() | st.floats(0, 1) | FLOATS,
    top_k=st.none() | st.integers(0, 2**31 - 1),
    min_p=st.none() | FLOATS,
    repeat_penalty=st.none() | FLOATS,
    presence_penalty=st.none() | FLOATS,
    frequency_penalty=st.none() | FLOATS,
    seed=st.none() | st.integers(0, 2**63 - 1),
)
UTF8_TEXT = st.text(max_size=30)  # proto strings are valid UTF-8 by construction
GENERATE = st.builds(
    pb.GenerateRequest,
    session_id=st.sampled_from(["", "fuzz-g"]) | UTF8_TEXT,
    prompt=UTF8_TEXT,
    max_new_tokens=st.sampled_from([0, 1, 3]) | st.integers(0, 2**32 - 1),
    repeat_penalty=LEGACY_FLOAT,
    system_prompt=UTF8_TEXT,
    temperature=LEGACY_FLOAT,
    top_p=LEGACY_FLOAT,
    sampling=st.none() | SAMPLING_MESSAGE,
    stop=st.lists(UTF8_TEXT, max_size=3),
    thinking=st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2**31 - 1),
    ignore_eos=st.booleans(),
)


@pytest.fixture(scope="module")
def grpc_stub(tiny_artifact):
    settings_ = Settings(model=str(tiny_artifact), device="cpu", max_new_tokens=4)
    runtime = Runtime.load(settings_)
    server = GrpcServer(settings_, load=lambda s: runtime)
    port = server.start("127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.FermiStub(channel)
    server.stop(grace=0)


def test_fuzz_grpc_generate(grpc_stub):
    tally: Counter = Counter()

    @FUZZ
    @given(GENERATE)
    def case(request):
        if request.max_new_tokens > 6 and request.ignore_eos:
            request.max_new_tokens = 6  # valid but long: keep the run short
        try:
            replies = list(grpc_stub.Generate(request, timeout=120))
            assert replies and replies[-1].finish_reason, replies[-1:]
            tally["OK"] += 1
        except grpc.RpcError as e:
            tally[e.code().name] += 1
            assert e.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ), e.details()

    case()
    report("gRPC Generate", tally)
    assert tally["OK"] > 0 and tally["INVALID_ARGUMENT"] > 0
    assert grpc_stub.ListModels(pb.ListModelsRequest(), timeout=30).models
