"""Bad command lines as a user meets them: every mistake is one line on stderr naming what is
wrong, exit 2, no traceback and no Rich box; nothing waits for a model to load first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli_flags import ENV, terminal

ROOT = Path(__file__).resolve().parents[1]


def fermi(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fermi.cli", *args], capture_output=True,
                          text=True, env=ENV | (env or {}), timeout=timeout)  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args, needles",
    [
        (["serve", "grpc", "--port", "99999"], ["--port", "65535"]),
        (["serve", "openai", "--port", "99999"], ["--port", "65535"]),
        (["serve", "openai", "--port", "-1"], ["--port"]),
        (["chat", "--bogus"], ["--bogus", "--help"]),
        (["chat", "--temperature", "abc"], ["--temperature"]),
        (["chat", "--max-new-tokens", "-2"], ["--max-new-tokens", "-1"]),
        (["chat", "--threads", "-1"], ["--threads"]),
        (["chat", "--chat-template", "/nonexistent/t.jinja"], ["/nonexistent/t.jinja"]),
        (["chat", "--device", "tpu"], ["--device", "tpu"]),
        (["chat", "--precision", "int3"], ["--precision", "int3"]),
        (["serve", "openai", "--precision", "fp64"], ["--precision", "fp64"]),
        (["chat", "--model", "tiny-qwen3", "--top-p", "5"], ["top_p"]),
        (["chat", "--model", "tiny-qwen3", "--temperature", "-1"], ["temperature"]),
        (["chat", "--model", "tiny-qwen3", "--repeat-penalty", "0"], ["repetition_penalty"]),
    ],
)
def test_usage_errors_are_one_line(args, needles):
    done = fermi(*args)
    assert_one_line_error(done, *needles)
    assert "loading" not in done.stderr  # sampling flags are checked before the model loads


@pytest.mark.parametrize("kind, variable", [("grpc", "FERMI_GRPC_ADDR"),
                                            ("openai", "FERMI_OPENAI_ADDR")])  # fmt: skip
def test_out_of_range_port_in_the_environment(kind, variable):
    assert_one_line_error(fermi("serve", kind, env={variable: "127.0.0.1:99999"}), "65535")


def test_usage_error_on_a_terminal_is_one_line():
    screen, status = terminal("chat", "--bogus")
    assert status == 2
    lines = screen.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No such option: --bogus"), screen
    assert "╭" not in screen and "Traceback" not in screen


def test_help_is_unchanged_and_exits_0():
    done = fermi("chat", "--help")
    assert done.returncode == 0 and "--max-new-tokens" in done.stdout
    bare = fermi()
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("paths") / "afile"
    path.write_text("not a directory")
    return path


def test_export_under_a_file(a_file):
    assert_one_line_error(
        fermi("export", "tiny-qwen3", "--output", str(a_file / "sub")), str(a_file / "sub")
    )


def test_export_under_a_missing_root():
    assert_one_line_error(
        fermi("export", "tiny-qwen3", "--output", "/proc/nope/x"), "cannot create /proc/nope/x"
    )


def test_artifacts_setting_is_a_file(a_file):
    env = {"FERMI_ARTIFACTS": str(a_file)}
    assert_one_line_error(fermi("export", "tiny-qwen3", env=env), str(a_file))
    done = fermi("chat", "--model", "tiny-qwen3", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot create {a_file}")


def test_export_of_a_truncated_checkpoint(tmp_path):
    built = fermi("export", "tiny-qwen3", env={"FERMI_ARTIFACTS": str(tmp_path / "a")})
    assert built.returncode == 0, built.stderr
    checkpoint = tmp_path / "a" / ".checkpoints" / "tiny-qwen3"
    copy = tmp_path / "truncated"
    copy.mkdir()
    for file in checkpoint.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    with (copy / "model.safetensors").open("r+b") as f:
        f.truncate(100_000)
    done = fermi("export", str(copy), "--output", str(tmp_path / "out"))
    assert_one_line_error(done, str(copy / "model.safetensors"), "truncated")


@pytest.mark.parametrize("model", ["artifacts/typo-dir", "./typo-dir", "../typo-dir/x"])
@pytest.mark.parametrize("command", ["chat", "export"])
def test_a_missing_path_is_not_a_hub_id(tmp_path, model, command):
    """MODEL that is plainly a path (a local first directory, or ./ ../) and does not exist is
    said to be missing, not looked up on the hub; `org/name` stays a hub id."""
    (tmp_path / "artifacts").mkdir()
    args = [command, "--model", model] if command == "chat" else [command, model]
    done = subprocess.run([sys.executable, "-m", "fermi.cli", *args], capture_output=True,
                          text=True, env=ENV | {"PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: no such file or directory: {model}"
    hub = subprocess.run([sys.executable, "-m", "fermi.cli", "export", "nobody/typo-dir"],
                         capture_output=True, text=True, env=ENV | {"PYTHONPATH": str(ROOT)},
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert hub.returncode == 2 and "Hugging Face" in hub.stderr


def test_portable_export_defaults_to_the_machines_precision(tmp_path):
    """`--target portable` on a CPU machine is fp32, as README's table says; FERMI_DEVICE=cuda
    (exporting for a GPU elsewhere) makes it fp16."""
    import json

    for device, precision in (("cpu", "fp32"), ("cuda", "fp16")):
        out = tmp_path / device
        env = {"FERMI_DEVICE": device, "FERMI_ARTIFACTS": str(tmp_path / "a")}
        done = fermi("export", "tiny-qwen3", "--target", "portable", "--output", str(out), env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "fermi.json").read_text())["precision"] == precision


@pytest.mark.parametrize("command", [["chat"], ["serve", "openai"], ["serve", "grpc"]])
def test_precision_that_an_artifact_does_not_have(tiny_artifact, command):
    """An artifact directory is one precision: asking it for another is a one-line error that
    says what to pass instead, before any model loads or port opens."""
    done = fermi(*command, "--model", str(tiny_artifact), "--precision", "int4")
    assert_one_line_error(done, "the fp32 export, not int4", "source")


def test_precision_picks_which_export_of_a_source_is_served(tmp_path):
    """--precision on chat/serve exports the source at that precision on first use and loads
    it; the default export is left alone."""
    from fermi.runtime import Runtime
    from fermi.settings import Settings

    settings = Settings(model="tiny-qwen3", device="cpu", artifacts=str(tmp_path), offline=True)
    runtime = Runtime.load(settings.replace(precision="int8"))
    try:
        assert runtime.manifest.precision == "int8"
        exports = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert exports == ["tiny-qwen3-int8-cpu"]
    finally:
        runtime.shutdown()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--prompt-lengths", "abc"], ["--prompt-lengths", "'abc'"]),
        (["--concurrency", "0"], ["--concurrency"]),
    ],
)
def test_bench_number_lists_name_their_option(args, needles):
    assert_one_line_error(fermi("bench", "--model", "tiny-qwen3", *args), *needles)


def test_bench_without_httpx_says_so_before_measuring():
    """Without the bench extra, the server measurement's client is missing: one line naming the
    extra, before any engine is measured (it used to fail with a traceback after them)."""
    code = (
        "import sys; sys.modules['httpx'] = None; sys.argv = ['fermi', 'bench', '--model', "
        "'tiny-qwen3', '--quick']; from fermi.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=120)  # fmt: skip
    assert_one_line_error(done, "httpx", "fermi[bench]", "--no-server")
