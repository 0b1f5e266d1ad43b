"""Where a model's checkpoint comes from: the built-in tiny-qwen3, a local checkpoint directory,
or the Hugging Face Hub (downloaded into the standard HF cache)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from export import tiny
from fermi.errors import ModelNotFound
from fermi.settings import Settings

# Weights, configs, tokenizer files and chat templates; never *.bin/*.pt duplicates of the weights.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "tokenizer*"]


@dataclass(frozen=True)
class Source:
    name: str  # recorded in the manifest: hub id, absolute local path or "tiny-qwen3"
    directory: Path  # the local checkpoint directory
    revision: str | None  # the resolved commit for hub models

    @property
    def model_name(self) -> str:
        return self.name.rstrip("/").split("/")[-1]


def resolve(model: str, revision: str | None, settings: Settings) -> Source:
    if model == tiny.NAME:
        return Source(tiny.NAME, tiny.checkpoint_path(settings), tiny.REVISION)
    path = Path(model).expanduser()
    if path.is_dir():
        return Source(str(path.resolve()), path.resolve(), None)
    return download(model, revision, settings.offline)


def download(model: str, revision: str | None, offline: bool) -> Source:
    """snapshot_download (with huggingface_hub's own progress bars on a terminal, none in a
    script or a log) with every failure turned into one actionable line."""
    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        return _download(model, revision, offline)
    finally:
        if quiet:
            enable_progress_bars()


def _download(model: str, revision: str | None, offline: bool) -> Source:
    try:
        directory = Path(
            snapshot_download(
                model, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline
            )
        )
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFound(
                f"{model} is not in the Hugging Face cache and offline mode is on "
                "(FERMI_OFFLINE/HF_HUB_OFFLINE): run once online or pass a local checkpoint "
                "directory"
            ) from None
        raise ModelNotFound(
            f"cannot download {model}: the Hugging Face Hub is unreachable and the model is not "
            "cached; check the network or pass a local checkpoint directory"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(
            f"{model} has no revision {revision!r} on the Hugging Face Hub"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"{model} is not a model on the Hugging Face Hub (or it is private or gated: log in "
            "with `hf auth login`); check the id or pass a local checkpoint directory"
        ) from None
    except HFValidationError:
        raise ModelNotFound(
            f"{model} is neither a local checkpoint directory nor a valid Hugging Face model id"
        ) from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"cannot download {model}: {str(e).splitlines()[0]}") from None
    # The snapshot directory is named after the commit it holds.
    return Source(model, directory, directory.name)
