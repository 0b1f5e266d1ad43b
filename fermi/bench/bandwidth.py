"""The decode ceiling: CPU decode at batch 1 reads every weight once per token, so it cannot beat
(memory read bandwidth / bytes of weights per token).

The bandwidth is what N readers (one process per core, started together) reach, each over its
own array far larger than any cache. The ceiling takes the faster of two readers, measured in
the same run:

- `matvec`: a float32 matrix times a vector (numpy's sgemv, one BLAS thread per process), the
  access pattern of a decode step's matmuls;
- `sum`: numpy summing a float64 array, the only reader this benchmark used before 2026-11-30.
  Its reduction alone does not keep enough loads in flight on every CPU: on a 2-core Sapphire
  Rapids VM it read 33 GB/s where a float32 matrix-vector reader read 41 GB/s, so ceilings
  computed from it were too low and "% of ceiling" too high (a native llama.cpp F32 decode
  showed 122%). The faster reader is the tighter bound: no decoder reads faster than memory
  can be read.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

ARRAY_BYTES = 256 << 20  # far beyond any cache
READERS = ("matvec", "sum")
COLUMNS = 4096  # the matvec reader's row length (floats): a wide layer's input size
# One BLAS/OpenMP thread per reader process: the processes are the parallelism.
SINGLE_THREAD_ENV = {
    name: "1"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
}


def make_reader(kind: str, nbytes: int):
    """(data, one_pass): `one_pass()` reads every byte of `data` once. Raises ValueError for an
    unknown `kind`."""
    import numpy as np

    if kind == "matvec":
        rows = max(1, nbytes // (4 * COLUMNS))
        matrix = np.ones((rows, COLUMNS), dtype=np.float32)
        vector = np.ones(COLUMNS, dtype=np.float32)
        return matrix, lambda: matrix @ vector
    if kind == "sum":
        array = np.ones(max(1, nbytes // 8), dtype=np.float64)
        return array, array.sum
    raise ValueError(f"unknown reader {kind!r}: choose from {', '.join(READERS)}")


def _reader(kind: str, nbytes: int, seconds: float, barrier, results) -> None:
    os.environ.update(SINGLE_THREAD_ENV)  # before numpy loads its BLAS
    data, one_pass = make_reader(kind, nbytes)
    one_pass()  # touch every page before the clock starts
    barrier.wait()
    passes = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        one_pass()
        passes += 1
    results.put(passes * data.nbytes / elapsed)


def read_bandwidth(
    processes: int, seconds: float = 1.0, nbytes: int = ARRAY_BYTES, kind: str = "matvec"
) -> float:
    """Aggregate bytes/s that `processes` concurrent `kind` readers achieve."""
    if kind not in READERS:
        raise ValueError(f"unknown reader {kind!r}: choose from {', '.join(READERS)}")
    context = mp.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(target=_reader, args=(kind, nbytes, seconds, barrier, results))
        for _ in range(processes)
    ]
    saved = {name: os.environ.get(name) for name in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)  # the spawned interpreters start with it
    try:
        for worker in workers:
            worker.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    rates = [results.get(timeout=120 + seconds) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(rates)


def _stats(rates: list[float]) -> dict:
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "n": len(rates),
    }


def measure(
    processes: int, repeats: int = 3, seconds: float = 1.0, nbytes: int = ARRAY_BYTES
) -> dict:
    """GB/s (median, min, max over `repeats`) of each reader with one process and with
    `processes`, in `readers`; `reader` names the one with the highest median with `processes`
    (the ceiling's), whose figures are also `one_process` / `all_processes`."""
    readers = {}
    for kind in READERS:
        readers[kind] = {
            key: _stats(
                [read_bandwidth(count, seconds, nbytes, kind) / 1e9 for _ in range(repeats)]
            )
            for key, count in (("one_process", 1), ("all_processes", processes))
        }
    best = max(READERS, key=lambda kind: readers[kind]["all_processes"]["median"])
    return {"processes": processes, "reader": best, **readers[best], "readers": readers}
