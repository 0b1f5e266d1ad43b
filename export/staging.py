"""Write a directory under a temporary sibling name and rename it into place at the end, so
that readers never see a half-written artifact or checkpoint."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `output`; on success it replaces `output`, on any
    failure (Ctrl-C included) it is removed and `output` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    directory = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    try:
        yield directory
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)  # left by a crashed run with our pid
        if output.exists():
            output.rename(old)
        directory.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
