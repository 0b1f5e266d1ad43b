"""Two small per-step costs, measured against the way they used to be paid and against a peer:

- top-p without top-k over a Qwen3-sized vocabulary (151,936): fermi's histogram selection
  (`apply_top_p`), the full sort fermi used before (numpy argsort of every probability), and
  Hugging Face transformers' `TopPLogitsWarper` (torch.sort of the whole vocabulary, as HF and
  vLLM's torch sampler do), on flat, medium and peaked logits; plus a whole Sampler step.
- growing a KV cache of the Qwen3-0.6B shape (28 layers, 8 KV heads, head_dim 128, fp32) when
  a short chat's decode first runs past what prefill reserved (94 -> 350 positions) and at the
  next growths (to 606, 862, 1118): the numpy copy fermi does on the host now, and the one-node
  onnxruntime Pad graph it used before, whose first use in a process also imported onnx and
  built a session. Each first growth runs in a fresh process.

    python -m fermi.bench.sampler_kv      # prints markdown tables (needs numpy; torch optional)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np

VOCAB = 151_936
SCALES = {"flat (sd 0.1)": 0.1, "medium (sd 1)": 1.0, "peaked (sd 5)": 5.0}


def _ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def full_sort_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """The previous fermi implementation's worst case: sort every probability."""
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    keep = order[(np.cumsum(sorted_probs, dtype=np.float64) - sorted_probs) < p]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def top_p_table() -> list[str]:
    from fermi.sampling import ResolvedSampling, Sampler, apply_top_p

    try:
        import torch
        from transformers.generation.logits_process import TopPLogitsWarper

        warper = TopPLogitsWarper(0.95)
    except ImportError:
        torch = warper = None
    rows = [
        "| logits | fermi top-p (ms) | full sort, before (ms) | HF TopPLogitsWarper, torch (ms) "
        "| fermi Sampler step, top_k 0, top_p 0.95 (ms) |",
        "|---|---|---|---|---|",
    ]
    sampler = Sampler(ResolvedSampling(temperature=0.7, top_p=0.95, top_k=0, min_p=0.0), seed=0)
    for name, scale in SCALES.items():
        logits = (np.random.default_rng(0).normal(size=VOCAB) * scale).astype(np.float32)
        ours = _ms(lambda logits=logits: apply_top_p(logits, 0.95))
        before = _ms(lambda logits=logits: full_sort_top_p(logits, 0.95))
        hf = "n/a"
        if warper is not None:
            tensor = torch.from_numpy(logits)[None]
            hf = f"{_ms(lambda tensor=tensor: warper(None, tensor)):.1f}"
        step = _ms(lambda logits=logits: sampler.sample(logits))
        rows.append(f"| {name} | {ours:.1f} | {before:.1f} | {hf} | {step:.1f} |")
    return rows


GROWTH = """
import json, time, sys
import numpy as np
from fermi.kv_cache import SharedKVCache
mode = sys.argv[1]
made = []
def resizer():
    if not made:
        from fermi.kv_cache import Resizer
        made.append(Resizer(np.float32, ["CPUExecutionProvider"]))
    return made[0]
device = "cpu" if mode == "numpy" else "cpu-pad"
cache = SharedKVCache(28, 8, 128, np.float32, 40960, resizer, "cpu")
if mode == "pad":  # the previous growth: a Pad graph through onnxruntime
    cache._grow = lambda value, capacity: resizer()(value, capacity, "cpu")
cache.reserve(94)  # a 30-token chat prompt plus the 64 positions prefill reserves
cache.advance(94)
times = []
for _ in range(4):  # 94 -> 350 -> 606 -> 862 -> 1118 positions
    target = cache.capacity + 1
    start = time.perf_counter()
    cache.reserve(target)
    times.append((time.perf_counter() - start) * 1000)
    cache.advance(target - cache.offset)
print(json.dumps(times))
"""


def growth_table() -> list[str]:
    rows = ["| KV growth, Qwen3-0.6B shape, fp32 | first growth in a process (ms) | "
            "next growths (ms) |", "|---|---|---|"]  # fmt: skip
    for mode, label in (("numpy", "numpy copy (now)"), ("pad", "onnxruntime Pad graph (before)")):
        runs = [
            json.loads(subprocess.run([sys.executable, "-c", GROWTH, mode], check=True,
                                      capture_output=True, text=True).stdout)
            for _ in range(5)
        ]  # fmt: skip
        first = statistics.median(r[0] for r in runs)
        later = statistics.median(t for r in runs for t in r[1:])
        rows.append(f"| {label} | {first:.0f} | {later:.0f} |")
    return rows


def main() -> None:
    print("\n".join(top_p_table()))
    print()
    print("\n".join(growth_table()))


if __name__ == "__main__":
    main()
