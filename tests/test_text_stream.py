"""Stop strings and the <think> splitter give the same result for every way the text is chunked."""

from __future__ import annotations

import itertools
import random

import pytest

from fermi.text_stream import (
    OutputChannels,
    StopMatcher,
    channel_table,
    reasoning_splitter,
)


def chunkings(text: str, seed: int = 0, random_count: int = 50):
    """Whole, every 2- and 3-way split, every single character, and random chunkings."""
    yield [text]
    n = len(text)
    for k in (1, 2):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            yield [text[a:b] for a, b in itertools.pairwise(bounds)]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(random_count):
        cuts = sorted(rng.sample(range(1, n), rng.randrange(0, n))) if n > 1 else []
        bounds = [0, *cuts, n]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


# --- StopMatcher ----------------------------------------------------------------------------


def run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    hit = False
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        emitted.append(text)
        if hit:
            break
    if not hit:
        emitted.append(matcher.flush())
    return "".join(emitted), hit, emitted


STOP_CASES = [
    (["STOP"], "hello STOP world", "hello ", True),
    (["STOP"], "hello STO world", "hello STO world", False),
    (["STOP"], "no stop here, ST", "no stop here, ST", False),
    (["\n\n", "END"], "line one\nline two\n\nmore END", "line one\nline two", True),
    (["END", "\n\n"], "abc END\n\n", "abc ", True),
    # Overlapping prefixes: "abcd" and "bce" share text; the first to complete wins.
    (["abcd", "bce"], "xxabcexx", "xxa", True),
    (["abcd", "bce"], "xxabcdxx", "xx", True),
    (["abc", "b"], "zabc", "za", True),  # "b" ends first
    (["abc", "bc"], "zabc", "z", True),  # same end: the longer one
    (["aab"], "aaab", "a", True),  # self-overlapping stop
    (["</s>", "<|im_end|>"], "answer<|im_end|>junk", "answer", True),
    ([], "nothing to stop", "nothing to stop", False),
    ([""], "empty stop ignored", "empty stop ignored", False),
]


@pytest.mark.parametrize("stops, text, expected, hit", STOP_CASES)
def test_stop_matcher_every_chunking(stops, text, expected, hit):
    for chunks in chunkings(text):
        joined, was_hit, pieces = run_stops(stops, chunks)
        assert (joined, was_hit) == (expected, hit), chunks
        # Never half-emitted: no piece contains a stop or ends in the middle of the cut point.
        assert not any(stop and stop in joined for stop in stops)


def test_stop_matcher_holds_only_possible_prefixes():
    matcher = StopMatcher(["<|im_end|>", "###"])
    assert matcher.feed("text <|im") == ("text ", False)
    assert matcher.feed("_start") == ("<|im_start", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("#x") == ("##x", False)
    assert matcher.feed("##") == ("", False)
    assert matcher.flush() == "##"


def test_stop_matcher_after_hit():
    matcher = StopMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


# --- reasoning_splitter ------------------------------------------------------------------------


def run_split(start_in_reasoning: bool, chunks: list[str]) -> tuple[str, str]:
    splitter = reasoning_splitter(start_in_reasoning)
    parts = {"reasoning": "", "answer": ""}
    for chunk in chunks:
        for kind, text in splitter.feed(chunk):
            assert text
            parts[kind] += text
    for kind, text in splitter.flush():
        parts[kind] += text
    return parts["reasoning"], parts["answer"]


SPLIT_CASES = [
    # (start_in_reasoning, output, reasoning, answer)
    (
        False,
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "Let me think.",
        "The answer is 4.",
    ),
    (False, "\n <think>\nr\n</think>\n\na", "r", "a"),
    (False, "<think>\n\n</think>\n\nJust the answer.", "", "Just the answer."),
    (False, "Plain answer, no thinking.", "", "Plain answer, no thinking."),
    (False, "  Plain with leading space.", "", "  Plain with leading space."),
    (False, "Answer mentions <think> later.", "", "Answer mentions <think> later."),
    (False, "<thinking> is not the tag", "", "<thinking> is not the tag"),
    (False, "<thin", "", "<thin"),
    (False, "", "", ""),
    (False, "<think>\nnever closed\n\n", "never closed", ""),
    (False, "<think>\nnever closed </thi", "never closed </thi", ""),
    (False, "<think>a < b and </b> </think>x", "a < b and </b>", "x"),
    (False, "<think>\nline1\n\nline2\n</think>\n\nans\n\nwer\n", "line1\n\nline2", "ans\n\nwer\n"),
    (True, "\nstill reasoning\n</think>\n\nDone.", "still reasoning", "Done."),
    (True, "reasoning only", "reasoning only", ""),
    (True, "</think>answer", "", "answer"),
    (
        True,
        "r <think> inner\n</think>\n\n<think>kept</think>",
        "r <think> inner",
        "<think>kept</think>",
    ),
]


@pytest.mark.parametrize("start, text, reasoning, answer", SPLIT_CASES)
def test_reasoning_splitter_every_chunking(start, text, reasoning, answer):
    for chunks in chunkings(text, random_count=30):
        assert run_split(start, chunks) == (reasoning, answer), chunks


def test_reasoning_splitter_token_kinds():
    tokens = ["<think>", "\n", "Hmm", ".", "\n", "</think>", "\n\n", "Hi", "!"]
    splitter = reasoning_splitter(False)
    kinds = []
    for token in tokens:
        splitter.feed(token)
        kinds.append(splitter.last_kind)
    assert kinds == ["reasoning"] * 6 + ["answer"] * 3
    assert not splitter.in_reasoning


def test_reasoning_splitter_prompt_opened_block_counts_as_reasoning():
    splitter = reasoning_splitter(True)
    assert splitter.in_reasoning
    assert splitter.feed("a") == [("reasoning", "a")]
    assert splitter.last_kind == "reasoning"


def test_reasoning_splitter_holds_whitespace_before_a_possible_close():
    splitter = reasoning_splitter(True)
    assert splitter.feed("step one\n") == [("reasoning", "step one")]
    assert splitter.feed("</thi") == []
    assert splitter.feed("nk>\n\nok") == [("answer", "ok")]
    assert splitter.flush() == []


# --- OutputChannels with tool calls ---------------------------------------------------------

TOOL_TABLE = channel_table(("<think>", "</think>"), ("<tool_call>", "</tool_call>"))


def run_channels(table, initial: str, chunks: list[str]) -> list[tuple[str, str]]:
    """Joined pieces per channel, in order; each tool call block as its own entry."""
    machine = OutputChannels(table, initial)
    out: list[tuple[str, str]] = []
    pieces = [p for chunk in chunks for p in machine.feed(chunk)] + machine.flush()
    for kind, text in pieces:
        if kind == "tool_call_end":
            out.append((kind, text))
        elif out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
BODY = '\n{"name": "f", "arguments": {"a": 1}}\n'
CHANNEL_CASES = [
    # (initial state, output, expected pieces)
    ("start", f"<think>\nhm\n</think>\n\n{CALL}", [
        ("reasoning", "hm"), ("tool_call", BODY), ("tool_call_end", "</tool_call>")]),
    ("answer", f"I'll check.\n{CALL}\n{CALL}\n", [
        ("answer", "I'll check."), ("tool_call", BODY), ("tool_call_end", "</tool_call>"),
        ("tool_call", BODY), ("tool_call_end", "</tool_call>")]),
    ("answer", f"{CALL}\n\nDone.", [
        ("tool_call", BODY), ("tool_call_end", "</tool_call>"), ("answer", "Done.")]),
    ("answer", "No tools here, a < b.\n", [("answer", "No tools here, a < b.\n")]),
    ("answer", "<tool_call>\n{\"name\"", [("tool_call", '\n{"name"')]),
    ("reasoning", "<tool_call> inside reasoning</think>ok", [
        ("reasoning", "<tool_call> inside reasoning"), ("answer", "ok")]),
    # A literal <think> when the prompt neither opened nor allowed a block stays answer.
    ("answer", "<think>x</think> is XML", [("answer", "<think>x</think> is XML")]),
]  # fmt: skip


@pytest.mark.parametrize("initial, text, expected", CHANNEL_CASES)
def test_channels_every_chunking(initial, text, expected):
    for chunks in chunkings(text, random_count=20):
        assert run_channels(TOOL_TABLE, initial, chunks) == expected, chunks


def test_a_table_without_tool_tags_never_opens_a_tool_call():
    table = channel_table(("<think>", "</think>"), None)
    assert run_channels(table, "answer", [CALL]) == [("answer", CALL)]


def test_a_model_without_reasoning_tags_has_no_start_state():
    table = channel_table(None, None)
    assert set(table) == {"answer", "after"}
    assert run_channels(table, "answer", ["<think>a</think>b"]) == [("answer", "<think>a</think>b")]
