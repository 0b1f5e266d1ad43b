"""Artifacts are what the manifest says: sha256 checked at the first load and whenever a file's
size, mtime or inode changed (recorded in between), `fermi verify` on demand, malformed
manifests and graphs refused with one line and exit 2 (never a server that reports healthy),
and staged directories of killed exports removed by the next export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.staging import remove_stale
from fermi.artifact import MANIFEST, WEIGHTS_FILE, load_manifest
from fermi.engine import Engine
from fermi.errors import ArtifactError
from fermi.verify import record_path, verify_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Verification records go to a cache of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def artifact(tiny_artifact, tmp_path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    return copy


def flip_byte(path: Path, offset: int | None = None, keep_mtime: bool = False) -> None:
    """Change one byte in place: same size (and, if asked, the same mtime)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    with path.open("r+b") as f:  # in place: the inode stays
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def edit_manifest(artifact: Path, **changes) -> None:
    path = artifact / MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 180):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- verification at load --------------------------------------------------------------------


def test_first_load_hashes_later_loads_use_the_record(artifact):
    manifest = load_manifest(artifact)
    first = verify_files(artifact, manifest)
    assert first.hashed == len(manifest.files) and record_path(artifact).is_file()
    assert verify_files(artifact, manifest).hashed == 0
    os.utime(artifact / WEIGHTS_FILE)  # touched: that file is hashed again, only that one
    assert verify_files(artifact, manifest).hashed == 1


def test_a_flipped_byte_is_caught_at_load(artifact):
    flip_byte(artifact / WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match="model.onnx.data fails its sha256 check"):
        Engine(artifact, device="cpu")


def test_a_flipped_byte_after_verification_is_caught_when_mtime_changes(artifact):
    Engine(artifact, device="cpu")  # verified and recorded
    flip_byte(artifact / WEIGHTS_FILE)  # writing moves mtime
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        Engine(artifact, device="cpu")


def test_verify_hashes_everything_even_when_the_stamp_was_kept(artifact, tmp_path):
    Engine(artifact, device="cpu")
    flip_byte(artifact / WEIGHTS_FILE, keep_mtime=True)  # size, mtime and inode unchanged
    one_line_error(cli("verify", str(artifact), cwd=tmp_path), "fails its sha256 check")


def test_verify_ok(artifact, tmp_path):
    done = cli("verify", str(artifact), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {artifact}") and "6 files" in done.stdout


CORRUPTIONS = {
    "truncated weights": (
        lambda a: os.truncate(a / WEIGHTS_FILE, 1000),
        "model.onnx.data has 1000 bytes",
    ),
    "missing tokenizer": (lambda a: (a / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "manifest not JSON": (lambda a: (a / MANIFEST).write_text("{not json"), "not a valid manifest"),
    "manifest not an object": (lambda a: (a / MANIFEST).write_text("[]"), "not a valid manifest"),
    "manifest missing a field": (
        lambda a: (a / MANIFEST).write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((a / MANIFEST).read_text()).items()
                    if k != "num_layers"
                }
            )  # fmt: skip
        ),
        "num_layers",
    ),
    "num_layers edited": (lambda a: edit_manifest(a, num_layers=3), "num_layers=3"),
    "num_layers a string": (lambda a: edit_manifest(a, num_layers="2"), "num_layers"),
    "head_dim edited": (lambda a: edit_manifest(a, head_dim=16), "head_dim=16"),
    "files entry broken": (lambda a: edit_manifest(a, files={"x": 1}), "files"),
    "file outside the artifact": (
        lambda a: edit_manifest(a, files={"../secret": {"sha256": "0", "bytes": 1}}),
        "inside the artifact",
    ),
    "graph not ONNX": (
        lambda a: (
            (a / "model.onnx").write_bytes(b"garbage" * 10),
            edit_manifest(
                a,
                files={
                    **json.loads((a / MANIFEST).read_text())["files"],
                    "model.onnx": {
                        "sha256": __import__("hashlib").sha256(b"garbage" * 10).hexdigest(),
                        "bytes": 70,
                    },
                },
            ),
        ),
        "model.onnx",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_artifacts_are_one_line_errors(artifact, tmp_path, name):
    corrupt, words = CORRUPTIONS[name]
    corrupt(artifact)
    with pytest.raises(ArtifactError):
        Engine(artifact, device="cpu")
    one_line_error(cli("verify", str(artifact), cwd=tmp_path), words)


@pytest.mark.parametrize("kind", ["openai", "grpc"])
def test_a_server_on_a_corrupt_artifact_exits_2_with_one_line(artifact, tmp_path, kind):
    """Never a server that reports healthy and then fails every request."""
    edit_manifest(artifact, num_layers=3)
    done = cli(
        "serve", kind, "--model", str(artifact), "--device", "cpu", "--port", "0", cwd=tmp_path
    )
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(error) == 1, done.stderr[-3000:]
    assert "num_layers=3" in error[0] and "Traceback" not in done.stderr


# -- staged directories of interrupted exports -----------------------------------------------


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the flock of `path` (an export in progress)."""
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_stale_staging_is_removed_but_a_running_export_is_kept(tmp_path):
    stale = tmp_path / ".model.tmp-111"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"x" * 1000)
    (tmp_path / ".model.tmp-111.lock").touch()  # its owner died: nobody holds the lock
    running = tmp_path / ".other.tmp-222"
    running.mkdir()
    holder = hold_lock(tmp_path / ".other.tmp-222.lock")
    unrelated = tmp_path / ".cache.tmp-notapid"
    unrelated.mkdir()
    user_dir = tmp_path / "my.tmp-333"  # not fermi's naming: never touched
    user_dir.mkdir()
    try:
        assert remove_stale(tmp_path) == [stale]
        assert not stale.exists() and not (tmp_path / ".model.tmp-111.lock").exists()
        assert running.exists() and unrelated.exists() and user_dir.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale(tmp_path) == [running]  # its owner is gone now


def _kill_an_export(output, args, cwd) -> list:
    """Start an export and kill -9 it once its staged directory exists; the staged directories
    it left (empty when the export won the race and finished first)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FERMI_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fermi.cli", *args, "--output", str(output)],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staged = []
    deadline = time.monotonic() + 120
    while not staged and proc.poll() is None:
        assert time.monotonic() < deadline
        staged = [p for p in output.parent.glob(".tiny.tmp-*") if p.is_dir()]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [p for p in staged if p.exists()]


def test_a_killed_export_is_cleaned_up_by_the_next(tmp_path):
    output = tmp_path / "artifacts" / "tiny"
    args = ("export", "tiny-qwen3", "--precision", "fp32", "--target", "cpu")
    for _ in range(5):  # the tiny export can finish between seeing its directory and the kill
        if left := _kill_an_export(output, args, tmp_path):
            break
        shutil.rmtree(output, ignore_errors=True)
    else:
        pytest.fail("the export finished before it could be killed, five times")
    assert left[0].exists()  # kill -9 leaves it behind
    done = cli(*args, "--output", str(output), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [] and load_manifest(output)
