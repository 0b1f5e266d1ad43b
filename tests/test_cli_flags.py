"""The command line as a user meets it: `--help` through a real terminal (no text lost to Rich
markup, every setting shown with its environment variable), `--version`, bad values as one line
with exit 2, and export progress bars on a terminal but not in a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pytest

from fermi import __version__

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")} | {"HF_HUB_OFFLINE": "1"}


def terminal(*args: str, width: int = 120, timeout: int = 120) -> str:
    """Run `fermi ARGS` in a pseudo-terminal of `width` columns; its screen text, unstyled,
    with the help boxes' borders and line breaks folded into single spaces."""
    child = pexpect.spawn(
        sys.executable, ["-m", "fermi.cli", *args], env=ENV, encoding="utf-8",
        dimensions=(50, width), timeout=timeout,
    )  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    text = ANSI.sub("", child.before)
    return text, child.exitstatus


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("width", [80, 160])
def test_serve_help_shows_every_flag_with_its_variable(width):
    text, status = terminal("serve", "openai", "--help", width=width)
    assert status == 0
    words = flat(text)
    for flag in ("--api-key", "--served-model-name", "--alias", "--chat-template", "--ctx-size",
                 "--max-model-len", "--max-num-seqs", "--parallel", "--max-queue", "--threads",
                 "--log-format", "--model", "--device", "--host", "--port"):  # fmt: skip
        assert flag in words, flag
    for var in ("FERMI_MODEL", "FERMI_DEVICE", "FERMI_API_KEY", "FERMI_SERVED_MODEL_NAME",
                "FERMI_CHAT_TEMPLATE", "FERMI_CTX_SIZE", "FERMI_ENGINE_POOL", "FERMI_MAX_QUEUE",
                "FERMI_THREADS", "FERMI_LOG_FORMAT"):  # fmt: skip
        assert var.replace("_", "") in words.replace("_", "").replace(" ", ""), var


def test_help_loses_no_text_to_markup():
    export, _ = terminal("export", "--help")
    words = flat(export)
    assert "auto (this machine's device, as FERMI_DEVICE picks it)" in words
    assert "fp32 on CPU, fp16 on CUDA/CoreML" in words
    assert "()" not in words.replace("(auto)", "")
    chat = flat(terminal("chat", "--help")[0])
    assert "env var: FERMI_MODEL" in chat and "env var: FERMI_DEVICE" in chat
    assert "--ctx-size" in chat and "--chat-template" in chat and "--threads" in chat


def test_version():
    done = subprocess.run([sys.executable, "-m", "fermi.cli", "--version"], capture_output=True,
                          text=True, env=ENV)  # fmt: skip
    assert done.returncode == 0 and done.stdout == f"fermi {__version__}\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--log-format", "xml"], "plain or json"),
        (["--ctx-size", "999999"], "larger than the model's context"),
        (["--chat-template", "/nonexistent/template.jinja"], "does not exist"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
    ],
)
def test_bad_flag_values_are_one_line_and_exit_2(tiny_artifact, args, message):
    command = [sys.executable, "-m", "fermi.cli", "serve", "openai", "--model",
               str(tiny_artifact), "--host", "127.0.0.1", "--port", "0", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr.replace("\n", " ") or message in flat(done.stderr)
    assert "Traceback" not in done.stderr


def test_env_variable_feeds_the_flag(tiny_artifact):
    """FERMI_CTX_SIZE reaches the runtime as --ctx-size would (and is checked the same way)."""
    command = [sys.executable, "-m", "fermi.cli", "serve", "openai", "--model",
               str(tiny_artifact), "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
    env = ENV | {"FERMI_CTX_SIZE": "999999"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "999999" in done.stderr


def test_chat_template_flag_replaces_the_models(tiny_artifact, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\nTEMPLATE-OVERRIDE "
    )
    from fermi.runtime import Runtime
    from fermi.settings import Settings

    runtime = Runtime.load(Settings(model=str(tiny_artifact), chat_template=str(template)))
    assert "TEMPLATE-OVERRIDE" in runtime.template.render([], enable_thinking=False)
    assert runtime.info.supports_tools is False  # the override renders no tools


def test_export_progress_on_a_terminal_not_in_a_pipe(tmp_path):
    screen, status = terminal("export", "tiny-qwen3", "--output", str(tmp_path / "tty"))
    assert status == 0
    for line in ("converting tensors", "writing model.onnx.data", "hashing"):
        assert line in screen
    assert re.search(r"converting tensors\s+━+\s+(\d+)/\1", screen)  # finished: N/N
    piped = subprocess.run(
        [sys.executable, "-m", "fermi.cli", "export", "tiny-qwen3", "--output",
         str(tmp_path / "pipe")], capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert piped.returncode == 0
    assert piped.stderr == "" and piped.stdout.strip() == str(tmp_path / "pipe")
