"""Where a model's checkpoint comes from: a built-in model (export/builtin.py), a local checkpoint
directory or GGUF file, or the Hugging Face Hub (a repo snapshot, or one GGUF file of a repo,
downloaded into the standard HF cache)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
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

from fermi.errors import InvalidRequest, ModelNotFound
from fermi.settings import Settings

# Weights, configs, tokenizer files and chat templates; never *.bin/*.pt duplicates of the weights.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "tokenizer*"]


@dataclass(frozen=True)
class Source:
    name: str  # recorded in the manifest: hub id, absolute local path or a built-in name
    directory: Path  # the local checkpoint directory (for a GGUF source, the file's directory)
    revision: str | None  # the resolved commit for hub models
    gguf_file: Path | None = None  # a GGUF source: the file itself

    @property
    def model_name(self) -> str:
        name = self.name.rstrip("/").split("/")[-1]
        return name.removesuffix(".gguf") if self.gguf_file and name.endswith(".gguf") else name


def resolve(
    model: str, revision: str | None, settings: Settings, gguf_file: str | None = None
) -> Source:
    """MODEL (built-in name, checkpoint dir, .gguf file or hub id) as a local Source; a hub
    repo's GGUF file is named by `gguf_file`. Raises ModelNotFound with one actionable line, and
    InvalidRequest when `revision` or `gguf_file` is given with a built-in model, `revision`
    with a local path, or `gguf_file` with a file."""
    from export.builtin import REGISTRY

    if model in REGISTRY:
        check_builtin_options(model, revision, gguf_file)
        return REGISTRY[model].source(settings)
    path = Path(model).expanduser()
    if revision is not None and (path.exists() or path.suffix == ".gguf"):
        raise InvalidRequest(
            f"--revision applies to hub ids only, and {model} is a local path: drop --revision, "
            "or check out that revision of the checkpoint yourself",
            param="revision",
        )
    if path.is_dir() and gguf_file is not None:
        return local_gguf(path / gguf_file)
    if path.is_dir():
        return Source(str(path.resolve()), path.resolve(), None)
    if path.is_file() or path.suffix == ".gguf":
        if gguf_file is not None:
            raise InvalidRequest(
                f"--gguf-file names a file in a hub repo or a local directory, and {model} is "
                "a file: drop --gguf-file, or pass the directory that holds the GGUF file",
                param="gguf_file",
            )
        return local_gguf(path)
    if looks_like_path(model):
        raise ModelNotFound(f"no such file or directory: {model}")
    if gguf_file is not None:
        return download_gguf(model, gguf_file, revision, settings.offline)
    return download(model, revision, settings.offline)


def check_builtin_options(model: str, revision: str | None, gguf_file: str | None) -> None:
    """A built-in model is one fixed checkpoint: raises InvalidRequest (naming the option and
    what to pass instead) when a hub revision or a repo's GGUF file is asked of it."""
    if gguf_file is not None:
        raise InvalidRequest(
            f"--gguf-file does not apply to the built-in model {model}: to export another GGUF "
            "file, pass a hub id (ORG/REPO --gguf-file NAME) or the local .gguf file itself",
            param="gguf_file",
        )
    if revision is not None:
        raise InvalidRequest(
            f"--revision does not apply to the built-in model {model} (its version is fixed): "
            "drop --revision, or pass a hub id (ORG/REPO --revision REV)",
            param="revision",
        )


def looks_like_path(model: str) -> bool:
    """MODEL is meant as a local path, not a hub id (`org/name`): it starts with ./ ../ / or ~,
    or its first component is a directory here (`artifacts/typo`)."""
    if model.startswith(("./", "../", "/", "~", f".{os.sep}", f"..{os.sep}", os.sep)):
        return True
    parts = Path(model).parts
    return len(parts) > 1 and Path(parts[0]).is_dir()


def local_gguf(path: Path) -> Source:
    if not path.is_file():
        raise ModelNotFound(f"{path} does not exist")
    path = path.resolve()
    return Source(str(path), path.parent, None, gguf_file=path)


def download_gguf(model: str, filename: str, revision: str | None, offline: bool) -> Source:
    """One GGUF file of a hub repo (hf_hub_download), failures as in `download`: raises
    ModelNotFound. When the Hub does not answer, only the cached copy is looked for, at once:
    hf_hub_download itself would retry for ~20 s, logging each try, before doing the same."""
    with hub_errors(model, revision, offline):
        cache_only = offline or not hub_answers(model, filename, revision)
        path = Path(
            hf_hub_download(model, filename, revision=revision, local_files_only=cache_only)
        )
    # hf_hub_download returns .../snapshots/<commit>/<filename>
    commit = path.parents[len(Path(filename).parts) - 1].name
    return Source(f"{model}/{filename}", path.parent, commit, gguf_file=path)


def hub_answers(model: str, filename: str, revision: str | None) -> bool:
    """Whether the Hub answers one HEAD request for the file (no retries, huggingface_hub's
    metadata timeout). An answer includes "no such repo, revision or file" and "not allowed",
    which hf_hub_download then reports; no connection, a timeout, a proxy error or a 408, 429 or
    5xx status is no answer (the cases hf_hub_download retries). Raises nothing."""
    try:
        get_hf_file_metadata(hf_hub_url(model, filename, revision=revision))
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        return status is not None and status < 500 and status not in (408, 429)
    except Exception:  # the HTTP client's connection errors; their types vary with its version
        return False
    return True


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
    with hub_errors(model, revision, offline):
        directory = Path(
            snapshot_download(
                model, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline
            )
        )
    # The snapshot directory is named after the commit it holds.
    return Source(model, directory, directory.name)


@contextmanager
def hub_errors(model: str, revision: str | None, offline: bool):
    """huggingface_hub's exceptions as ModelNotFound lines."""
    try:
        yield
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
    except EntryNotFoundError:  # after its subclass LocalEntryNotFoundError
        raise ModelNotFound(
            f"{model} has no such file on the Hugging Face Hub (check --gguf-file)"
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
