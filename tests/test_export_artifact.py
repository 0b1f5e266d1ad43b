"""The artifact directory and export_model's contract: manifest, integrity, reuse and --force,
atomic replacement, model resolution errors (through the CLI, as a user meets them)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from export import exporter, tiny
from export.exporter import export_model
from fermi.artifact import WEIGHTS_FILE, load_manifest
from fermi.errors import ArtifactError, InvalidRequest, ModelNotFound, UnsupportedArchitecture
from fermi.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_describes_the_artifact(tiny_artifact):
    m = load_manifest(tiny_artifact, verify_hashes=True)
    assert (m.source, m.revision, m.architecture) == (
        "tiny-qwen3",
        tiny.REVISION,
        "Qwen3ForCausalLM",
    )
    assert (m.precision, m.target, m.kv_dtype) == ("fp32", "portable", "float32")
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.context_length) == (2, 2, 32, 4096)
    assert m.vocab_size % 64 == 0
    tokenizer = tiny.train_tokenizer()
    assert m.eos_token_ids == [
        tokenizer.token_to_id("<|im_end|>"),
        tokenizer.token_to_id("<|endoftext|>"),
    ]
    assert m.supports_thinking
    assert m.inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m.inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert m.outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert len(m.outputs) == 1 + 2 * m.num_layers
    assert set(m.files) == {
        "model.onnx",
        "model.onnx.data",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert not [p for p in tiny_artifact.parent.iterdir() if p.name.startswith(".")]


def test_fp16_artifact_has_fp16_cache(tiny_artifact_fp16):
    m = load_manifest(tiny_artifact_fp16)
    assert (m.precision, m.kv_dtype) == ("fp16", "float16")


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def test_truncated_weights_are_rejected(tiny_artifact, tmp_path):
    artifact = copy_of(tiny_artifact, tmp_path)
    data = artifact / WEIGHTS_FILE
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(ArtifactError, match="model.onnx.data"):
        load_manifest(artifact)


def test_missing_file_is_rejected(tiny_artifact, tmp_path):
    artifact = copy_of(tiny_artifact, tmp_path)
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        load_manifest(artifact)


def identity(artifact: Path) -> tuple[int, int]:
    stat = (artifact / WEIGHTS_FILE).stat()
    return stat.st_ino, stat.st_mtime_ns


def test_valid_artifact_is_reused_and_force_rebuilds(tmp_path):
    out = tmp_path / "tiny"
    first = identity(export_model("tiny-qwen3", precision="fp32", output=out))
    assert export_model("tiny-qwen3", precision="fp32", output=out) == out
    assert identity(out) == first
    export_model("tiny-qwen3", precision="fp32", output=out, force=True)
    assert identity(out) != first
    load_manifest(out)


def test_other_precision_or_broken_artifact_is_rebuilt(tmp_path):
    out = tmp_path / "tiny"
    export_model("tiny-qwen3", precision="fp32", output=out)
    export_model("tiny-qwen3", precision="fp16", output=out)
    assert load_manifest(out).precision == "fp16"
    os.truncate(out / WEIGHTS_FILE, 10)
    export_model("tiny-qwen3", precision="fp16", output=out)
    load_manifest(out)


def test_default_output_is_under_the_artifacts_root(tmp_path):
    settings = Settings(artifacts=str(tmp_path))
    assert export_model("tiny-qwen3", precision="fp32", settings=settings) == (
        tmp_path / "tiny-qwen3-fp32"
    )


def test_interrupted_export_leaves_the_old_artifact(tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    export_model("tiny-qwen3", precision="fp32", output=out)
    before = identity(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "copy_checkpoint_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model("tiny-qwen3", precision="fp32", output=out, force=True)
    with pytest.raises(KeyboardInterrupt):
        export_model("tiny-qwen3", precision="fp32", output=tmp_path / "fresh")
    assert identity(out) == before
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging leftovers


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a fermi artifact"):
        export_model("tiny-qwen3", precision="fp32", output=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_precision(tmp_path):
    with pytest.raises(InvalidRequest, match="fp16, fp32"):
        export_model("tiny-qwen3", precision="int3", output=tmp_path / "x")


def checkpoint_with_config(tmp_path: Path, **changes) -> Path:
    """The tiny checkpoint with config.json edited."""
    directory = Path(shutil.copytree(tiny.checkpoint_path(), tmp_path / "ckpt"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def test_checkpoint_without_generation_config_or_thinking_template(tmp_path):
    checkpoint = checkpoint_with_config(tmp_path, eos_token_id=7)
    (checkpoint / "generation_config.json").unlink()
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    manifest = load_manifest(export_model(str(checkpoint), "fp32", tmp_path / "out"))
    assert manifest.eos_token_ids == [7]
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {
        "eos_token_id": 7
    }
    assert manifest.supports_thinking is False
    assert manifest.source == str(checkpoint.resolve()) and manifest.revision is None


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    checkpoint = checkpoint_with_config(
        tmp_path, architectures=["GemmaForCausalLM"], model_type="gemma"
    )
    with pytest.raises(UnsupportedArchitecture) as error:
        export_model(str(checkpoint), precision="fp32", output=tmp_path / "out")
    message = str(error.value)
    assert "GemmaForCausalLM" in message
    assert "Qwen3ForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert not (tmp_path / "out").exists()


def test_unsupported_rope_scaling_is_refused(tmp_path):
    checkpoint = checkpoint_with_config(
        tmp_path,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
    )
    with pytest.raises(UnsupportedArchitecture, match="longrope"):
        export_model(str(checkpoint), precision="fp32", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        export_model(str(tmp_path / "empty"), precision="fp32", output=tmp_path / "out")


def fermi_export(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m fermi.cli export ...` with an empty HF cache and artifacts root."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "FERMI_OFFLINE", "HF_ENDPOINT")
    }
    environ.update(HF_HOME=str(tmp_path / "hf"), FERMI_ARTIFACTS=str(tmp_path / "artifacts"), **env)
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli", "export", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_offline_uses_the_hf_cache_and_records_the_commit(tmp_path, fake_hub):
    """A model in the standard HF cache layout exports offline; its revision is the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--Tiny"
    shutil.copytree(tiny.checkpoint_path(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    url, requests = fake_hub
    result = fermi_export(
        tmp_path,
        "someone/Tiny",
        "--precision",
        "fp32",
        HF_ENDPOINT=url,
        FERMI_OFFLINE="1",
        FERMI_DEVICE="cpu",
    )
    assert result.returncode == 0, result.stderr
    artifact = Path(result.stdout.strip())
    assert artifact == tmp_path / "artifacts" / "Tiny-fp32-cpu"  # this machine's target
    manifest = load_manifest(artifact)
    assert (manifest.source, manifest.revision) == ("someone/Tiny", commit)
    assert requests == []


def test_cli_defaults_make_what_the_runtime_loads(tmp_path):
    """`fermi export MODEL` with no options writes the artifact that `--model MODEL` resolves
    to on this device (the cpu target at fp32 for cpu), so chat and serve reuse it as is."""
    from fermi.models import resolve_artifact
    from fermi.settings import load_settings

    result = fermi_export(tmp_path, "tiny-qwen3", FERMI_DEVICE="cpu")
    assert result.returncode == 0, result.stderr
    artifact = Path(result.stdout.strip())
    manifest = load_manifest(artifact)
    assert (manifest.precision, manifest.target) == ("fp32", "cpu")
    written = (artifact / "model.onnx").stat().st_mtime_ns
    settings = load_settings(
        {"FERMI_ARTIFACTS": str(tmp_path / "artifacts"), "FERMI_DEVICE": "cpu"}
    )
    assert resolve_artifact("tiny-qwen3", "fp32", settings) == artifact
    assert (artifact / "model.onnx").stat().st_mtime_ns == written


def test_cli_hub_unreachable(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = fermi_export(tmp_path, "some/Model", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert_one_line_error(result, "some/Model", "unreachable")


class RepoNotFound(http.server.BaseHTTPRequestHandler):
    """Answers like the Hub does for a repository that does not exist."""

    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    """A local endpoint standing in for the Hub; yields its URL and the paths it was asked."""
    RepoNotFound.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RepoNotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", RepoNotFound.requests
    server.shutdown()


def test_cli_unknown_model_id(tmp_path, fake_hub):
    url, requests = fake_hub
    result = fermi_export(tmp_path, "nobody/NoSuchModel", HF_ENDPOINT=url)
    assert_one_line_error(result, "nobody/NoSuchModel", "not a model on the Hugging Face Hub")
    assert requests  # it really asked


@pytest.mark.parametrize("variable", ["FERMI_OFFLINE", "HF_HUB_OFFLINE"])
def test_cli_offline_without_cache(tmp_path, fake_hub, variable):
    url, requests = fake_hub
    result = fermi_export(tmp_path, "some/Model", HF_ENDPOINT=url, **{variable: "1"})
    assert_one_line_error(result, "some/Model", "run once online or pass a local checkpoint")
    assert requests == []  # offline means no network at all


def test_cli_exports_tiny_without_torch(tmp_path):
    out = tmp_path / "tiny"
    result = fermi_export(tmp_path, "tiny-qwen3", "--precision", "fp32", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    load_manifest(out)
    # The export package (imported here as serving would) pulls in neither torch nor
    # transformers.
    check = (
        "import sys, export.exporter, export.random_checkpoint, export.tiny; "
        "export.exporter.export_model('tiny-qwen3', precision='fp16', output=sys.argv[1]); "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'transformers')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "tiny16")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_explicit_output_holding_another_model_needs_force(tmp_path):
    out = tmp_path / "mine"
    export_model("tiny-qwen3", precision="fp32", output=out)
    checkpoint = checkpoint_with_config(tmp_path, eos_token_id=7)
    with pytest.raises(ArtifactError, match="holds an export of tiny-qwen3.*--force"):
        export_model(str(checkpoint), "fp32", out)
    assert load_manifest(out).source == "tiny-qwen3"
    export_model(str(checkpoint), "fp32", out, force=True)
    assert load_manifest(out).source == str(checkpoint.resolve())
