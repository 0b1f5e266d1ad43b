"""Security of the OpenAI server, live on 127.0.0.1: API keys as tenants that own their sessions,
one session id rule, hostile input answered 400/414/431 in OpenAI's shape, bounded request
reception, a connection cap, and prompt preparation off the event loop.

One server runs with three keys: `alice-key` (named "alice" in a keys file), `bob-key` and
`carol-key` (FERMI_API_KEY as a comma list, unnamed, so two tenants)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from fermi.openai_server.loadtest import serve

MODEL = "tiny-qwen3"
KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol-key"}
CONVERSATION = [
    {"role": "system", "content": "You keep secrets."},
    {"role": "user", "content": "My password is swordfish. Remember it for me, please."},
]
MAX_CONNECTIONS = 12
WAIT_S = 60  # upper bound for polls that normally end within a few seconds


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# tenants\nalice-key   alice\n\n")
    env = {
        "FERMI_API_KEY": "bob-key, carol-key",
        "FERMI_API_KEYS_FILE": str(keys_file),
        "FERMI_DEFAULT_THINKING": "",
        "FERMI_ENGINE_POOL": "1",
        "FERMI_MAX_BODY_BYTES": str(8 * 1024 * 1024),
        "FERMI_REQUEST_TIMEOUT_S": "2",
        "FERMI_KEEP_ALIVE_TIMEOUT_S": "5",
        "FERMI_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "HF_HUB_OFFLINE": "1",
    }
    with serve(str(tiny_artifact), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def client(server, who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture
def alice(server):
    with client(server, "alice") as c:
        yield c


@pytest.fixture
def bob(server):
    with client(server, "bob") as c:
        yield c


def chat(http: httpx.Client, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": CONVERSATION, "max_tokens": 4, "temperature": 0, **fields}
    return http.post("/v1/chat/completions", json=body)


def cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def raw_exchange(port: int, data: bytes, read_s: float = 30) -> bytes:
    """Send raw bytes, read until the server closes or `read_s` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and _complete(received):
                    break
        except TimeoutError:
            pass
    return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def post_raw(port: int, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer alice-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return parse_response(raw_exchange(port, head + body))


def parse_response(response: bytes) -> tuple[int, dict]:
    """A well-formed HTTP/1.1 response with an OpenAI error body (or any JSON)."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0].decode()
    assert status_line.startswith("HTTP/1.1 "), response[:200]
    return int(status_line.split()[1]), json.loads(body)


def assert_healthy(server) -> None:
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"


# -- keys ------------------------------------------------------------------------------------


def test_every_v1_route_needs_a_known_key_and_health_stays_open(server):
    with client(server, None) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        assert error_of(anonymous.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert error_of(chat(anonymous), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer alice-key-but-wrong"}
        assert anonymous.get("/v1/models", headers=wrong).status_code == 401
        basic = {"Authorization": "Basic alice-key"}
        assert anonymous.get("/v1/models", headers=basic).status_code == 401
    for who in KEYS:
        with client(server, who) as known:
            assert known.get("/v1/models").status_code == 200


# -- tenants ---------------------------------------------------------------------------------


def test_another_key_cannot_continue_or_probe_a_session(alice, bob, server):
    assert cached(chat(alice, session_id="diary")) == 0
    assert cached(chat(alice, session_id="diary")) > 0  # alice's own cache is reused
    # bob names the same id with the same conversation: a new session of his own, so nothing
    # of alice's cache shows through cached_tokens.
    assert cached(chat(bob, session_id="diary")) == 0
    with client(server, "carol") as carol:  # another unnamed key: another tenant again
        assert cached(chat(carol, session_id="diary")) == 0
    assert cached(chat(alice, session_id="diary")) > 0


def test_another_key_cannot_delete_a_session(alice, bob):
    assert chat(alice, session_id="keepsake").status_code == 200
    theirs = error_of(bob.delete("/v1/sessions/keepsake"), 404)
    missing = error_of(bob.delete("/v1/sessions/never-made"), 404)
    assert theirs["code"] == missing["code"] == "session_not_found"
    assert theirs["message"].replace("keepsake", "X") == missing["message"].replace(
        "never-made", "X"
    )  # the same answer as for a session that does not exist
    assert cached(chat(alice, session_id="keepsake")) > 0  # still there
    assert alice.delete("/v1/sessions/keepsake").json()["deleted"] is True


def test_a_refused_request_creates_no_session(alice):
    too_long = chat(alice, session_id="ghost", max_tokens=100_000)
    assert too_long.status_code == 400
    bad = chat(alice, session_id="ghost", temperature=-1)
    assert bad.status_code == 400
    error_of(alice.delete("/v1/sessions/ghost"), 404)


@pytest.mark.parametrize(
    "session_id", ["x" * 129, "has space", "tab\there", "é-accent", "\x00nul", "\ud800"]
)
def test_session_ids_have_one_bound(alice, port, session_id):
    body = json.dumps({"model": MODEL, "messages": CONVERSATION, "session_id": session_id})
    status, data = post_raw(port, body.encode())
    assert status == 400 and data["error"]["param"] == "session_id"


def test_session_id_bound_on_delete(alice):
    assert error_of(alice.delete("/v1/sessions/" + "x" * 129), 400)["param"] == "session_id"
    assert alice.delete("/v1/sessions/" + "x" * 128).status_code == 404


# -- hostile input ---------------------------------------------------------------------------

HOSTILE_BODIES = {
    "deep arrays": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "moderately deep": b'{"messages": [], "x": ' + b"[" * 200 + b"]" * 200 + b"}",
    "lone surrogate": b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": '
    b'"\\ud800"}]}',
    "surrogate in a key": b'{"\\udfff": 1, "messages": []}',
    "raw NUL": b'{"messages": [{"role": "user", "content": "a\x00b"}]}',
    "NUL after the JSON": b'{"messages": []}\x00',
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "overlong UTF-8": b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}',
    "truncated UTF-8": b'{"messages": [{"role": "user", "content": "\xe2\x82"}]}',
    "not an object": b"[1, 2, 3]",
    "NaN": b'{"temperature": NaN, "messages": []}',
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_get_400_in_openai_shape(server, port, name):
    for path in ("/v1/chat/completions", "/v1/responses"):
        status, data = post_raw(port, HOSTILE_BODIES[name], path)
        assert status == 400, (name, data)
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["type"] == "invalid_request_error"
    assert_healthy(server)


def test_an_escaped_nul_is_text(alice):
    """`\\u0000` is valid JSON text (a byte-level model can emit it; clients send answers back),
    unlike a raw NUL byte, which JSON forbids."""
    messages = [{"role": "user", "content": "a\x00b"}]
    assert chat(alice, messages=messages).status_code == 200


def test_a_lone_surrogate_in_a_streamed_session_id_is_a_clean_400(port):
    body = b'{"model": "tiny-qwen3", "stream": true, "session_id": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'  # noqa: E501
    status, data = post_raw(port, body)
    assert status == 400 and data["error"]["param"] == "session_id"


def test_a_long_url_is_414_large_headers_431_a_large_body_413(server, port):
    status, data = parse_response(raw_exchange(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"))
    assert status == 414 and data["error"]["code"] == "uri_too_long"
    headers = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    status, data = parse_response(raw_exchange(port, headers))
    assert status == 431 and "header" in data["error"]["message"]
    big_body = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
        b"Content-Length: 99999999\r\n\r\n"
    )
    status, data = parse_response(raw_exchange(port, big_body))
    assert status == 413 and data["error"]["code"] == "request_too_large"  # the body, rightly
    assert_healthy(server)


FRAMING_ERRORS = {
    "non-numeric Content-Length": b"Content-Length: abc\r\n",
    "two Content-Lengths": b"Content-Length: 2\r\nContent-Length: 3\r\n",
    "Content-Length and Transfer-Encoding": b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
}


@pytest.mark.parametrize("name", [*FRAMING_ERRORS, "raw 0xff in the path"])
@pytest.mark.parametrize("path", ["/v1/completions", "/health"])
def test_a_malformed_request_with_a_valid_key_is_400(server, port, name, path):
    """The framing error is the answer, not the key check: Sanic cannot read such a request,
    so it has no headers (no key) to check."""
    if name in FRAMING_ERRORS:
        head = f"POST {path} HTTP/1.1\r\n".encode() + FRAMING_ERRORS[name]
    else:
        head = f"POST {path}".encode() + b"\xff HTTP/1.1\r\nContent-Length: 2\r\n"
    request = head + b"Host: x\r\nAuthorization: Bearer alice-key\r\n\r\n{}"
    status, data = parse_response(raw_exchange(port, request))
    assert status == 400, (name, data)
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error"
    assert_healthy(server)


def test_a_malformed_request_does_not_bypass_the_key_check(server, port):
    """Without a key, a well-formed request to an unknown /v1 path is still 401, and a framing
    error is 400 whatever the key: neither runs a handler."""
    status, data = parse_response(
        raw_exchange(port, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    )
    assert status == 401 and data["error"]["code"] == "invalid_api_key"
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    status, data = parse_response(raw_exchange(port, request))
    assert status == 400


def test_a_body_too_large_or_too_slow_is_answered_before_the_key_check(port):
    """413 and 408 say what is wrong with the request whatever its key, like a framing error."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    status, data = parse_response(raw_exchange(port, head))
    assert status == 413 and data["error"]["code"] == "request_too_large"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"
    status, _ = parse_response(raw_exchange(port, head, read_s=WAIT_S))
    assert status == 408


# -- connections -----------------------------------------------------------------------------


def test_a_stalled_body_is_closed_after_the_request_timeout(server, port):
    """Headers, then a body that never completes: the connection is answered 408 and closed
    (FERMI_REQUEST_TIMEOUT_S=2 here), not held for the response timeout (hours)."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages": '
    )
    response = raw_exchange(port, head, read_s=WAIT_S)
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert_healthy(server)


def test_a_stalled_chunked_body_is_closed_after_the_request_timeout(server, port):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
        b'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\n'
    )
    response = raw_exchange(port, head, read_s=WAIT_S)
    assert response.startswith(b"HTTP/1.1 408"), response[:200]


def test_a_trickled_body_is_closed_after_the_request_timeout(server, port):
    """A body sent a byte at a time keeps the connection busy, never idle: the limit is on the
    whole request, not on the pause between bytes."""
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * 200 + b'"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head)
        answer = b""
        deadline = time.monotonic() + WAIT_S
        for byte in body:  # 0.2 s apart: 40 s for the whole body
            assert time.monotonic() < deadline
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.2)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_stalled_headers_are_closed_after_the_request_timeout(server, port):
    response = raw_exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost:", read_s=WAIT_S)
    assert response.startswith(b"HTTP/1.1 408"), response[:200]


def read_to_eof(sock: socket.socket, within_s: float = WAIT_S) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection: (bytes, True), or (bytes, False)
    when it is still open after `within_s` seconds."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        pass
    return received, True


def test_stalled_requests_are_closed_and_free_their_connection_slots(server, port):
    """As many stalled requests as the cap allows: each is answered 408 and its connection
    closed by the server, so none keeps counting against FERMI_MAX_CONNECTIONS."""
    body_head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt":'
    )
    heads = [body_head, b"POST /v1/completions HTTP/1.1\r\nHost:"]  # a body or headers stall
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(heads[i % 2])
        for sock in held:
            answer, closed = read_to_eof(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert closed, "the server answered 408 but kept the connection open"
        response = httpx.get(server.url + "/health", timeout=30)
        assert response.status_code == 200, response.text
    finally:
        for sock in held:
            sock.close()


def test_silent_connections_are_closed_after_the_request_timeout(tiny_artifact):
    """Connections that never send a byte are closed once the request timeout (2 s here) has
    passed, not held for the keep-alive timeout (120 s here), so a few silent sockets cannot
    hold every connection slot; then the server is served again."""
    env = {"FERMI_API_KEY": "", "FERMI_REQUEST_TIMEOUT_S": "2",
           "FERMI_KEEP_ALIVE_TIMEOUT_S": "120", "FERMI_MAX_CONNECTIONS": "3",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    with serve(str(tiny_artifact), env=env) as running:
        port = int(running.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for sock in held:
                answer, closed = read_to_eof(sock, within_s=WAIT_S)
                assert closed and answer == b"", answer[:200]
            assert httpx.get(running.url + "/health", timeout=30).status_code == 200
        finally:
            for sock in held:
                sock.close()


def test_open_connections_are_capped(server, port):
    """Connections beyond FERMI_MAX_CONNECTIONS get a 503 in OpenAI's shape and are closed."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        refused = []
        for sock in held:  # all opened at once, well within the keep-alive timeout
            sock.settimeout(0.2)
            try:
                if answer := sock.recv(4096):  # b"": accepted, closed silent after 2 s
                    refused.append(answer)
            except TimeoutError:
                pass  # accepted, waiting for a request
        assert len(refused) >= 4 and all(r.startswith(b"HTTP/1.1 503") for r in refused)
        assert b"too_many_connections" in refused[0]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + WAIT_S  # the held connections are let go: served again
    while True:
        try:
            assert_healthy(server)
            break
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("kind", ["text", "token ids"])
def test_a_huge_prompt_is_prepared_off_the_event_loop(server, alice, kind):
    """While a 4 MiB prompt is parsed, rendered and tokenized (or its 500,000 token ids parsed
    and checked), /health keeps answering."""
    words = " ".join(f"word{i % 997}" for i in range(600_000))[: 4 * 1024 * 1024]
    outcome = {}

    def send_huge():
        with client(server, "alice") as c:
            if kind == "text":
                body = {"model": MODEL, "messages": [{"role": "user", "content": words}]}
                outcome["response"] = c.post("/v1/chat/completions", json=body)
            else:
                body = {"model": MODEL, "prompt": [i % 1000 for i in range(500_000)]}
                outcome["response"] = c.post("/v1/completions", json=body)

    sender = threading.Thread(target=send_huge)
    sender.start()
    answered_meanwhile = 0
    with httpx.Client(base_url=server.url, timeout=60) as probe:
        while sender.is_alive():
            if probe.get("/health").status_code == 200 and sender.is_alive():
                answered_meanwhile += 1
    sender.join()
    error = error_of(outcome["response"], 400)  # far beyond the tiny model's context
    assert error["code"] == "context_length_exceeded"
    assert answered_meanwhile > 0
