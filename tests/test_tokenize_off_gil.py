"""A huge prompt is tokenized (and a long id list decoded) without holding the GIL, so the
server's event loop and the decode loop keep running meanwhile: tokenizers' `encode` holds it for
its whole run (seconds for a 4 MiB prompt), `encode_batch` and `decode_batch` release it."""

from __future__ import annotations

import threading
import time

import pytest

from fermi.runtime import Runtime
from fermi.settings import Settings


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    return Runtime.load(Settings(model=str(tiny_artifact), device="cpu"))


def turns_of_the_main_thread_while(work) -> tuple[int, object]:
    """How many times the main thread got the GIL back (each turn sleeps 1 ms, which releases
    it) while `work` ran in another thread; and what `work` returned. A worker that holds the
    GIL throughout leaves the main thread a turn or two, at its start and end."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", work()))
    turns = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        turns += 1
    worker.join()
    return turns, result["value"]


def test_a_huge_prompt_is_tokenized_while_other_threads_run(runtime):
    text = "Once upon a time, " * 150_000  # 2.7 MB, under the server's 4 MiB body limit
    turns, ids = turns_of_the_main_thread_while(lambda: runtime.encode(text))
    assert ids == runtime.tokenizer.encode(text, add_special_tokens=False).ids
    assert turns >= 20, turns


def test_a_long_id_list_is_decoded_while_other_threads_run(runtime):
    ids = runtime.encode("Once upon a time, " * 150_000)
    turns, text = turns_of_the_main_thread_while(lambda: runtime.decode(ids))
    assert text == runtime.tokenizer.decode(ids, skip_special_tokens=False)
    assert turns >= 20, turns
