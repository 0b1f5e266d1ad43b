"""Huge pages for the memory onnxruntime allocates at load (fermi/huge_pages.py): memory is
collapsed where the kernel allows it and kept intact, the engine's answers do not change, and
nothing fails where the kernel refuses."""

from __future__ import annotations

import ctypes
import mmap
import platform
from pathlib import Path

import numpy as np

from fermi import huge_pages
from fermi.engine import Engine
from fermi.kv_pool import HostMover
from fermi.runtime import Runtime
from fermi.settings import load_settings

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_collapses() -> bool:
    """Transparent huge pages on ("always" or "madvise") and MADV_COLLAPSE (Linux 6.1+)."""
    if platform.system() != "Linux" or not THP.exists() or "[never]" in THP.read_text():
        return False
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


def huge_bytes_at(start: int, end: int) -> int:
    """AnonHugePages of the mapping that holds [start, end), from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= start and end <= high
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def test_collapse_keeps_the_data_and_takes_huge_pages_where_the_kernel_allows():
    size = 8 * huge_pages.HUGE_PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(region, np.uint8)
    data[:] = np.arange(size, dtype=np.uint64).astype(np.uint8)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if platform.system() == "Linux":  # its own mapping, or merged into a neighbour's
        mappings = huge_pages.anonymous_mappings()
        assert any(low <= start and start + size <= high for low, high in mappings)

    collapsed = huge_pages.collapse([(start, start + size)])

    np.testing.assert_array_equal(data, np.arange(size, dtype=np.uint64).astype(np.uint8))
    if kernel_collapses():
        # the whole 2 MiB pages inside the mapping: all but the unaligned ends
        assert collapsed >= size - 2 * huge_pages.HUGE_PAGE
        assert huge_bytes_at(start, start + size) >= collapsed
    else:
        assert collapsed == 0
    del data
    region.close()


def test_collapse_of_memory_no_longer_mapped_fails_quietly():
    region = mmap.mmap(-1, 4 * huge_pages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    region.close()
    assert huge_pages.collapse([(start, start + 4 * huge_pages.HUGE_PAGE)]) == 0


def test_the_engine_answers_the_same_with_and_without_huge_pages(tiny_cpu_artifact):
    ids = list(range(3, 40))
    plain = Engine(tiny_cpu_artifact, "cpu", threads=1, huge_pages=False)
    assert plain.huge_pages is None
    paged = Engine(tiny_cpu_artifact, "cpu", threads=1)
    assert paged.huge_pages.wait(timeout=60) >= 0
    np.testing.assert_array_equal(
        paged.forward(ids, paged.new_cache()), plain.forward(ids, plain.new_cache())
    )


def test_the_setting_turns_it_off(monkeypatch, tiny_cpu_artifact):
    assert load_settings().huge_pages is True
    monkeypatch.setenv("FERMI_HUGE_PAGES", "0")
    settings = load_settings().replace(model=str(tiny_cpu_artifact), device="cpu")
    assert settings.huge_pages is False
    runtime = Runtime.load(settings)
    try:
        assert runtime.engine.huge_pages is None
    finally:
        runtime.shutdown()


def test_the_kv_pool_s_buffers_are_left_in_small_pages():
    """The KV pool marks its buffers MADV_NOHUGEPAGE (a row takes memory for the positions it
    holds); a collapse over their addresses, as after a load whose freed memory the pool took
    over, leaves them alone."""
    buffer = HostMover().empty((4, 2, 4096, 64), np.float32)  # 8 MiB
    buffer[:] = 1.0
    start = buffer.ctypes.data
    end = start + buffer.nbytes
    if platform.system() == "Linux":
        refused = huge_pages.refused_mappings()
        assert any(low <= start and end <= high for low, high in refused)
    live = huge_pages.overlaps([(start, end)], sorted(huge_pages.anonymous_mappings()))
    assert huge_pages.collapse(huge_pages.subtract(live, huge_pages.refused_mappings())) == 0
    assert huge_bytes_at(start, end) == 0
    assert float(buffer.sum()) == buffer.size


def test_ranges_overlap_and_subtract():
    assert huge_pages.overlaps([(10, 50)], [(0, 20), (30, 40), (60, 70)]) == [(10, 20), (30, 40)]
    assert huge_pages.subtract([(0, 100)], [(10, 20), (90, 120)]) == [(0, 10), (20, 90)]
    assert huge_pages.subtract([(0, 10)], [(0, 10)]) == []
