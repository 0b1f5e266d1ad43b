"""A scripted OpenAI-compatible server on 127.0.0.1 that records what it is sent.

The tiny-qwen3 test model has random weights, so it never writes a `<think>` block: the demo's
thinking panel, and the exact request fields it sends, are checked against this stub instead.
It streams the way `fermi serve openai` does: `reasoning_content` deltas, then `content`
deltas, a finish chunk carrying `session_id`, a usage chunk, and `[DONE]`."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "stub-model"
REASONING = ["The user asks ", "why the sky ", "is blue: Rayleigh scattering."]
ANSWER = ["Sunlight scatters ", "off air molecules, ", "and blue scatters most."]
FAIL_WORD = "please-fail"  # a user message containing it gets an HTTP 400 error answer
FAIL_MESSAGE = "the stub refuses this request on purpose"
BREAK_WORD = "please-break"  # ... gets part of an answer, then an in-band error event
BREAK_MESSAGE = "the stub broke down mid-stream"
SLOW_WORD = "please-ramble"  # ... gets a long, slow answer (to be cancelled)
CHUNK_DELAY_S = 0.05


class StubOpenAI:
    def __init__(self, card: dict[str, Any] | None = None) -> None:
        self.card = card or {}  # extra /v1/models fields, as fermi sends them
        self.requests: list[dict[str, Any]] = []  # chat bodies, in arrival order
        self.deleted: list[str] = []  # session ids sent to DELETE /v1/sessions/<id>
        self.disconnects = 0  # streams the client closed before their end
        self.authorizations: list[str | None] = []  # each chat request's Authorization header
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0}
    return {**body, "model": MODEL, "choices": choices, **extra}


def script(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks answering one chat request."""
    frames = [chunk({"role": "assistant", "content": ""})]
    if body.get("thinking") == "on":
        frames += [chunk({"reasoning_content": text}) for text in REASONING]
    frames += [chunk({"content": text}) for text in ANSWER]
    if SLOW_WORD in body["messages"][-1]["content"]:
        frames += [chunk({"content": " and so on"}) for _ in range(300)]
    if BREAK_WORD in body["messages"][-1]["content"]:  # as fermi reports a failed generation
        error = {"message": BREAK_MESSAGE, "type": "server_error", "param": None, "code": None}
        return frames[:-1] + [{"error": error}]
    frames.append(chunk({}, "stop", session_id=body.get("session_id")))
    prompt = 10 * len(body["messages"])
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": 12,
        "total_tokens": prompt + 12,
        "prompt_tokens_details": {"cached_tokens": prompt - 10},
    }
    frames.append(chunk(None, usage=usage))
    return frames


def _handler(stub: StubOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}
                card.update(stub.card)
                self._json(200, {"object": "list", "data": [card]})
            else:
                self._json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_DELETE(self) -> None:
            session_id = self.path.rpartition("/")[2]
            stub.deleted.append(session_id)
            self._json(200, {"id": session_id, "object": "session", "deleted": True})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            stub.requests.append(body)
            stub.authorizations.append(self.headers.get("Authorization"))
            if FAIL_WORD in body["messages"][-1]["content"]:
                error = {"message": FAIL_MESSAGE, "type": "invalid_request_error"}
                self._json(400, {"error": {**error, "param": None, "code": None}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("X-Session-Id", body.get("session_id", ""))
            self.end_headers()
            try:
                for frame in script(body):
                    self.wfile.write(f"data: {json.dumps(frame)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(CHUNK_DELAY_S)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                stub.disconnects += 1

    return Handler
