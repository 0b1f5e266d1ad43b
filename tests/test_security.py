"""The shared security decisions alone: keys and tenants, session id rules, the exposure
warning, the JSON body checks, and request preparation off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fermi.errors import InvalidRequest
from fermi.openai_server.guard import submit_off_loop
from fermi.openai_server.hostile import MAX_DEPTH, check_body
from fermi.security import (
    ANONYMOUS,
    MAX_SESSION_ID,
    exposure_warning,
    parse_keys,
    short_id,
    validate_session_id,
)
from fermi.settings import load_settings


def test_no_key_means_one_anonymous_tenant():
    keys = parse_keys(None, None)
    assert not keys.required
    assert keys.tenant_for_header(None) == ANONYMOUS
    assert keys.tenant_for_header("Bearer anything") == ANONYMOUS


def test_comma_list_and_keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nk-alice alice\nk-alice2   alice\nk-solo\n")
    keys = parse_keys(" k1 , k2,,", str(path))
    tenants = {k: keys.tenant_for_header(f"Bearer {k}") for k in ("k1", "k2", "k-solo")}
    assert len(set(tenants.values())) == 3 and None not in tenants.values()
    assert keys.tenant_for_header("Bearer k-alice") == "alice"
    assert keys.tenant_for_header("bearer  k-alice2 ") == "alice"  # one tenant, two keys
    for header in (None, "", "Bearer", "Bearer ", "Bearer k3", "Basic k1", "k1"):
        assert keys.tenant_for_header(header) is None, header
    assert "k1" not in repr(keys)  # only digests are kept


def test_keys_file_errors(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read"):
        parse_keys(None, str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidRequest, match="holds no key"):
        parse_keys(None, str(empty))


def test_settings_read_keys_and_bind_loopback():
    settings = load_settings({"FERMI_API_KEY": "a,b", "FERMI_API_KEYS_FILE": "/k"})
    assert settings.api_key == "a,b" and settings.api_keys_file == "/k"
    defaults = load_settings({})
    assert defaults.openai_addr.startswith("127.0.0.1:")
    assert defaults.grpc_addr.startswith("127.0.0.1:")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_no_warning_on_loopback(host):
    assert exposure_warning(host, parse_keys(None, None)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org", ""])
def test_warning_beyond_loopback_without_a_key(host):
    warning = exposure_warning(host, parse_keys(None, None))
    assert warning and warning.startswith("warning:") and "FERMI_API_KEY" in warning
    assert exposure_warning(host, parse_keys("k", None)) is None


def test_session_id_rule():
    for good in ("a", "x" * MAX_SESSION_ID, "chat-1_2.3:4~!"):
        validate_session_id(good)
    for bad in ("", "x" * (MAX_SESSION_ID + 1), "a b", "tab\t", "é", "\ud800", "nul\x00"):
        with pytest.raises(InvalidRequest) as caught:
            validate_session_id(bad)
        assert caught.value.param == "session_id"
    assert short_id("abcdefghijklmnop") == "abcdefgh…" and short_id("abc") == "abc"


def test_body_checks():
    check_body({"messages": [{"content": "fine ✓ 你好"}]})
    check_body({"messages": [{"content": "model output may hold U+0000: \x00"}]})
    for body, param in (
        ({"messages": [{"content": "\ud800"}]}, "messages[0].content"),
        ({"a\x00\udfff": 1}, "a\\u0000\\udfff"),
        ({"x": ["ok", "\ud800x"]}, "x[1]"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            check_body(body)
        assert caught.value.param == param
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="deeper"):
        check_body({"x": deep})


class BlockingRuntime:
    """A runtime whose submit blocks until released, recording the thread it ran in."""

    def __init__(self):
        self.release = threading.Event()
        self.thread = None
        self.closed = threading.Event()

    def submit_all(self, requests):
        self.thread = threading.current_thread()
        assert self.release.wait(30)
        runtime = self

        class Generation:
            def close(self):
                runtime.closed.set()

        return [Generation() for _ in requests]


def test_submit_runs_off_the_event_loop():
    runtime = BlockingRuntime()

    async def main():
        task = asyncio.create_task(submit_off_loop(runtime, object()))
        for _ in range(3):  # the loop keeps turning while submit blocks
            await asyncio.sleep(0)
        assert not task.done()
        runtime.release.set()
        await task
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert runtime.thread is not loop_thread


def test_a_generation_submitted_for_a_departed_client_is_closed():
    runtime = BlockingRuntime()

    async def main():
        task = asyncio.create_task(submit_off_loop(runtime, object()))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away while its prompt was being prepared
        with pytest.raises(asyncio.CancelledError):
            await task
        runtime.release.set()
        await asyncio.to_thread(runtime.closed.wait, 30)

    asyncio.run(main())
    assert runtime.closed.is_set()
