"""Back the memory onnxruntime allocates while loading a model with 2 MiB transparent huge pages
(Linux), so that a decode step, which reads every weight once, walks 512x fewer page-table
entries.

onnxruntime copies quantized weights (MatMulNBits) into buffers of its own when it loads a
model ("prepacking"): 110 MiB for SmolLM2-135M int4, 550 MiB for the Qwen3-0.6B shape. glibc's
malloc gives them 4 KiB pages, and most Linux distributions set transparent huge pages to
"madvise", so they stay 4 KiB pages unless the program asks. fermi asks after the session is
built: every private anonymous mapping that appeared or changed while it loaded gets
madvise(MADV_HUGEPAGE), for the pages it will take later, and madvise(MADV_COLLAPSE) (Linux
6.1+), which rebuilds the pages it already holds as huge pages (madvise(2); the kernel's
Documentation/admin-guide/mm/transhuge.rst). numpy advises huge pages for its large arrays the
same way (numpy/_core/src/multiarray/alloc.c).

The collapse copies what the mappings hold (about 0.6 s for 370 MiB on a 2-core VM), so it runs
on a background thread while the model already serves. Float weights that onnxruntime reads
straight from the memory-mapped `model.onnx.data` are file pages, which this does not touch.
Where the kernel refuses (transparent huge pages set to "never", an older kernel, not Linux),
the memory stays as it was: nothing here raises. Measured in docs/benchmarks.md ("Huge pages
for the weights").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path

HUGE_PAGE = 2 << 20  # bytes: x86-64 and arm64 (4 KiB base pages) transparent huge pages
MADV_HUGEPAGE = 14  # <asm-generic/mman-common.h>
MADV_COLLAPSE = 25  # Linux 6.1
MAPS = Path("/proc/self/maps")


def anonymous_mappings() -> set[tuple[int, int]]:
    """(start, end) addresses of this process's private read-write mappings backed by no file:
    /proc/self/maps lines with no path, and the heap (malloc serves allocations under its
    mmap threshold from it, and the threshold rises as large blocks are freed, so many weight
    buffers land there). Empty where the file cannot be read (not Linux)."""
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        return set()
    regions = set()
    for line in lines:
        fields = line.split()
        if fields[1] == "rw-p" and (len(fields) == 5 or fields[5:] == ["[heap]"]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.add((start, end))
    return regions


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def collapse(regions) -> int:
    """Advise and collapse the whole 2 MiB pages inside each (start, end) region, largest first;
    returns the bytes the kernel collapsed (0 where it refuses). The regions must be mapped
    memory of this process: anonymous_mappings() gives them."""
    madvise = _madvise()
    if madvise is None:
        return 0
    done = 0
    for start, end in sorted(regions, key=lambda r: r[0] - r[1]):
        first = -(-start // HUGE_PAGE) * HUGE_PAGE
        size = (end // HUGE_PAGE) * HUGE_PAGE - first
        if size < HUGE_PAGE:
            continue
        if madvise(first, size, MADV_HUGEPAGE) != 0:
            continue  # transparent huge pages are off, or not in this kernel
        if madvise(first, size, MADV_COLLAPSE) == 0:
            done += size
    return done


def refused_mappings() -> list[tuple[int, int]]:
    """(start, end) of the mappings whose owner asked for no huge pages (MADV_NOHUGEPAGE: the
    "nh" flag in /proc/self/smaps), such as the KV pool's buffers (fermi/kv_pool.py)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    refused, current = [], None
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            current = tuple(int(x, 16) for x in head.split("-"))
        elif head == "VmFlags:" and current is not None and " nh" in f" {line[8:]}":
            refused.append(current)
    return refused


def overlaps(regions, mappings) -> list[tuple[int, int]]:
    """The parts of `regions` that lie inside `mappings`, both (start, end) lists."""
    parts = []
    for start, end in regions:
        for low, high in mappings:
            if low < end and start < high:
                parts.append((max(start, low), min(end, high)))
    return parts


def subtract(regions, holes) -> list[tuple[int, int]]:
    """`regions` without the address ranges of `holes`, both (start, end) lists."""
    for low, high in holes:
        kept = []
        for start, end in regions:
            if end <= low or high <= start:
                kept.append((start, end))
                continue
            if start < low:
                kept.append((start, low))
            if high < end:
                kept.append((high, end))
        regions = kept
    return list(regions)


class HugePages:
    """Collapses, on a daemon thread, the anonymous mappings that appeared or changed since
    `before` (a snapshot from anonymous_mappings()). `wait()` blocks until it is done and
    returns the bytes collapsed."""

    def __init__(self, before: set[tuple[int, int]]):
        self.collapsed = 0
        regions = sorted(anonymous_mappings() - before)
        self._thread = threading.Thread(
            target=self._run, args=(regions,), name="huge-pages", daemon=True
        )
        self._thread.start()

    def _run(self, regions: list[tuple[int, int]]) -> None:
        # What is still anonymous memory of those address ranges (the heap may have moved its
        # end, a mapping may have merged with a neighbour), less any mapping that refuses huge
        # pages: a range freed since the snapshot may now hold the KV pool's buffers.
        live = overlaps(regions, sorted(anonymous_mappings()))
        self.collapsed = collapse(subtract(live, refused_mappings()))

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        return self.collapsed
