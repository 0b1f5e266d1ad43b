"""Write a directory under a temporary sibling name and rename it into place at the end, so
that readers never see a half-written artifact or checkpoint.

A staged directory `.NAME.tmp-PID` is owned through an exclusive lock (flock) on the sibling
file `.NAME.tmp-PID.lock`, taken before the directory is made and held until it is renamed or
removed. The operating system drops the lock when the process dies, however it dies (kill -9
included), so the next export in the same parent directory removes staged directories whose
lock it can take: those of interrupted exports, never those of an export still running."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fermi.errors import ArtifactError

try:
    import fcntl
except ImportError:  # Windows: no flock; stale directories are found by their pid alone
    fcntl = None

log = logging.getLogger("fermi.export")

STAGED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _lock_path(parent: Path, name: str, pid: int) -> Path:
    return parent / f".{name}.tmp-{pid}.lock"


def _try_lock(path: Path):
    """An open file holding an exclusive lock on `path`, or None when another process holds it."""
    handle = path.open("a+")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove the staged directories in `parent` that interrupted exports left behind (their
    lock is free, or, without a lock file, their pid is gone); returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = STAGED.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        lock = _lock_path(parent, match["name"], pid)
        if lock.exists():
            handle = _try_lock(lock)
            if handle is None:
                continue  # an export in progress
            with handle:
                shutil.rmtree(entry, ignore_errors=True)
                lock.unlink(missing_ok=True)
        elif pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        log.info("removed %s, left by an interrupted export", entry)
        removed.append(entry)
    return removed


def _cannot_create(output: Path, error: OSError) -> ArtifactError:
    culprit = f" ({error.filename})" if error.filename not in (None, str(output)) else ""
    return ArtifactError(f"cannot create {output}: {error.strerror or error}{culprit}")


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `output`; on success it replaces `output`, on any
    failure (Ctrl-C included) it is removed and `output` is left as it was. Staged directories
    of interrupted exports beside `output` are removed first. Raises ArtifactError when the
    directory cannot be made (a parent is a file, no permission, a read-only file system)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(output.parent)
        lock_path = _lock_path(output.parent, output.name, os.getpid())
        lock = _try_lock(lock_path)
    except OSError as e:
        raise _cannot_create(output, e) from None
    if lock is None:  # another thread of this process is exporting the same output
        raise RuntimeError(f"{output} is already being exported by this process")
    directory = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.mkdir()
        except OSError as e:
            raise _cannot_create(output, e) from None
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
    finally:
        lock_path.unlink(missing_ok=True)
        lock.close()
