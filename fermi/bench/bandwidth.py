"""The decode ceiling: CPU decode at batch 1 reads every weight once per token, so it cannot beat
(memory read bandwidth / bytes of weights per token). Bandwidth is measured here the plain way:
N processes (one per core) each sum a large array over and over, started together."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

ARRAY_BYTES = 256 << 20  # far beyond any cache


def _reader(nbytes: int, seconds: float, barrier, results) -> None:
    import numpy as np

    data = np.ones(nbytes // 8, dtype=np.float64)
    data.sum()  # touch every page before the clock starts
    barrier.wait()
    passes = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        data.sum()
        passes += 1
    results.put(passes * data.nbytes / elapsed)


def read_bandwidth(processes: int, seconds: float = 1.0, nbytes: int = ARRAY_BYTES) -> float:
    """Aggregate bytes/s that `processes` concurrent readers achieve."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(target=_reader, args=(nbytes, seconds, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=120 + seconds) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(rates)


def measure(processes: int, repeats: int = 3, seconds: float = 1.0) -> dict:
    """Median (and min/max) GB/s with one reader and with `processes` readers."""
    result = {"processes": processes}
    for key, count in (("one_process", 1), ("all_processes", processes)):
        rates = [read_bandwidth(count, seconds) / 1e9 for _ in range(repeats)]
        result[key] = {
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "n": len(rates),
        }
    return result
