"""`fermi chat` as a user meets it: through a pseudo-terminal and through a pipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

PROMPT = ">>> "


@pytest.fixture()
def chat(tiny_artifact):
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "fermi.cli",
            "chat",
            "--model",
            str(tiny_artifact),
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3000",
            "--thinking",
            "off",
        ],
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def test_repl_commands_and_an_answer(chat):
    chat.sendline("/help")
    chat.expect_exact("/reset")
    chat.expect_exact(PROMPT)
    chat.sendline("/thinking sideways")
    chat.expect("thinking")
    chat.expect_exact(PROMPT)
    chat.sendline("/thinking off")
    chat.expect_exact("(thinking off)")
    chat.expect_exact(PROMPT)
    chat.sendline("/system You are terse.")
    chat.expect_exact("system prompt set")
    chat.expect_exact(PROMPT)
    chat.sendline("/bogus")
    chat.expect_exact("unknown command")
    chat.expect_exact(PROMPT)
    chat.sendline("/reset")
    chat.expect_exact("conversation cleared")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    assert chat.wait() == 0


def test_ctrl_c_stops_the_answer_and_ctrl_d_quits(chat):
    chat.sendline("Write a very long story about the sea.")
    chat.expect_exact("about the sea.")  # the echo of the line
    chat.expect(r"\S")  # the first streamed text
    chat.sendintr()
    chat.expect_exact(PROMPT)
    chat.sendline("/help")  # still alive and responsive
    chat.expect_exact("/exit")
    chat.expect_exact(PROMPT)
    chat.sendeof()
    chat.expect(pexpect.EOF)
    status = chat.wait()  # wait, not close: close() would signal a slow-exiting process
    assert status == 0, (status, chat.signalstatus)


# the context error's prompt count (rich may wrap the line anywhere)
TOO_LONG = r"request\s+needs\s+\d+\s+\((\d+)\s+in\s+the\s+prompt"


def test_a_line_longer_than_the_terminal_line_limit_arrives_whole(chat):
    """25,000 characters in one line (a paste): the terminal's canonical mode used to cut it
    at 4,095 bytes, and the model answered the first part. The context error's token count
    shows the whole line arrived (the same line piped counts 5,015 tokens)."""
    chat.sendline("word " * 5000)
    chat.expect(TOO_LONG)
    assert chat.match.group(1) == "5015"
    chat.expect_exact(PROMPT)


def test_multi_line_messages(chat):
    """Lines between triple quotes (as in Ollama) and lines ending in a backslash (as in
    llama.cpp's CLI) are one message: three lines of 1,700 tokens fit the context alone and
    exceed it together."""
    chat.sendline('"""')
    for _ in range(3):
        chat.expect_exact("... ")
        chat.sendline("word " * 1700)
    chat.expect_exact("... ")
    chat.sendline('"""')
    chat.expect(TOO_LONG)
    assert int(chat.match.group(1)) > 5000
    chat.expect_exact(PROMPT)
    for _ in range(2):
        chat.sendline("word " * 1700 + "\\")
        chat.expect_exact("... ")
    chat.sendline("word " * 1700)
    chat.expect(TOO_LONG)
    assert int(chat.match.group(1)) > 5000
    chat.expect_exact(PROMPT)


def test_arrow_keys_edit_the_line_and_recall_earlier_ones(chat):
    chat.sendline("/thinking ff\x1b[D\x1b[Do")  # two left, insert "o": /thinking off
    chat.expect_exact("(thinking off)")
    chat.expect_exact(PROMPT)
    chat.sendline("/reset")
    chat.expect_exact("conversation cleared")
    chat.expect_exact(PROMPT)
    chat.sendline("\x1b[A\x1b[A")  # up twice: the /thinking line again
    chat.expect_exact("(thinking off)")
    chat.expect_exact(PROMPT)


def test_pipe_answers_one_prompt_per_line(tiny_artifact):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fermi.cli",
            "chat",
            "--model",
            str(tiny_artifact),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--thinking",
            "off",
        ],
        input="Hello\n\nHow are you?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_value_is_one_line_exit_2(tiny_artifact):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fermi.cli",
            "chat",
            "--model",
            str(tiny_artifact),
            "--thinking",
            "sideways",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "thinking" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_offline_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "chat", "--model", "nobody/NoSuchModel"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HOME": str(tmp_path),
            "FERMI_OFFLINE": "1",
            "FERMI_ARTIFACTS": str(tmp_path / "art"),
        },
    )
    assert result.returncode == 2, result.stderr
    assert "NoSuchModel" in result.stderr and "Traceback" not in result.stderr


def test_settings_apply_and_thinking_on_without_a_thinking_mode_is_said_once(tiny_artifact):
    """FERMI_MAX_NEW_TOKENS reaches `fermi chat` (no --max-new-tokens flag); --thinking on for
    a model without a thinking mode says so once, not at every answer."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "fermi.cli", "chat", "--model", str(tiny_artifact), "--device", "cpu",
         "--temperature", "0", "--thinking", "on"],
        env={**os.environ, "FERMI_MAX_NEW_TOKENS": "2", "FERMI_DISABLE_THINK": "1"},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )  # fmt: skip
    try:
        child.expect_exact("no thinking mode; thinking stays off")
        child.expect_exact(PROMPT)
        child.sendline("Write a very long story about the sea.")
        child.expect_exact("(max tokens reached)")
        child.expect_exact(PROMPT)
        child.sendline("Another one.")
        child.expect_exact("(max tokens reached)")
        child.expect_exact(PROMPT)
        assert "no thinking mode" not in child.before
        child.sendline("/thinking on")
        child.expect_exact("no thinking mode; thinking stays off")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
